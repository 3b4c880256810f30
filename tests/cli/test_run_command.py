"""`dsm-tune run` flags turned into a study spec (no study is run)."""

from __future__ import annotations

from dsm_tune.cli import build_parser
from dsm_tune.commands.run import build_spec


def _spec(*argv: str):
    return build_spec(build_parser().parse_args(["run", *argv]))


def test_one_worker_by_default_on_cpu_and_gpu_targets():
    # A CPU host is one device: its workers take turns under the timing lock, so a second one only waits.
    assert _spec("--model", "demo", "--device", "cpu").workers == 1
    assert _spec("--model", "vit_base", "--device", "a100").workers == 1
    assert _spec("--model", "demo", "--device", "cpu", "--workers", "3").workers == 3
