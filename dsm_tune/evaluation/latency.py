"""Latency of a merged model against the dense one on the target device (the study's second objective).

How it stays honest (docs/design.md section 6):
- on the target's device, dtype and deployment batch size, under `torch.inference_mode()`;
- warm-up first, then repeated timed samples; GPU samples are timed with CUDA events after a synchronize;
- dense and merged samples are interleaved (A B B A A B ...), so slow drift of clocks, temperature or a
  neighbour's load hits both alike, and the speedup is read both as the ratio of the medians and from the
  per-pair ratios, whose interquartile range says how much to trust it;
- a sample repeats the forward until it lasts long enough for the timer to resolve it;
- with `compile`, both models are compiled after `torch._dynamo.reset()` and the compile time is reported apart;
- the target's runtime decides what runs the timed forwards (`RUNTIMES`): PyTorch, or ONNX Runtime sessions of
  both models exported with `dsm_tune.merging.export_onnx` for this measurement (export time reported apart);
- one measurement per device at a time: a lock in this process, and a file lock per device on this host (the
  study driver runs one worker per device, the file lock catches everything else, e.g. a `dsm-tune measure`
  started beside a running study on the same machine).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from dsm_tune.errors import DSMTuneError
from dsm_tune.evaluation.targets import Target

DEFAULT_WARMUP = {"cpu": 3, "cuda": 10}
DEFAULT_REPEATS = {"cpu": 15, "cuda": 30}
# A timed sample shorter than this repeats the forward: timer resolution and launch jitter would dominate it.
DEFAULT_MIN_SAMPLE_MS = 20.0
_MAX_RUNS_PER_SAMPLE = 1000

_PROCESS_LOCK = threading.Lock()
log = logging.getLogger(__name__)


class LatencyError(DSMTuneError):
    """A latency measurement that cannot be made as asked (bad input shape, repeats...)."""


@dataclasses.dataclass(frozen=True)
class LatencyResult:
    baseline_ms: float          # dense: median per forward
    baseline_iqr_ms: float
    candidate_ms: float         # merged: median per forward
    candidate_iqr_ms: float
    speedup: float              # baseline_ms / candidate_ms
    speedup_iqr: float          # interquartile range of the per-pair ratios
    compile_s: float | None     # preparing both models: compile + first call, or ONNX export + sessions (None: eager)
    batch_size: int
    dtype: str
    device: str
    repeats: int = 0
    runs_per_sample: int = 1
    interleaved: bool = True
    pair_speedup: float = 0.0   # median of the per-pair ratios: a second estimate, robust to bursts of load
    runtime: str = "torch"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _device_lock_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    # CUDA_VISIBLE_DEVICES renumbers GPUs per process; the UUID names the physical device.
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return f"cuda-{uuid}" if uuid is not None else f"cuda{index}"


@contextlib.contextmanager
def device_lock(device: torch.device | str) -> Iterator[None]:
    """Exclusive use of `device` for timing: in this process, and on this host where file locks exist."""
    device = torch.device(device)
    with _PROCESS_LOCK:
        try:
            import fcntl
        except ImportError:  # no flock on this platform: the process lock is all we can offer
            yield
            return
        lock_path = Path(tempfile.gettempdir()) / f"dsm-tune-latency-{_device_lock_name(device)}.lock"
        with open(lock_path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("waiting for another process's latency measurement on %s to finish (%s)",
                            device, lock_path)
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _batch_shape(input_shape, batch_size: int) -> tuple[int, ...]:
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3 or min(shape) <= 0:
        raise LatencyError(f"input_shape must be (channels, height, width), got {tuple(input_shape)}")
    return (batch_size, *shape)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sampler(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    """A function timing `runs` calls of `forward`, returning milliseconds per call."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def sample_cuda(forward: Callable[[], object], runs: int) -> float:
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(runs):
                forward()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / runs

        return sample_cuda

    def sample_host(forward: Callable[[], object], runs: int) -> float:
        _synchronize(device)
        begin = time.perf_counter()
        for _ in range(runs):
            forward()
        _synchronize(device)
        return (time.perf_counter() - begin) * 1000.0 / runs

    return sample_host


Forward = Callable[[], object]
# A runtime prepares the two timed forwards (dense, merged) from the models and the input batch, and reports the
# seconds preparing took (None when there is nothing to prepare).
RuntimeContext = Callable[..., contextlib.AbstractContextManager[tuple[tuple[Forward, Forward], float | None]]]


@contextlib.contextmanager
def _torch_runtime(dense: torch.nn.Module, merged: torch.nn.Module, target: Target, inputs: torch.Tensor,
                   compile_backend: str):
    if not target.compile:
        yield (lambda: dense(inputs), lambda: merged(inputs)), None
        return
    # Compiled graphs of the previous config would be reused or pile up; start each measurement clean.
    torch._dynamo.reset()
    try:
        dense_compiled = torch.compile(dense, backend=compile_backend)
        merged_compiled = torch.compile(merged, backend=compile_backend)
        begin = time.perf_counter()
        dense_compiled(inputs)
        merged_compiled(inputs)
        _synchronize(inputs.device)
        yield (lambda: dense_compiled(inputs), lambda: merged_compiled(inputs)), time.perf_counter() - begin
    finally:
        torch._dynamo.reset()


def onnxruntime_session(path: Path | str):
    """A CPU ONNX Runtime session using as many threads as PyTorch does, so both runtimes get the same cores."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def _onnxruntime_runtime(dense: torch.nn.Module, merged: torch.nn.Module, target: Target, inputs: torch.Tensor,
                         compile_backend: str):
    from dsm_tune.merging import export_onnx
    from dsm_tune.merging.export import INPUT_NAME, require_onnx_packages

    require_onnx_packages("onnx", "onnxscript", "onnxruntime")
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dsm-tune-ort-") as folder:
        sessions = [onnxruntime_session(export_onnx(model, None, Path(folder) / f"{name}.onnx",
                                                    batch_size=target.batch_size))
                    for name, model in (("dense", dense), ("merged", merged))]
        feed = {INPUT_NAME: inputs.detach().cpu().numpy()}
        dense_session, merged_session = sessions
        yield ((lambda: dense_session.run(None, feed), lambda: merged_session.run(None, feed)),
               time.perf_counter() - begin)


def _tensorrt_runtime(dense: torch.nn.Module, merged: torch.nn.Module, target: Target, inputs: torch.Tensor,
                      compile_backend: str):
    # The seam for GPU deployment: TensorRT would build its engines from the same export_onnx graphs and be timed
    # with CUDA events like the torch runtime. Until that is written and checked on a GPU, it refuses clearly.
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise LatencyError(f"target '{target.name}' times with TensorRT, which is not installed here; "
                           "use an eager or onnxruntime target") from None
    raise LatencyError(f"target '{target.name}': timing under TensorRT is not implemented yet; export the graph "
                       "with `dsm-tune export --onnx` and build the engine with trtexec")


RUNTIMES: dict[str, RuntimeContext] = {
    "torch": _torch_runtime,
    "onnxruntime": _onnxruntime_runtime,
    "tensorrt": _tensorrt_runtime,
}


def _iqr(values: list[float]) -> float:
    q1, q3 = np.percentile(values, [25, 75])
    return float(q3 - q1)


def measure_latency(dense_model: torch.nn.Module, merged_model: torch.nn.Module, target: Target,
                    input_shape, warmup: int | None = None, repeats: int | None = None, interleave: bool = True,
                    min_sample_ms: float = DEFAULT_MIN_SAMPLE_MS, compile_backend: str = "inductor",
                    seed: int = 0) -> LatencyResult:
    """Median and IQR latency per forward of both models at the target's batch size and dtype, and the speedup.

    `input_shape` is (channels, height, width). Both models are moved to the target's device and dtype in place
    (they may share weights). `interleave=False` times all dense samples, then all merged ones: only for showing
    what interleaving buys (benchmarks/latency_noise.py).
    """
    device = torch.device(target.device)
    warmup = DEFAULT_WARMUP.get(device.type, 3) if warmup is None else warmup
    repeats = DEFAULT_REPEATS.get(device.type, 15) if repeats is None else repeats
    if warmup < 0 or repeats < 1:
        raise LatencyError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    shape = _batch_shape(input_shape, target.batch_size)
    dtype = target.torch_dtype
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(shape, generator=generator).to(device, dtype)

    if target.runtime not in RUNTIMES:
        raise LatencyError(f"target '{target.name}' names runtime {target.runtime!r}; known: {', '.join(RUNTIMES)}")
    runtime = RUNTIMES[target.runtime]

    with device_lock(device), torch.inference_mode(), contextlib.ExitStack() as prepared:
        for model in (dense_model, merged_model):
            model.to(device, dtype).eval()
        forwards, compile_s = prepared.enter_context(runtime(dense_model, merged_model, target, inputs,
                                                             compile_backend))
        for _ in range(warmup):
            for forward in forwards:
                forward()
        sample = _sampler(device)
        fastest = min(sample(forward, 1) for forward in forwards)
        runs = min(_MAX_RUNS_PER_SAMPLE, max(1, math.ceil(min_sample_ms / max(fastest, 1e-6))))

        times: tuple[list[float], list[float]] = ([], [])
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()  # a collection inside one sample but not its partner is pure noise
        try:
            if interleave:
                for i in range(repeats):
                    # Alternate who goes first so neither model always runs on a cache the other warmed.
                    for which in ((0, 1) if i % 2 == 0 else (1, 0)):
                        times[which].append(sample(forwards[which], runs))
            else:
                for which in (0, 1):
                    times[which].extend(sample(forwards[which], runs) for _ in range(repeats))
        finally:
            if gc_was_enabled:
                gc.enable()

    dense_times, merged_times = times
    baseline_ms, candidate_ms = float(np.median(dense_times)), float(np.median(merged_times))
    ratios = [d / m for d, m in zip(dense_times, merged_times)]
    return LatencyResult(
        baseline_ms=baseline_ms, baseline_iqr_ms=_iqr(dense_times),
        candidate_ms=candidate_ms, candidate_iqr_ms=_iqr(merged_times),
        speedup=baseline_ms / candidate_ms, speedup_iqr=_iqr(ratios),
        compile_s=compile_s, batch_size=target.batch_size, dtype=target.dtype, device=target.device,
        repeats=repeats, runs_per_sample=runs, interleaved=interleave, pair_speedup=float(np.median(ratios)),
        runtime=target.runtime,
    )
