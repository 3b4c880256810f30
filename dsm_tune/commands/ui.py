"""`dsm-tune ui`: the MLflow UI over the project's tracking store, bound to loopback unless told otherwise."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from dsm_tune.commands.common import DEFAULT_OUT, add_mlflow_args
from dsm_tune.errors import DSMTuneError
from dsm_tune.interrupts import sigterm_as_interrupt
from dsm_tune.search.ray_session import is_loopback_address

# How long the server may take to shut down on SIGTERM before its process group is killed.
STOP_GRACE_S = 10.0


class UIError(DSMTuneError):
    """The UI cannot be started over the given store."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ui", help="serve the MLflow UI over the studies' tracking store",
        description="Run `mlflow ui` over the tracking store (default sqlite:///<out>/mlflow.db). "
                    "Filter Pareto-optimal trials with: tags.pareto = 'true'.")
    parser.add_argument("--port", type=int, default=5000, help="port to listen on (default: 5000)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root holding mlflow.db (default: runs/)")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes (default: 1)")
    parser.add_argument("--study", default=None,
                        help="study whose front the printed URL opens (default: the latest study in the store)")
    parser.add_argument("--no-browser", action="store_true",
                        help="only print the URL (default: also open it in a browser when this is a terminal "
                             "with a display)")
    add_mlflow_args(parser)
    parser.set_defaults(func=main)


def ui_command(uri: str, host: str, port: int, workers: int = 1) -> list[str]:
    """The `mlflow ui` argument list for a store (run without a shell: nothing here is interpreted)."""
    from dsm_tune.search.tracking import local_artifact_root

    if not 0 < port < 65536:
        raise UIError(f"--port must be between 1 and 65535, got {port}")
    if workers < 1:
        raise UIError(f"--workers must be >= 1, got {workers}")
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host,
               "--port", str(port), "--workers", str(workers)]
    artifacts = local_artifact_root(uri)
    if artifacts is not None:
        # Experiments created from the UI keep their artifacts next to the database, like the tracker's.
        command += ["--artifacts-destination", artifacts.resolve().as_uri()]
    return command


def main(args: argparse.Namespace) -> int:
    from dsm_tune.search.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.mlflow_uri, args.out)
    if uri.startswith(("http://", "https://")):
        print(f"{uri} is a tracking server: it serves its own UI, open it in a browser")
        return 0
    if uri.startswith("sqlite:///"):
        database = Path(uri[len("sqlite:///"):])
        if not database.is_file():
            raise UIError(f"no MLflow store at {database}: run `dsm-tune run` first, or give --out / --mlflow-uri")
    command = ui_command(uri, args.host, args.port, args.workers)
    if not is_loopback_address(args.host):
        print(f"dsm-tune: warning: binding the MLflow UI to {args.host} exposes every study on this network",
              file=sys.stderr)
    base = f"http://{url_host(args.host)}:{args.port}"
    url = base + "/#" + study_route(uri, args.study)
    print(f"MLflow UI for {uri} at {base} (Ctrl-C stops it); Pareto-optimal trials: filter tags.pareto = 'true'\n"
          f"The study's trials, accuracy drop vs latency: {url}", flush=True)
    if not args.no_browser and can_open_browser():
        threading.Thread(target=open_when_up, args=(url, url_host(args.host), args.port), daemon=True).start()
    return serve(command)


def url_host(host: str) -> str:
    """Where a browser on this machine reaches a server bound to `host`."""
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def study_route(uri: str, study: str | None) -> str:
    """The UI route of a study's runs and charts (its saved front view); "/" when the store holds no study
    (or cannot be read: the UI still serves whatever it holds). The latest study when `study` is None."""
    from dsm_tune.search.tracking.runs import ROLE_TAG, STUDY_TAG, filter_literal, front_view_route

    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        if not experiments:
            return "/"
        wanted = f"tags.`{ROLE_TAG}` = 'study'"
        if study is not None:
            wanted += f" AND tags.`{STUDY_TAG}` = {filter_literal(study)}"
        runs = client.search_runs(experiments, filter_string=wanted, max_results=1,
                                  order_by=["attributes.start_time DESC"])
    except Exception as exc:   # a store this MLflow cannot read: the UI will say why
        print(f"dsm-tune: warning: cannot look up the study in {uri} ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return "/"
    if not runs:
        if study is not None:
            print(f"dsm-tune: warning: no study {study!r} in {uri}", file=sys.stderr)
        return "/"
    run = runs[0]
    return front_view_route(run.info.experiment_id, run.data.tags.get(STUDY_TAG))


def can_open_browser() -> bool:
    """A person at a terminal with somewhere to show a page (not a test, a pipe or an ssh session without X)."""
    if not sys.stdout.isatty():
        return False
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def open_when_up(url: str, host: str, port: int, timeout_s: float = 120.0) -> None:
    """Open `url` once the server accepts connections (MLflow takes seconds to start)."""
    import socket
    import webbrowser

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host.strip("[]"), port), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    else:
        return
    webbrowser.open(url)


def serve(command: list[str]) -> int:
    """Run the server until it exits, or until this process gets SIGINT or SIGTERM; either way the server and every
    process it started (uvicorn/gunicorn workers) are gone, and the port is free, when this returns.

    The server runs in its own session: a signal sent to this process alone (a supervisor's `kill`) would otherwise
    leave `mlflow ui` and its workers behind holding the port, and its process group lets us stop them all."""
    restore_sigterm = sigterm_as_interrupt()
    server = subprocess.Popen(command, start_new_session=True)
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        # A second Ctrl-C or kill while the server shuts down must not cut the clean-up short.
        stopping = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stopping)
        try:
            stop_process_group(server)
        finally:
            restore_sigterm()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stopping)


def stop_process_group(leader: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the leader's process group, SIGKILL whatever is left of it after `grace_s`."""
    group = leader.pid
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if leader.poll() is not None and not _group_alive(group):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal.SIGKILL)
    leader.wait()


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # a member we may not signal still exists
        return True
    return True
