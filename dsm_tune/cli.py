"""`dsm-tune` command line: one sub-command per module of `dsm_tune.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

from dsm_tune import __version__
from dsm_tune.errors import DSMTuneError

# Import names of the `tune` extra (pyproject.toml): the base install is the runtime merger and evaluation only.
TUNE_EXTRA_MODULES = ("optuna", "ray", "mlflow", "pandas", "matplotlib", "plotly", "scipy")

# Imported lazily so `dsm-tune measure` does not pay for importing ray/mlflow/optuna.
COMMAND_MODULES = ("measure", "run", "report", "export", "verify", "ui", "probe", "sync")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsm-tune",
        description="Tune Delayed Spatial Merging (DSM) for a timm ViT on a target device.",
    )
    parser.add_argument("--version", action="version", version=f"dsm-tune {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"dsm_tune.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"dsm_tune.commands.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DSMTuneError as exc:
        print(f"dsm-tune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dsm-tune: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in TUNE_EXTRA_MODULES:
            raise
        print(f"dsm-tune: error: `dsm-tune {args.command}` needs the tuner's packages ({exc.name} is not installed): "
              "pip install 'dsm-tune[tune]'", file=sys.stderr)
        return 2
    except Exception as exc:
        # A full disk (or a read-only one) is the user's to fix wherever it surfaces, never a traceback: the
        # study driver already says it in its own words (DiskFullError); this catches every other command.
        from dsm_tune.search.diskspace import any_disk_full_error

        error = any_disk_full_error(exc)
        if error is None:
            raise
        print(f"dsm-tune: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
