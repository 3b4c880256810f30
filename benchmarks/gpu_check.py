"""One prepared check of the GPU path: speedups, attention kernels, bf16 soundness, the CLI and a study, on one GPU.

No line of the CUDA path had run when this was written; this script is what runs when a GPU is at hand (an H200
for minutes at a time). Every section is independent: one that fails records its error and the rest go on. A total
time guard (`--budget-s`, default 480 s) stops adding work before the limit, and the results are rewritten after
every section, so a run cut short still leaves them.

    python benchmarks/gpu_check.py --out runs/gpu-check                          # on the GPU (cuda, h200 profile)
    python benchmarks/gpu_check.py --out runs/gpu-check --data runs/imagenet-300 --wheels wheels/
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu-check     # the same path on a CPU, <1 min
    python benchmarks/gpu_check.py --make-sample 300 runs/imagenet-300           # images small enough to carry

Sections (`<out>/gpu_check.json`, `<out>/gpu_check.md`):
- environment: torch, timm, the device, which SDPA backends are enabled, which optional packages are present;
- latency_eager / latency_compiled: dense vs merged forwards for ViT-B/16 and ViT-L/16 (random weights: latency
  does not depend on weight values) at bf16, batch 64 and 1, for a ToMe config and a delayed hierarchical one,
  each without proportional attention and with it through both ways of passing the bias (the float mask and the
  mask-free query/key column, `dsm_tune.merging.patch`). Interleaved samples (every variant once per round, the
  order rotating), CUDA events on the GPU. Compiled: `torch.compile` at batch 64, `mode="reduce-overhead"` (CUDA
  graphs) at batch 1, in priority order while the time guard allows;
- kernels: which SDPA kernel each variant ran (flash / efficient / cudnn / math), read from the profiler's op and
  kernel names;
- bf16: merged and dense outputs in bf16 against the same model in fp32 (max abs difference, cosine);
- cli: `dsm-tune measure` of a delayed hierarchical config, frozen with its figures, then `dsm-tune verify` of it
  (subprocesses, argument lists);
- study: a 12-trial `dsm-tune run --no-ray --no-mlflow` study with a random-weights ViT-B and the agreement metric
  (skipped, and said so, when optuna is not installed; `--wheels DIR` pip-installs wheels from a folder first).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import importlib.util
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
# On a lent GPU machine the working tree is copied, not installed: make `dsm_tune` importable from it.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DEFAULT_BUDGET_S = 480.0
DEFAULT_SAMPLE_SOURCE = ROOT.parent / "shared" / "assets" / "imagenet-sample"
ATTENTION_WAYS = ("off", "masked", "fused")   # no proportional attention; the bias as a mask; as a q/k column
# Kernel families by the names the profiler shows; cuDNN's fused attention names contain "flash", so it goes first.
KERNEL_FAMILIES = (
    ("cudnn", ("cudnn_attention", "cudnn", "fort_native_sdpa")),
    ("flash", ("flash",)),
    ("efficient", ("efficient_attention", "fmha", "cutlassf", "mem_eff")),
    ("math", ("attention_math", "softmax")),
)
OPTIONAL_PACKAGES = ("optuna", "ray", "mlflow", "pandas", "matplotlib", "plotly", "scipy", "onnxruntime")


class Settings:
    """What one run measures: the full GPU sizes or the --quick CPU ones."""

    def __init__(self, args: argparse.Namespace):
        self.quick = args.quick
        self.device = torch.device(args.device)
        self.target = args.target or ("h200" if self.device.type == "cuda" else "cpu")
        if self.quick:
            self.models = [("vit_tiny_patch16_224", 64)]   # a 4x4 grid: still windows of 2x2 at depth 1
            self.batches = [2, 1]
            self.dtype = getattr(torch, args.dtype or "float32")
            self.warmup, self.repeats, self.min_sample_ms = 1, 2, 0.0
            self.kernel_batches = [1]
            self.soundness_batch = 2
            self.study_trials, self.study_images, self.cli_images = 3, 16, 8
            self.max_compiles = 2   # the dense model and one merged: fullgraph capture is what a smoke run proves
            self.cli_model = "vit_tiny_patch16_224"
        else:
            self.models = [("vit_base_patch16_224", None), ("vit_large_patch16_224", None)]
            self.batches = [64, 1]
            self.dtype = getattr(torch, args.dtype or "bfloat16")
            self.warmup, self.repeats, self.min_sample_ms = 5, 15, 10.0
            self.kernel_batches = self.batches
            self.soundness_batch = 8
            self.study_trials, self.study_images, self.cli_images = 12, 256, 128
            self.max_compiles = 64
            self.cli_model = "vit_base_patch16_224"
        # On a CPU the check proves the capture (fullgraph, no breaks); inductor's C++ builds would take minutes.
        self.compile_backend = args.compile_backend or ("inductor" if self.device.type == "cuda" else "eager")


class Clock:
    """The total time guard: sections ask before they start, and compiled variants before each compile."""

    def __init__(self, budget_s: float):
        self.start = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()


# configs --------------------------------------------------------------------------------------------------------

def configs_for(model: torch.nn.Module) -> dict[str, Any]:
    """ToMe (constant r from block 0) and a delayed hierarchical schedule (the DSM paper's shape), both merging
    about 3/4 of the patch tokens by the last block, each with and without proportional attention."""
    from dsm_tune.merging import DSMConfig, ModelFingerprint
    from dsm_tune.search.strategies.traced.shapes import Shape, compile_schedule

    fingerprint = ModelFingerprint.from_model(model)
    blocks, patches = fingerprint.num_blocks, fingerprint.grid[0] * fingerprint.grid[1]
    r = max(1, math.floor(0.75 * patches / blocks))
    delayed = Shape(start_layer=max(1, blocks // 6), hierarchy_depth=1, local_blocks=max(1, blocks // 4),
                    front_loading=0.0, proportional_attention=True)
    base = {"tome": DSMConfig.tome(model, r=r, proportional_attention=True),
            "dsm": compile_schedule(delayed, 0.75, fingerprint)}
    return {name: {True: cfg, False: cfg.replace(proportional_attention=False)} for name, cfg in base.items()}


_BUILT: dict[tuple[str, int | None], torch.nn.Module] = {}


def build(name: str, img_size: int | None) -> torch.nn.Module:
    """A fresh copy of the random-weights model (seed 0): initialising ViT-L on the host takes seconds, and every
    section wants its own copy to move and cast."""
    import timm

    key = (name, img_size)
    if key not in _BUILT:
        torch.manual_seed(0)
        kwargs = {"img_size": img_size} if img_size else {}
        _BUILT[key] = timm.create_model(name, pretrained=False, **kwargs).eval()
    return copy.deepcopy(_BUILT[key])


def input_size(model: torch.nn.Module) -> tuple[int, int]:
    return tuple(model.patch_embed.img_size)


class Variant:
    """One forward to time: the dense model, or a merged copy (shared weights) with an attention way."""

    def __init__(self, config: str, way: str, module: torch.nn.Module):
        self.config, self.way, self.module = config, way, module

    @property
    def key(self) -> str:
        return "dense" if self.config == "dense" else f"{self.config}/{self.way}"

    def bind(self, fn: Callable[[torch.Tensor], Any], inputs: torch.Tensor,
             cuda_graphs: bool = False) -> Callable[[], Any]:
        from dsm_tune.merging.patch import set_proportional_attention_mode

        mode = "masked" if self.way == "masked" else "fused" if self.way == "fused" else "auto"
        # Each call is a new step for CUDA graph trees: the previous call's output (discarded) may be overwritten.
        mark_step = getattr(torch.compiler, "cudagraph_mark_step_begin", None) if cuda_graphs else None

        def forward():
            # The mode is global: each call sets its own, so interleaved variants never run another's path.
            set_proportional_attention_mode(mode)
            if mark_step is not None:
                mark_step()
            return fn(inputs)

        return forward


def variants_for(dense: torch.nn.Module) -> list[Variant]:
    from dsm_tune.evaluation.trial import shared_weights_copy
    from dsm_tune.merging import apply_dsm

    out = [Variant("dense", "-", dense)]
    for name, by_prop in configs_for(dense).items():
        plain = apply_dsm(shared_weights_copy(dense), by_prop[False])
        weighted = apply_dsm(shared_weights_copy(dense), by_prop[True])
        out += [Variant(name, "off", plain), Variant(name, "masked", weighted), Variant(name, "fused", weighted)]
    return out


# timing ---------------------------------------------------------------------------------------------------------

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_ms(forward: Callable[[], Any], runs: int, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(runs):
            forward()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / runs
    begin = time.perf_counter()
    for _ in range(runs):
        forward()
    return (time.perf_counter() - begin) * 1000.0 / runs


def interleaved(forwards: dict[str, Callable[[], Any]], settings: Settings) -> dict[str, dict[str, float]]:
    """Median and IQR per forward of each, every one timed once per round in a rotating order (drift and a
    neighbour's load hit all alike); the speedup of each against 'dense' from the per-round ratios too."""
    device = settings.device
    for _ in range(settings.warmup):
        for forward in forwards.values():
            forward()
    fastest = min(sample_ms(f, 1, device) for f in forwards.values())
    runs = max(1, min(200, math.ceil(settings.min_sample_ms / max(fastest, 1e-3))))
    names = list(forwards)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(settings.repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(sample_ms(forwards[name], runs, device))
    result = {}
    for name, values in times.items():
        q1, q3 = _quartiles(values)
        row = {"ms": statistics.median(values), "iqr_ms": q3 - q1, "runs_per_sample": runs}
        if "dense" in times and name != "dense":
            ratios = [d / m for d, m in zip(times["dense"], values)]
            r1, r3 = _quartiles(ratios)
            row.update(speedup=statistics.median(times["dense"]) / row["ms"], speedup_iqr=r3 - r1)
        result[name] = row
    return result


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def attention_kernels(forward: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """The SDPA kernel families one forward ran, from the profiler's op and kernel names."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        forward()
        _synchronize(device)
    names = {event.key for event in prof.key_averages()}
    return classify_kernels(names)


def classify_kernels(names: set[str]) -> dict[str, Any]:
    families, matched = set(), set()
    sdpa_ops = {n for n in names if "scaled_dot_product" in n.lower() or "attention" in n.lower()}
    for name in names:
        lower = name.lower()
        for family, needles in KERNEL_FAMILIES:
            if any(needle in lower for needle in needles):
                # A softmax outside any attention op is not proof of the math path unless no fused kernel ran.
                if family == "math" and "softmax" in lower and "attention_math" not in lower:
                    break
                families.add(family)
                matched.add(name)
                break
    if not families & {"flash", "efficient", "cudnn"} and any("softmax" in n.lower() for n in names):
        families.add("math")
    return {"families": sorted(families), "names": sorted(matched)[:6], "sdpa_ops": sorted(sdpa_ops)[:6],
            "cuda_graph": any("graphlaunch" in n.lower() for n in names)}


# sections -------------------------------------------------------------------------------------------------------

def section_environment(settings: Settings, clock: Clock, work: Path, args: argparse.Namespace) -> dict:
    import timm

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "device": str(settings.device), "target": settings.target, "dtype": str(settings.dtype).replace("torch.", ""),
        "cpu_count": os.cpu_count(), "quick": settings.quick,
    }
    if settings.device.type == "cuda":
        properties = torch.cuda.get_device_properties(settings.device)
        info.update(gpu=properties.name, capability=f"{properties.major}.{properties.minor}",
                    memory_gib=round(properties.total_memory / 2 ** 30, 1), cuda=torch.version.cuda,
                    sdpa_enabled={"flash": torch.backends.cuda.flash_sdp_enabled(),
                                  "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                  "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                                  "math": torch.backends.cuda.math_sdp_enabled()})
    if args.wheels is not None:
        info["wheels"] = install_wheels(Path(args.wheels))
    importlib.invalidate_caches()
    info["packages"] = {name: importlib.util.find_spec(name) is not None for name in OPTIONAL_PACKAGES}
    return info


def install_wheels(folder: Path) -> dict:
    wheels = sorted(str(p) for p in folder.glob("*.whl")) if folder.is_dir() else []
    if not wheels:
        return {"status": "error", "error": f"no .whl files in {folder}"}
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(folder), *wheels]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    return {"status": "ok" if done.returncode == 0 else "error", "returncode": done.returncode,
            "wheels": [Path(w).name for w in wheels], "tail": (done.stdout + done.stderr)[-1500:]}


def _each_model(settings: Settings):
    for name, img_size in settings.models:
        dense = build(name, img_size).to(settings.device, settings.dtype)
        try:
            yield name, dense, variants_for(dense)
        finally:
            del dense
            if settings.device.type == "cuda":
                torch.cuda.empty_cache()


def _inputs(model: torch.nn.Module, batch: int, settings: Settings, dtype: torch.dtype | None = None):
    generator = torch.Generator().manual_seed(batch)
    height, width = input_size(model)
    return torch.randn(batch, 3, height, width, generator=generator).to(settings.device, dtype or settings.dtype)


def section_latency_eager(settings: Settings, clock: Clock, work: Path, args) -> dict:
    rows = []
    with torch.inference_mode():
        for name, dense, variants in _each_model(settings):
            for batch in settings.batches:
                x = _inputs(dense, batch, settings)
                forwards = {v.key: v.bind(v.module, x) for v in variants}
                timed = interleaved(forwards, settings)
                rows += [_latency_row(name, batch, "eager", v, timed[v.key]) for v in variants]
    return {"rows": rows}


def _latency_row(model: str, batch: int, mode: str, variant: Variant, timing: dict | None, **extra) -> dict:
    row = {"model": model, "batch": batch, "mode": mode, "config": variant.config, "attention": variant.way}
    if timing is not None:
        row.update(timing)
    row.update(extra)
    return row


def section_kernels(settings: Settings, clock: Clock, work: Path, args) -> dict:
    rows = []
    with torch.inference_mode():
        for name, dense, variants in _each_model(settings):
            for batch in settings.kernel_batches:
                x = _inputs(dense, batch, settings)
                for v in variants:
                    forward = v.bind(v.module, x)
                    forward()   # first-call work (allocations, lazy init) stays out of the profile
                    rows.append({"model": name, "batch": batch, "mode": "eager", "config": v.config,
                                 "attention": v.way, **attention_kernels(forward, settings.device)})
    return {"rows": rows}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def section_bf16(settings: Settings, clock: Clock, work: Path, args) -> dict:
    """Each model in bf16 against itself in fp32 on the same device and images: merging must add no error
    beyond bf16's own (the dense row is that baseline)."""
    from dsm_tune.evaluation.trial import shared_weights_copy
    from dsm_tune.merging import apply_dsm
    from dsm_tune.merging.patch import set_proportional_attention_mode

    rows = []
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    # The fp32 reference must be fp32: TF32 convolutions (cuDNN's default) would blur it.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            for name, img_size in settings.models:
                reference = build(name, img_size).to(settings.device, torch.float32)
                low = copy.deepcopy(reference).to(torch.bfloat16)
                x = _inputs(reference, settings.soundness_batch, settings, torch.float32)
                dense32, dense16 = reference(x), low(x.bfloat16()).float()
                rows.append({"model": name, "config": "dense", "attention": "-",
                             "max_abs": float((dense16 - dense32).abs().max()), "cosine": _cosine(dense16, dense32),
                             "output_scale": float(dense32.abs().max())})
                for config, by_prop in configs_for(reference).items():
                    for way in ATTENTION_WAYS:
                        cfg = by_prop[way != "off"]
                        set_proportional_attention_mode("masked" if way == "masked" else "fused"
                                                        if way == "fused" else "auto")
                        merged32 = apply_dsm(shared_weights_copy(reference), cfg)(x)
                        merged16 = apply_dsm(shared_weights_copy(low), cfg)(x.bfloat16()).float()
                        rows.append({"model": name, "config": config, "attention": way,
                                     "max_abs": float((merged16 - merged32).abs().max()),
                                     "cosine": _cosine(merged16, merged32),
                                     "merged_vs_dense_cosine_fp32": _cosine(merged32, dense32),
                                     "output_scale": float(merged32.abs().max())})
                del reference, low
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        set_proportional_attention_mode("auto")
    return {"rows": rows}


# Compiled groups in priority order: (model index, batch index, compile mode). Batch 1 is launch-bound, so its
# compiled figure that matters is CUDA graphs' (reduce-overhead); the default mode there comes last.
# Each group compiles at most its first `cap` variants of VARIANT_PRIORITY, so the time spreads over the groups
# before a later pass could be thought of; the masked variants' kernels are shown eagerly.
COMPILE_GROUPS = ((0, 0, "default", 4), (0, 1, "reduce-overhead", 3), (1, 0, "default", 3),
                  (1, 1, "reduce-overhead", 3), (0, 1, "default", 3), (1, 1, "default", 2))
# Which variants to compile first inside a group: the dense reference, then what a GPU study would pick from.
VARIANT_PRIORITY = ("dense", "dsm/fused", "tome/fused", "dsm/off", "tome/off", "dsm/masked", "tome/masked")
FIRST_COMPILE_ESTIMATE_S = {"cuda": 60.0, "cpu": 15.0}


def section_latency_compiled(settings: Settings, clock: Clock, work: Path, args, reserve_s: float = 0.0) -> dict:
    import torch._dynamo

    # Every variant of a group is a cache entry of the same forward code (and masked/fused differ by a guarded
    # global): the default limit of 8 would send the later ones back to eager without a word.
    for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)
    rows: list[dict] = []
    compile_seconds: list[float] = []
    compiles = 0
    groups = [g for g in COMPILE_GROUPS if g[0] < len(settings.models) and g[1] < len(settings.batches)]
    for model_index, batch_index, mode, cap in groups:
        name, img_size = settings.models[model_index]
        batch = settings.batches[batch_index]
        if mode == "reduce-overhead" and settings.device.type != "cuda":
            rows.append({"model": name, "batch": batch, "mode": mode, "config": "*", "attention": "*",
                         "status": "skipped: CUDA graphs need a CUDA device"})
            continue
        dense = build(name, img_size).to(settings.device, settings.dtype)
        variants = {v.key: v for v in variants_for(dense)}
        x = _inputs(dense, batch, settings)
        torch._dynamo.reset()
        forwards: dict = {}
        skipped: list[tuple[Variant, str]] = []
        with torch.inference_mode():
            for key in VARIANT_PRIORITY[:cap]:
                variant = variants[key]
                estimate = max(compile_seconds, default=FIRST_COMPILE_ESTIMATE_S.get(settings.device.type, 60.0))
                if compiles >= settings.max_compiles:
                    skipped.append((variant, f"skipped: {settings.max_compiles} compiles at most here"))
                    continue
                if clock.left() - reserve_s < 1.5 * estimate + 10:
                    skipped.append((variant, "skipped: time guard"))
                    continue
                options = {"backend": settings.compile_backend}
                if mode != "default":
                    options["mode"] = mode
                compiled = torch.compile(variant.module, fullgraph=True, **options)
                forward = variant.bind(compiled, x, cuda_graphs=mode == "reduce-overhead")
                begin = time.monotonic()
                try:
                    forward()
                    forward()   # reduce-overhead records its CUDA graph on a later call than the first
                    _synchronize(settings.device)
                except Exception as exc:   # one variant that does not compile must not hide the others
                    rows.append(_latency_row(name, batch, mode, variant, None,
                                             status=f"error: {_one_line(exc)}"))
                    continue
                finally:
                    compiles += 1
                compile_seconds.append(time.monotonic() - begin)
                forwards[key] = (variant, forward, compile_seconds[-1])
            if "dense" in forwards:
                timed = interleaved({k: f for k, (_, f, _) in forwards.items()}, settings)
                for key, (variant, forward, seconds) in forwards.items():
                    kernels = attention_kernels(forward, settings.device)
                    rows.append(_latency_row(name, batch, mode, variant, timed[key], compile_s=round(seconds, 1),
                                             kernels=kernels["families"], cuda_graph=kernels["cuda_graph"],
                                             status="ok"))
            else:
                skipped += [(v, "skipped: no dense reference compiled") for v, _, _ in forwards.values()]
        rows += [_latency_row(name, batch, mode, v, None, status=why) for v, why in skipped]
        del dense, variants, forwards
        torch._dynamo.reset()
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows, "backend": settings.compile_backend}


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("MPLBACKEND", "Agg")
    return env


# The exit status recorded for a command this script stopped at its time limit.
TIMED_OUT = -9


def _dsm_tune(arguments: list[str], timeout: float, cwd: Path) -> subprocess.CompletedProcess:
    """A dsm-tune command as an argument list; one that outlives `timeout` is killed and returns TIMED_OUT with
    the output it had written, so its entry still says how far it got."""
    command = [sys.executable, "-m", "dsm_tune.cli", *arguments]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=max(10.0, timeout), env=_env(),
                              cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        output = [part.decode(errors="replace") if isinstance(part, bytes) else (part or "")
                  for part in (exc.stdout, exc.stderr)]
        return subprocess.CompletedProcess(command, TIMED_OUT, output[0],
                                           output[1] + f"\n[gpu_check: stopped after {exc.timeout:.0f} s]")


def prepare_checkpoint(name: str, img_size: int | None, work: Path) -> Path:
    """Random weights saved once, so the measuring, verifying and studying processes all hold the same model."""
    from safetensors.torch import save_file

    path = work / f"{name}-random.safetensors"
    if not path.exists():
        model = build(name, img_size)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def generated_images(folder: Path, count: int, size: int = 160) -> Path:
    """Smooth random colour images (unlabeled: the agreement metric), for runs without a real image folder."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        coarse = torch.rand(3, 8, 8, generator=generator)
        image = torch.nn.functional.interpolate(coarse[None], size=(size, size), mode="bicubic")[0]
        pixels = (image.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"img{i:04d}.png")
    return folder


def _data_folder(args, settings: Settings, work: Path) -> Path:
    if args.data is not None:
        folder = Path(args.data)
        if not folder.is_dir():
            raise FileNotFoundError(f"--data {folder} is not a folder")
        return folder
    return generated_images(work / "images", max(settings.study_images, settings.cli_images))


def _tail(done: subprocess.CompletedProcess, chars: int = 1500) -> str:
    return (done.stdout + done.stderr)[-chars:]


def section_cli(settings: Settings, clock: Clock, work: Path, args) -> dict:
    """`dsm-tune measure` of a delayed hierarchical config, frozen with the measured figures, then `verify`."""
    from dsm_tune.merging import DSMConfig

    model_name = settings.cli_model
    img_size = settings.models[0][1]
    checkpoint = prepare_checkpoint(model_name, img_size, work)
    data = _data_folder(args, settings, work)
    model = build(model_name, img_size)
    cfg = configs_for(model)["dsm"][True]
    config_path = work / "cli-config.json"
    cfg.to_json(config_path)
    common = ["--checkpoint", str(checkpoint), "--device", settings.target, "--data", str(data),
              "--limit", str(settings.cli_images), "--metric", "agreement", "--cache-dir", str(work / "cache")]
    timing = ["--warmup", str(settings.warmup), "--repeats", str(max(settings.repeats, 5))]
    batch = ["--batch-size", str(settings.batches[0])] if settings.quick else []
    result: dict[str, Any] = {"model": model_name, "config": cfg.merge_dict()}
    begin = time.monotonic()
    measured = _dsm_tune(["measure", "--model", model_name, *common, *timing, *batch, "--config", str(config_path),
                          "--json"], timeout=min(240.0, clock.left()), cwd=work)
    result["measure"] = {"returncode": measured.returncode, "seconds": round(time.monotonic() - begin, 1)}
    if measured.returncode != 0:
        result["measure"]["tail"] = _tail(measured)
        raise RuntimeError(f"dsm-tune measure exited {measured.returncode}: {_tail(measured, 300)}")
    doc = json.loads(measured.stdout)
    result["measure"].update({k: doc.get(k) for k in ("accuracy_drop", "speedup", "speedup_iqr", "tokens_kept",
                                                      "flops_ratio")},
                             dense_ms=doc["dense"]["latency_ms"], merged_ms=doc["merged"]["latency_ms"])
    target = dict(doc["target"])
    frozen = cfg.replace(
        target={"profile": target.get("name"), **{k: target.get(k) for k in ("device", "dtype", "batch_size",
                                                                             "compile", "runtime")}},
        metrics={"metric": doc.get("metric"), "accuracy_drop": doc["accuracy_drop"], "speedup": doc["speedup"],
                 "latency_ms": doc["merged"]["latency_ms"], "baseline_latency_ms": doc["dense"]["latency_ms"],
                 "flops_ratio": doc["flops_ratio"], "tokens_kept": doc["tokens_kept"]},
        # How `measure` drew its images (its defaults), so verify draws the same ones.
        provenance={"study": "gpu-check", "trial": None, "data": str(data), "limit": settings.cli_images,
                    "data_order": "balanced", "data_seed": 0, "confirm": 0.0,
                    "data_fingerprint": (doc.get("data") or {}).get("fingerprint")})
    frozen_path = work / "cli-frozen.json"
    frozen.to_json(frozen_path)
    DSMConfig.from_dict(json.loads(frozen_path.read_text()))   # what verify will load must be a valid document
    begin = time.monotonic()
    verified = _dsm_tune(["verify", str(frozen_path), "--checkpoint", str(checkpoint), "--cache-dir",
                          str(work / "cache"), *timing], timeout=min(240.0, clock.left()), cwd=work)
    # Exit 1 is a verdict (out of tolerance), not a failure of the check; 2 is an error.
    result["verify"] = {"returncode": verified.returncode, "seconds": round(time.monotonic() - begin, 1),
                        "verdict": {0: "PASS", 1: "out of tolerance"}.get(verified.returncode, "error"),
                        "table": verified.stdout[-1500:]}
    if verified.returncode not in (0, 1):
        result["verify"]["tail"] = _tail(verified)
        raise RuntimeError(f"dsm-tune verify exited {verified.returncode}: {_tail(verified, 300)}")
    return result


def section_study(settings: Settings, clock: Clock, work: Path, args) -> dict:
    importlib.invalidate_caches()
    if importlib.util.find_spec("optuna") is None:
        return {"status": "skipped: optuna not installed (carry its wheels and pass --wheels DIR)"}
    missing = [name for name in ("mlflow", "pandas") if importlib.util.find_spec(name) is None]
    model_name = settings.cli_model
    checkpoint = prepare_checkpoint(model_name, settings.models[0][1], work)
    data = _data_folder(args, settings, work)
    studies = work / "studies"
    # The study's own --timeout stops it asking for trials; the process limit above it only catches a hang.
    timeout = max(30.0, clock.left() - 30.0)
    arguments = ["run", "--model", model_name, "--checkpoint", str(checkpoint), "--device", settings.target,
                 "--no-ray", "--no-mlflow", "--trials", str(settings.study_trials), "--data", str(data),
                 "--limit", str(settings.study_images), "--metric", "agreement", "--out", str(studies),
                 "--study", "gpu-check", "--timeout", str(round(timeout))]
    if settings.quick:
        arguments += ["--batch-size", str(settings.batches[0])]
    begin = time.monotonic()
    done = _dsm_tune(arguments, timeout=timeout + 60.0, cwd=work)
    result: dict[str, Any] = {"returncode": done.returncode, "seconds": round(time.monotonic() - begin, 1),
                              "model": model_name, "trials_asked": settings.study_trials,
                              "absent_packages": missing}
    trials_csv = studies / "gpu-check" / "trials.csv"
    if trials_csv.exists():
        trials = read_trials(trials_csv)
        result["trials"] = trials
        result["front"] = pareto_front(trials)
        for name in ("trials.csv", "best.json"):
            source = studies / "gpu-check" / name
            if source.exists():
                shutil.copy(source, Path(args.out) / f"study_{name}")
    if done.returncode != 0:
        result["tail"] = _tail(done)
        raise RuntimeError(f"dsm-tune run exited {done.returncode}: {_tail(done, 300)}")
    return result


def read_trials(path: Path) -> list[dict]:
    keep = ("number", "state", "accuracy_drop", "speedup", "latency_ms", "baseline_latency_ms", "tokens_kept",
            "params_proportional_attention")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    out = []
    for row in rows:
        item = {}
        for key in keep:
            value = row.get(key, "")
            try:
                item[key] = value if key == "state" else (value == "True") if key.startswith("params_") else float(
                    value)
            except ValueError:
                item[key] = None
        out.append(item)
    return out


def pareto_front(trials: list[dict]) -> list[dict]:
    """Measured trials no other beats on both accuracy drop (lower) and speedup (higher)."""
    measured = [t for t in trials if t.get("state") == "COMPLETE" and t.get("accuracy_drop") is not None
                and t.get("speedup") is not None]
    front = [t for t in measured if not any(
        o["accuracy_drop"] <= t["accuracy_drop"] and o["speedup"] >= t["speedup"]
        and (o["accuracy_drop"], o["speedup"]) != (t["accuracy_drop"], t["speedup"]) for o in measured)]
    return sorted(front, key=lambda t: t["speedup"])


# report ---------------------------------------------------------------------------------------------------------

def _fmt(value: Any, spec: str = ".3f") -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, (int, float)):
        return f"{value:{spec}}" if math.isfinite(value) else str(value)
    return str(value)


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return lines


def render_markdown(document: dict) -> str:
    sections = document["sections"]
    meta = document["meta"]
    env = sections.get("environment", {}).get("result", {})
    lines = [f"# gpu_check: {env.get('gpu', env.get('device', '?'))}, torch {env.get('torch', '?')}",
             "", f"{meta['date']}, {meta['elapsed_s']:.0f} s of a {meta['budget_s']:.0f} s budget"
             f"{', --quick' if meta['quick'] else ''}.", ""]
    lines += ["## Sections", ""]
    lines += _table(["section", "status", "seconds"],
                    [[name, s["status"], s.get("seconds")] for name, s in sections.items()])
    kernels = {}
    for row in sections.get("kernels", {}).get("result", {}).get("rows", []):
        kernels[(row["model"], row["batch"], row["config"], row["attention"])] = "+".join(row["families"]) or "?"
    latency = []
    for part in ("latency_eager", "latency_compiled"):
        for row in sections.get(part, {}).get("result", {}).get("rows", []):
            kernel = "+".join(row["kernels"]) if row.get("kernels") else kernels.get(
                (row["model"], row["batch"], row["config"], row["attention"]), "-")
            if row.get("cuda_graph"):
                kernel += " (graph)"
            latency.append([row["model"], str(row["batch"]), row["mode"], row["config"], row["attention"],
                            row.get("ms"), row.get("speedup"), row.get("speedup_iqr"), kernel,
                            row.get("status", "ok")])
    if latency:
        lines += ["", "## Latency (ms per forward, median; speedup = dense / merged, +- IQR of the round ratios)", ""]
        lines += _table(["model", "batch", "mode", "config", "prop. attention", "ms", "speedup", "+-", "SDPA kernel",
                         "status"], latency)
    bf16 = sections.get("bf16", {}).get("result", {}).get("rows", [])
    if bf16:
        lines += ["", "## bf16 against fp32 (same model, same images)", ""]
        lines += _table(["model", "config", "prop. attention", "max abs", "cosine", "output scale",
                         "merged vs dense cos (fp32)"],
                        [[r["model"], r["config"], r["attention"], r["max_abs"], r["cosine"], r["output_scale"],
                          r.get("merged_vs_dense_cosine_fp32")] for r in bf16])
    cli = sections.get("cli", {}).get("result")
    if cli:
        measure = cli.get("measure", {})
        lines += ["", "## dsm-tune measure / verify", "",
                  f"measure: exit {measure.get('returncode')}, speedup {_fmt(measure.get('speedup'))}, "
                  f"drop {_fmt(measure.get('accuracy_drop'))}; verify: "
                  f"{cli.get('verify', {}).get('verdict', '-')} (exit {cli.get('verify', {}).get('returncode')})"]
    study = sections.get("study", {})
    if study:
        result = study.get("result") or {}
        lines += ["", "## Study (dsm-tune run --no-ray --no-mlflow)", "", study["status"]
                  if study["status"] != "ok" else
                  f"{len(result.get('trials', []))} trials in {result.get('seconds')} s; front:"]
        if result.get("front"):
            lines += [""] + _table(["trial", "accuracy drop", "speedup", "latency ms", "prop. attention"],
                                   [[str(int(t["number"])), t["accuracy_drop"], t["speedup"], t["latency_ms"],
                                     t.get("params_proportional_attention")] for t in result["front"]])
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, document: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(render_markdown(document))


# main -----------------------------------------------------------------------------------------------------------

SECTIONS = ("environment", "latency_eager", "kernels", "bf16", "latency_compiled", "cli", "study")
# Seconds a section needs at least to be worth starting (full sizes, CPU --quick needs far less).
MIN_SECONDS = {"environment": 0, "latency_eager": 30, "kernels": 15, "bf16": 20, "latency_compiled": 60,
               "cli": 60, "study": 60}
# What the CLI (measure + verify of ViT-B) and a 12-trial ViT-B study are expected to take on the GPU.
RESERVE_S = {"cli": 90.0, "study": 150.0}


def compile_reserve(wanted: list[str]) -> float:
    """Seconds the compiled section leaves for the sections after it: a study only needs time when optuna is
    here to run it (the environment section installs any --wheels before)."""
    importlib.invalidate_caches()
    reserve = RESERVE_S["cli"] if "cli" in wanted else 0.0
    if "study" in wanted and importlib.util.find_spec("optuna") is not None:
        reserve += RESERVE_S["study"]
    return reserve


def make_sample(count: int, dest: Path, source: Path) -> int:
    """Copy `count` images, spread evenly over the source's class folders, keeping the ImageNet layout."""
    if count <= 0:
        raise SystemExit(f"gpu_check: --make-sample needs a positive count, got {count}")
    if not source.is_dir():
        raise SystemExit(f"gpu_check: image source {source} is not a folder (pass --sample-source DIR)")
    if dest.exists() and any(dest.iterdir()):
        raise SystemExit(f"gpu_check: {dest} exists and is not empty; choose a new folder")
    classes = sorted(p for p in source.iterdir() if p.is_dir())
    if not classes:
        raise SystemExit(f"gpu_check: {source} holds no class folders")
    step = max(1, len(classes) // count)
    picked = 0
    for folder in classes[::step]:
        images = sorted(p for p in folder.iterdir() if p.is_file())
        if not images:
            continue
        (dest / folder.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(images[0], dest / folder.name / images[0].name)
        picked += 1
        if picked == count:
            break
    print(f"gpu_check: copied {picked} images into {dest}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", default="cuda", help="torch device for the in-process sections (default cuda)")
    parser.add_argument("--target", default=None,
                        help="dsm-tune target profile for measure/verify/run (default h200 on cuda, cpu on cpu)")
    parser.add_argument("--quick", action="store_true", help="tiny ViT, batch 2 and 1, few repeats (CI, CPU)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="latency precision (default bfloat16; float32 with --quick)")
    parser.add_argument("--data", type=Path, default=None,
                        help="image folder for measure/verify/run (default: generated images)")
    parser.add_argument("--wheels", type=Path, default=None,
                        help="pip-install every wheel in this folder first (--no-index), e.g. optuna's")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"total time guard in seconds (default {DEFAULT_BUDGET_S:.0f}; 150 with --quick)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default inductor on cuda, eager (capture only) on cpu)")
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch folder for checkpoints, images, the study (default: a temporary one)")
    parser.add_argument("--make-sample", nargs=2, metavar=("N", "DIR"), default=None,
                        help="copy N images (ImageNet layout) from --sample-source into DIR and exit")
    parser.add_argument("--sample-source", type=Path, default=DEFAULT_SAMPLE_SOURCE,
                        help=f"where --make-sample copies from (default {DEFAULT_SAMPLE_SOURCE})")
    args = parser.parse_args(argv)
    if args.make_sample is None and args.out is None:
        parser.error("--out is required (or --make-sample N DIR)")
    unknown = sorted(set(filter(None, args.sections.split(","))) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.make_sample is not None:
        count, dest = args.make_sample
        try:
            number = int(count)
        except ValueError:
            raise SystemExit(f"gpu_check: --make-sample N DIR: N must be a whole number, got {count!r}") from None
        return make_sample(number, Path(dest), args.sample_source)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but no CUDA device is available here (use --device cpu)")
    settings = Settings(args)
    if settings.quick and settings.device.type == "cpu":
        # A smoke run on a shared CPU: one thread each (here and in the dsm-tune subprocesses) avoids threads
        # spinning against a neighbour's load, which slowed a tiny ViT's forward 8x on the 2-core dev machine.
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
    clock = Clock(args.budget_s if args.budget_s is not None else (150.0 if args.quick else DEFAULT_BUDGET_S))
    wanted = [s for s in SECTIONS if s in args.sections.split(",")]
    document = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": clock.budget_s,
                         "quick": args.quick, "argv": sys.argv[1:], "elapsed_s": 0.0},
                "sections": {}}
    random.seed(0)
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-")))
        work.mkdir(parents=True, exist_ok=True)
        for name in wanted:
            needed = 0 if settings.quick else MIN_SECONDS[name]
            if clock.left() < needed:
                document["sections"][name] = {"status": f"skipped: time guard ({clock.left():.0f} s left)"}
                continue
            begin = time.monotonic()
            entry: dict[str, Any]
            try:
                if name == "latency_compiled":
                    # Keep enough for the CLI and study sections after it.
                    reserve = 0.0 if settings.quick else compile_reserve(wanted)
                    result = section_latency_compiled(settings, clock, work, args, reserve_s=reserve)
                else:
                    result = SECTION_FUNCTIONS[name](settings, clock, work, args)
                status = result.pop("status", "ok") if isinstance(result, dict) else "ok"
                entry = {"status": status, "result": result}
            except Exception as exc:   # one section's failure is recorded, the rest still run
                entry = {"status": f"error: {_one_line(exc)}", "traceback": traceback.format_exc()[-3000:]}
            entry["seconds"] = round(time.monotonic() - begin, 1)
            document["sections"][name] = entry
            document["meta"]["elapsed_s"] = round(clock.elapsed(), 1)
            write_outputs(args.out, document)
            print(f"gpu_check: {name}: {entry['status']} ({entry['seconds']} s)", flush=True)
    document["meta"]["elapsed_s"] = round(clock.elapsed(), 1)
    write_outputs(args.out, document)
    print(f"gpu_check: wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'} "
          f"in {clock.elapsed():.0f} s")
    return 0


SECTION_FUNCTIONS = {"environment": section_environment, "latency_eager": section_latency_eager,
                     "kernels": section_kernels, "bf16": section_bf16, "cli": section_cli, "study": section_study}

if __name__ == "__main__":
    sys.exit(main())
