"""The merged model as an ONNX graph, with the frozen config it runs embedded in the file's metadata.

A frozen config has static shapes (every block merges a fixed count), so the patched model is captured whole by
`torch.export` and translated by PyTorch's ONNX exporter; the merge is gathers and scatter-adds, which ONNX
expresses (no `scatter_reduce(mean)`). The JSON config stays the hand-off contract: the ONNX file is an extra for
teams serving with ONNX Runtime, or building a TensorRT engine from it.

onnx, onnxscript and onnxruntime are the `dsm-tune[onnx]` extra, imported only inside these functions, so
`import dsm_tune.merging` still loads torch and timm only.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from dsm_tune.errors import DSMTuneError

from .config import DSMConfig, load_config
from .patch import applied_config, apply_dsm, is_patched, remove_dsm

# The metadata_props key holding the frozen config's JSON.
ONNX_CONFIG_KEY = "dsm_tune.config"
INPUT_NAME = "images"
OUTPUT_NAME = "output"
ONNX_EXTRA_HINT = "install the ONNX extra: pip install 'dsm-tune[onnx]'"


class OnnxExportError(DSMTuneError):
    """The model cannot be written (or read back) as an ONNX graph, or the ONNX extra is missing."""


def require_onnx_packages(*modules: str) -> None:
    """Refuse in one line, naming the extra, when an optional ONNX package is missing."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise OnnxExportError(f"{module} is not installed; {ONNX_EXTRA_HINT}") from None


@contextlib.contextmanager
def config_applied(model: nn.Module, config: DSMConfig | None) -> Iterator[nn.Module]:
    """`model` running `config` for the duration; afterwards it is patched (or not) exactly as before.

    `config=None` leaves the model as it is: dense, or running the config already applied.
    """
    if config is None:
        yield model
        return
    previous = applied_config(model)
    apply_dsm(model, config)
    try:
        yield model
    finally:
        if previous is not None:
            apply_dsm(model, previous)
        elif is_patched(model):
            remove_dsm(model)


def example_input(model: nn.Module, batch_size: int) -> torch.Tensor:
    """A batch of the size the model was built for, on its device and in its dtype."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise OnnxExportError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not hasattr(model, "patch_embed"):
        raise OnnxExportError(f"{type(model).__name__} is not a timm VisionTransformer (it has no patch_embed)")
    parameter = next(model.parameters())
    channels = int(model.patch_embed.proj.in_channels)
    height, width = (int(v) for v in model.patch_embed.img_size)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, channels, height, width, generator=generator).to(parameter.device,
                                                                                   parameter.dtype)


def export_onnx(model: nn.Module, config: DSMConfig | None, path: str | Path, batch_size: int = 1, *,
                opset: int | None = None) -> Path:
    """Write `model` running `config` as an ONNX graph at `path`, the config's JSON in its metadata_props.

    The graph takes a fixed `batch_size` (DSM's merge counts are static) at the model's input size, device and
    dtype. `config=None` exports the model as it is (the dense model, or one already patched with `apply_dsm`).
    The model is left patched (or not) as it was. Returns the path.
    """
    require_onnx_packages("onnx", "onnxscript")
    path = Path(path)
    if not isinstance(model, nn.Module):
        raise OnnxExportError(f"expected a timm VisionTransformer, got {type(model).__name__}")
    with config_applied(model, config):
        inputs = example_input(model, batch_size)
        was_training = model.training
        model.eval()
        try:
            program = _onnx_program(model, inputs, opset)
        finally:
            model.train(was_training)
        bound = applied_config(model)
    if bound is not None:
        program.model.metadata_props[ONNX_CONFIG_KEY] = bound.to_json()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        program.save(str(path))
    except OSError as exc:
        raise OnnxExportError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def _onnx_program(model: nn.Module, inputs: torch.Tensor, opset: int | None):
    # The constant folder logs a warning for each node it declines to fold; the graph is correct without it.
    folder_log = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folder_log.level
    folder_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad():
            return torch.onnx.export(model, (inputs,), dynamo=True, verbose=False, opset_version=opset,
                                     input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    except Exception as exc:  # the exporter raises many types; the user gets its first line
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxExportError(f"cannot export {type(model).__name__} to ONNX: {message}") from exc
    finally:
        folder_log.setLevel(level)


def onnx_relative_error(model: nn.Module, config: DSMConfig | None, batch_size: int = 1) -> float:
    """How far ONNX Runtime's outputs of the exported graph are from PyTorch's, on one random batch.

    The largest absolute difference divided by max(1, the largest absolute PyTorch output), so one bound fits
    logits and embeddings of any scale.
    """
    require_onnx_packages("onnx", "onnxscript", "onnxruntime")
    import onnxruntime

    with tempfile.TemporaryDirectory(prefix="dsm-tune-onnx-") as folder:
        path = export_onnx(model, config, Path(folder) / "model.onnx", batch_size)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        with config_applied(model, config), torch.inference_mode():
            inputs = example_input(model, batch_size)
            expected = model(inputs).float().cpu()
        (actual,) = session.run(None, {INPUT_NAME: inputs.float().cpu().numpy()})
    difference = (torch.from_numpy(actual) - expected).abs().max().item()
    return difference / max(1.0, expected.abs().max().item())


def read_onnx_config(path: str | Path) -> DSMConfig | None:
    """The frozen config embedded by `export_onnx` (None for a dense graph), validated like a JSON file."""
    require_onnx_packages("onnx")
    import onnx

    path = Path(path)
    if not path.is_file():
        raise OnnxExportError(f"ONNX file not found: {path}")
    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors share no base class
        raise OnnxExportError(f"cannot read ONNX file {path}: {type(exc).__name__}") from exc
    for entry in graph.metadata_props:
        if entry.key == ONNX_CONFIG_KEY:
            return load_config(entry.value)
    return None


__all__ = ["ONNX_CONFIG_KEY", "INPUT_NAME", "OUTPUT_NAME", "OnnxExportError", "config_applied", "example_input",
           "export_onnx", "onnx_relative_error", "read_onnx_config", "require_onnx_packages"]
