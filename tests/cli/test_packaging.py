"""The base install is the runtime: without the `tune` extra, tuner commands say what to install in one line."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from dsm_tune.cli import TUNE_EXTRA_MODULES

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _extra(name: str) -> set[str]:
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    return {re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower() for requirement in extras[name]}


def test_the_cli_knows_the_tune_extra_by_its_import_names():
    assert _extra("tune") == set(TUNE_EXTRA_MODULES)
    base = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    assert not {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in base} & set(TUNE_EXTRA_MODULES)


def test_a_tuner_command_without_the_tune_extra_is_one_line(tmp_path):
    # As in a runtime-only install: every package of the tune extra is absent.
    probe = (f"import sys; sys.modules.update(dict.fromkeys({TUNE_EXTRA_MODULES!r})); "
             "from dsm_tune.cli import main; "
             f"sys.exit(main(['run', '--model', 'demo', '--device', 'cpu', '--out', {str(tmp_path)!r}]))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    missing = re.fullmatch(r"dsm-tune: error: `dsm-tune run` needs the tuner's packages \(([\w.]+) is not "
                           r"installed\): pip install 'dsm-tune\[tune\]'", lines[0])
    assert missing and missing.group(1).split(".")[0] in TUNE_EXTRA_MODULES


def test_the_cli_starts_without_the_tune_extra():
    # Every command module is imported to build the parser: none may need the tuner's packages at import time.
    probe = (f"import sys; sys.modules.update(dict.fromkeys({TUNE_EXTRA_MODULES!r})); "
             "from dsm_tune.cli import build_parser; build_parser().parse_args(['measure', '--help'])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: dsm-tune measure" in done.stdout
