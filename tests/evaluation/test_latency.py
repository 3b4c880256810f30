"""The latency harness: interleaving, statistics, compile handling and one measurement per device at a time."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from dsm_tune.evaluation import latency as latency_module
from dsm_tune.evaluation.latency import LatencyError, device_lock, measure_latency
from dsm_tune.evaluation.targets import load_target


class Recorder(nn.Module):
    """A tiny model that logs who ran, and checks it only ever runs under the device lock."""

    def __init__(self, name: str, log: list):
        super().__init__()
        self.name, self.log = name, log
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert latency_module._PROCESS_LOCK.locked()
        assert torch.is_inference_mode_enabled()
        self.log.append(self.name)
        return self.linear(x.flatten(1)[:, :4])


CPU = load_target("cpu", batch_size=2)


def test_dense_and_merged_runs_are_interleaved_alternating_who_goes_first():
    log: list[str] = []
    result = measure_latency(Recorder("A", log), Recorder("B", log), CPU, (4, 2, 2), warmup=2, repeats=4,
                             min_sample_ms=0.0)
    assert result.runs_per_sample == 1 and result.repeats == 4 and result.interleaved
    warmup_and_calibration = ["A", "B"] * 2 + ["A", "B"]
    assert log[:6] == warmup_and_calibration
    assert log[6:] == ["A", "B", "B", "A", "A", "B", "B", "A"]


def test_sequential_mode_for_comparison():
    log: list[str] = []
    result = measure_latency(Recorder("A", log), Recorder("B", log), CPU, (4, 2, 2), warmup=0, repeats=3,
                             min_sample_ms=0.0, interleave=False)
    assert not result.interleaved
    assert log[2:] == ["A"] * 3 + ["B"] * 3


def test_short_forwards_are_repeated_within_a_sample():
    log: list[str] = []
    result = measure_latency(Recorder("A", log), Recorder("B", log), CPU, (4, 2, 2), warmup=0, repeats=2,
                             min_sample_ms=5.0)
    # A linear layer on 2 x 4 numbers takes microseconds: one sample must hold many forwards.
    assert result.runs_per_sample > 1
    assert len(log) == 2 + 2 * 2 * result.runs_per_sample


def test_statistics_from_the_timed_samples(monkeypatch):
    samples = {"A": iter([10.0, 12.0, 11.0, 13.0, 20.0]), "B": iter([5.0, 6.0, 5.0, 7.0, 5.0])}
    log: list[str] = []

    def fake_sampler(device):
        def sample(forward, runs):
            forward()
            return next(samples[log[-1]]) if len(log) > 2 else 1.0
        return sample

    monkeypatch.setattr(latency_module, "_sampler", fake_sampler)
    result = measure_latency(Recorder("A", log), Recorder("B", log), CPU, (4, 2, 2), warmup=0, repeats=5)
    assert result.baseline_ms == 12.0 and result.candidate_ms == 5.0
    assert result.baseline_iqr_ms == pytest.approx(13.0 - 11.0)
    assert result.candidate_iqr_ms == pytest.approx(6.0 - 5.0)
    assert result.speedup == pytest.approx(12.0 / 5.0)
    ratios = sorted([10 / 5, 12 / 6, 11 / 5, 13 / 7, 20 / 5])
    assert result.speedup_iqr == pytest.approx(ratios[3] - ratios[1])
    assert (result.batch_size, result.dtype, result.device, result.compile_s) == (2, "float32", "cpu", None)


def test_models_are_cast_to_the_target_dtype():
    dense, merged = nn.Linear(8, 8), nn.Linear(8, 8)
    flat = nn.Sequential(nn.Flatten(), dense), nn.Sequential(nn.Flatten(), merged)
    result = measure_latency(*flat, load_target("cpu", batch_size=1, dtype="bfloat16"), (2, 2, 2), warmup=0,
                             repeats=1)
    assert dense.weight.dtype == merged.weight.dtype == torch.bfloat16
    assert result.dtype == "bfloat16" and result.baseline_ms > 0 and result.candidate_ms > 0


def test_bad_arguments():
    model = nn.Flatten()
    with pytest.raises(LatencyError, match="input_shape"):
        measure_latency(model, model, CPU, (3, 32))
    with pytest.raises(LatencyError, match="repeats"):
        measure_latency(model, model, CPU, (3, 2, 2), repeats=0)


def test_compile_is_reset_per_measurement_and_timed_apart(monkeypatch):
    resets = []
    real_reset = torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: (resets.append(1), real_reset()))
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    result = measure_latency(model, model, load_target("cpu", batch_size=2, compile=True), (3, 2, 2), warmup=1,
                             repeats=2, compile_backend="eager")
    assert result.compile_s is not None and result.compile_s > 0
    assert len(resets) >= 1


def test_two_threads_never_measure_at_once():
    log: list[str] = []
    errors: list[BaseException] = []

    def measure(tag: str) -> None:
        try:
            measure_latency(Recorder(f"{tag}A", log), Recorder(f"{tag}B", log), CPU, (4, 2, 2), warmup=1,
                            repeats=5, min_sample_ms=0.0)
        except BaseException as exc:  # surfaced below: an assertion in a thread would be lost
            errors.append(exc)

    threads = [threading.Thread(target=measure, args=(tag,)) for tag in "xy"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    tags = [entry[0] for entry in log]
    # One measurement ran entirely before the other: the log is one block of x then one of y (or y, x).
    assert tags in (sorted(tags), sorted(tags, reverse=True))
    assert len(set(tags)) == 2


def test_device_lock_blocks_a_second_holder():
    order: list[str] = []
    held = threading.Event()

    def holder():
        with device_lock("cpu"):
            held.set()
            time.sleep(0.2)
            order.append("first done")

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait()
    with device_lock("cpu"):
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_measurement_uses_cuda_events():
    target = load_target("h100", batch_size=4, dtype="float16")
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 64))
    result = measure_latency(model, model, target, (3, 16, 16), warmup=2, repeats=5)
    assert result.device == "cuda" and result.baseline_ms > 0
    assert next(model.parameters()).dtype == torch.float16
