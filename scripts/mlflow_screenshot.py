"""Screenshot of a study's front as `dsm-tune ui` opens it, taken by headless Chromium (docs/mlflow-front.png).

    python scripts/mlflow_screenshot.py --out /tmp/mlf-demo --png docs/mlflow-front.png [--study demo-cpu]

Starts `mlflow ui` over <out>/mlflow.db on a free loopback port (the argument list `dsm-tune ui` runs), opens the
URL `dsm-tune ui` prints, lets the page render for --render-s seconds of virtual time, saves the screenshot,
shrinks it with pngquant when installed, and stops the server. Needs Debian's `chromium`
(`apt-get install chromium`). Every command is an argument list: nothing given here reaches a shell.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsm_tune.commands.ui import study_route, ui_command   # noqa: E402
from tests.mlflow_helpers import free_port, running_server   # noqa: E402


def chromium_command(browser: str, url: str, png: Path, profile: Path, width: int, height: int,
                     render_s: float) -> list[str]:
    return [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}",
            f"--virtual-time-budget={int(render_s * 1000)}", f"--screenshot={png}", url]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output root holding mlflow.db")
    parser.add_argument("--study", default=None, help="study to show (default: the latest in the store)")
    parser.add_argument("--png", type=Path, default=Path("docs/mlflow-front.png"))
    parser.add_argument("--route", default=None, help="UI route to show instead of the study's (after '#')")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--render-s", type=float, default=25.0, help="virtual time the page gets to render")
    parser.add_argument("--browser", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args(argv)

    database = (args.out / "mlflow.db").resolve()
    if not database.is_file():
        parser.error(f"no MLflow store at {database}")
    uri = f"sqlite:///{database}"
    route = args.route or study_route(uri, args.study)
    port = free_port()
    url = f"http://127.0.0.1:{port}/#{route}"
    args.png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, \
            running_server(ui_command(uri, "127.0.0.1", port), port, Path(tmp) / "server.log"):
        print(f"screenshot of {url}", flush=True)
        shot = subprocess.run(chromium_command(args.browser, url, args.png.resolve(), Path(tmp) / "profile",
                                               args.width, args.height, args.render_s),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300,
                              start_new_session=True)
        if shot.returncode != 0 or not args.png.is_file():
            print(shot.stdout.decode(errors="replace")[-3000:], file=sys.stderr)
            return 1
    if shutil.which("pngquant"):
        subprocess.run(["pngquant", "--force", "--skip-if-larger", "--output", str(args.png), "--", str(args.png)],
                       check=False)
    print(f"{args.png}: {args.png.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    # A stray chromium helper must not outlive an interrupted run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())
