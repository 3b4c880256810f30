"""Hardware target profiles (`--device NAME`): the device, precision and batch size latency is measured at.

The profiles are data, in `targets.yaml` next to this file; a user may also pass the path of a YAML file holding
one profile (the same fields) to describe hardware the built-in table does not know.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
import yaml

from dsm_tune.errors import DSMTuneError

PROFILES_PATH = Path(__file__).with_name("targets.yaml")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_FIELDS = ("device", "dtype", "batch_size", "compile", "ray_resources", "num_gpus")
_OPTIONAL_FIELDS = ("runtime",)
# What runs the forward being timed: PyTorch (eager or torch.compile), or a graph exported with export_onnx.
RUNTIMES = ("torch", "onnxruntime", "tensorrt")
_DEVICE_PATTERN = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


class TargetError(DSMTuneError):
    """An unknown or malformed target profile, or a target whose device is not present."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    device: str
    dtype: str
    batch_size: int
    compile: bool
    ray_resources: dict
    num_gpus: float
    runtime: str = "torch"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        mode = self.runtime if self.runtime != "torch" else ("compiled" if self.compile else "eager")
        return f"{self.name} ({self.device}, {self.dtype}, batch {self.batch_size}, {mode})"


def _read_profiles(path: Path) -> dict:
    try:
        profiles = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise TargetError(f"cannot read target profiles {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(profiles, dict):
        raise TargetError(f"target file {path} must map profile names to fields")
    return profiles


def available_targets() -> list[str]:
    return sorted(_read_profiles(PROFILES_PATH))


def _validated(name: str, fields: object, origin: str) -> Target:
    if not isinstance(fields, dict):
        raise TargetError(f"target '{name}' in {origin} must be a mapping of {', '.join(_FIELDS)} "
                          f"(optionally {', '.join(_OPTIONAL_FIELDS)})")
    missing = [f for f in _FIELDS if f not in fields]
    unknown = sorted(set(fields) - set(_FIELDS) - set(_OPTIONAL_FIELDS))
    if missing or unknown:
        problem = f"missing {', '.join(missing)}" if missing else f"unknown field(s) {', '.join(unknown)}"
        raise TargetError(f"target '{name}' in {origin}: {problem}")
    device, dtype, batch_size = fields["device"], fields["dtype"], fields["batch_size"]
    if not isinstance(device, str) or not _DEVICE_PATTERN.match(device):
        raise TargetError(f"target '{name}': device must be cpu, mps, cuda or cuda:N, got {device!r}")
    if dtype not in DTYPES:
        raise TargetError(f"target '{name}': dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise TargetError(f"target '{name}': batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(fields["compile"], bool):
        raise TargetError(f"target '{name}': compile must be true or false, got {fields['compile']!r}")
    resources = fields["ray_resources"] or {}
    if not isinstance(resources, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
            for k, v in resources.items()):
        raise TargetError(f"target '{name}': ray_resources must map resource names to positive numbers")
    num_gpus = fields["num_gpus"]
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, (int, float)) or num_gpus < 0:
        raise TargetError(f"target '{name}': num_gpus must be a number >= 0, got {num_gpus!r}")
    if device.startswith("cuda") and num_gpus == 0:
        raise TargetError(f"target '{name}': a cuda target must reserve a GPU (num_gpus > 0)")
    runtime = fields.get("runtime", "torch")
    _check_runtime(name, runtime, device, dtype, fields["compile"])
    return Target(name=name, device=device, dtype=dtype, batch_size=batch_size, compile=fields["compile"],
                  ray_resources=dict(resources), num_gpus=float(num_gpus), runtime=runtime)


def _check_runtime(name: str, runtime: object, device: str, dtype: str, compile: bool) -> None:
    if runtime not in RUNTIMES:
        raise TargetError(f"target '{name}': runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime != "torch" and compile:
        raise TargetError(f"target '{name}': compile applies to the torch runtime only, not {runtime}")
    if runtime == "onnxruntime" and (device != "cpu" or dtype != "float32"):
        raise TargetError(f"target '{name}': the onnxruntime runtime times float32 graphs on the CPU "
                          f"(got {device}, {dtype})")
    if runtime == "tensorrt" and not device.startswith("cuda"):
        raise TargetError(f"target '{name}': the tensorrt runtime needs a cuda device, got {device}")


def check_device_present(target: Target) -> None:
    """Refuse a target whose device this process cannot use: a GPU target must never silently run on CPU."""
    if target.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TargetError(f"target '{target.name}' needs a CUDA GPU ({target.device}) but none is available here; "
                              "use --device cpu, or run on a machine with the GPU")
        index = int(target.device.split(":")[1]) if ":" in target.device else 0
        if index >= torch.cuda.device_count():
            raise TargetError(f"target '{target.name}' asks for {target.device} but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    elif target.device == "mps" and not torch.backends.mps.is_available():
        raise TargetError(f"target '{target.name}' needs Apple MPS, which is not available here")
    if target.runtime == "onnxruntime":
        from dsm_tune.merging.export import OnnxExportError, require_onnx_packages

        try:
            require_onnx_packages("onnx", "onnxscript", "onnxruntime")
        except OnnxExportError as exc:
            raise TargetError(f"target '{target.name}' times ONNX Runtime, but {exc}") from None


def load_target(name: str, batch_size: int | None = None, dtype: str | None = None, compile: bool | None = None,
                check_available: bool = True) -> Target:
    """The named profile (or a one-profile YAML file) with flag overrides applied.

    check_available=False only resolves the profile (the driver does that for a remote cluster's devices).
    """
    if not isinstance(name, str) or not name:
        raise TargetError("no target name given")
    path = Path(name)
    if name.endswith((".yaml", ".yml")):
        if not path.is_file():
            raise TargetError(f"target file {path} does not exist")
        profiles = _read_profiles(path)
        if len(profiles) != 1:
            raise TargetError(f"target file {path} must hold exactly one profile, found {len(profiles)}")
        (profile_name, fields), = profiles.items()
        origin = str(path)
    else:
        profiles = _read_profiles(PROFILES_PATH)
        key = name.lower()
        if key not in profiles:
            raise TargetError(f"unknown target '{name}'; known targets: {', '.join(sorted(profiles))} "
                              "(or the path of a .yaml profile)")
        profile_name, fields, origin = key, profiles[key], str(PROFILES_PATH)
    fields = dict(fields) if isinstance(fields, dict) else fields
    if isinstance(fields, dict):
        overrides = {"batch_size": batch_size, "dtype": dtype, "compile": compile}
        fields.update({k: v for k, v in overrides.items() if v is not None})
    target = _validated(str(profile_name), fields, origin)
    if check_available:
        check_device_present(target)
    return target
