"""Model names, aliases and construction: timm models with optional local weights.

Everything that turns a user's `--model/--checkpoint/--pretrained/--img-size` into an eval-mode module lives here,
so the CLI, the trial evaluator and the benchmarks build models the same way.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import pickle
from pathlib import Path

import torch
import timm

from dsm_tune.errors import DSMTuneError

DEMO_MODEL_NAME = "dsm_tune_demo_vit"

# Short names users type; each maps to the timm model it most commonly means.
MODEL_ALIASES: dict[str, str] = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "vit_huge": "vit_huge_patch14_224",
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
    "deit_tiny_distilled": "deit_tiny_distilled_patch16_224",
    "deit_small_distilled": "deit_small_distilled_patch16_224",
    "deit_base_distilled": "deit_base_distilled_patch16_224",
    "deit3_small": "deit3_small_patch16_224",
    "deit3_medium": "deit3_medium_patch16_224",
    "deit3_base": "deit3_base_patch16_224",
    "deit3_large": "deit3_large_patch16_224",
    "deit3_huge": "deit3_huge_patch14_224",
    "dinov2_small": "vit_small_patch14_dinov2",
    "dinov2_base": "vit_base_patch14_dinov2",
    "dinov2_large": "vit_large_patch14_dinov2",
    "dinov2_giant": "vit_giant_patch14_dinov2",
    "dinov2_small_reg": "vit_small_patch14_reg4_dinov2",
    "dinov2_base_reg": "vit_base_patch14_reg4_dinov2",
    "dinov2_large_reg": "vit_large_patch14_reg4_dinov2",
    "dinov2_giant_reg": "vit_giant_patch14_reg4_dinov2",
    "demo": DEMO_MODEL_NAME,
}

# Wrappers training scripts commonly put around a state dict.
_STATE_DICT_WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")


class ModelError(DSMTuneError):
    """An unknown model name, or weights that cannot be loaded into it."""


def _register_demo() -> None:
    # The demo module registers its model with timm on import; imported lazily so the rest of the package does
    # not depend on it being present.
    import dsm_tune.evaluation.demo  # noqa: F401


def resolve_model_name(name: str) -> str:
    """Map an alias or timm name (optionally with a pretrained tag, `name.tag`) to the timm name to build."""
    if not isinstance(name, str) or not name.strip():
        raise ModelError("no model name given")
    name = name.strip()
    resolved = MODEL_ALIASES.get(name, name)
    if resolved == DEMO_MODEL_NAME:
        _register_demo()
        return resolved
    if timm.is_model(resolved):
        return resolved
    candidates = sorted(set(timm.list_models()) | set(MODEL_ALIASES))
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f"; did you mean: {', '.join(close)}?" if close else "; aliases: " + ", ".join(sorted(MODEL_ALIASES))
    raise ModelError(f"unknown model '{name}' (not an alias and not a timm model){hint}")


def is_demo_model(name: str) -> bool:
    return MODEL_ALIASES.get(name, name) == DEMO_MODEL_NAME


def read_checkpoint(path: Path | str) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors or a torch file (weights only: no pickled code is ever executed)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            import safetensors.torch

            state = safetensors.torch.load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _weights_only_refusal(path, exc) from None
    except Exception as exc:  # any parse failure is the file's fault, reported in one line
        raise ModelError(f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    for key in _STATE_DICT_WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"checkpoint {path} does not hold a state dict of tensors")
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _weights_only_refusal(path: Path, exc: pickle.UnpicklingError) -> ModelError:
    """Our own line for what torch's weights-only unpickler rejects: torch's message advises loading with
    weights_only=False, i.e. running whatever code the file holds, which dsm-tune never does."""
    text = str(exc)
    # Every rejection of a class or function the file references names it as a GLOBAL or asks to allowlist it.
    if "GLOBAL" in text or "allowlist" in text:
        return ModelError(f"{path} contains Python objects, not a plain state dict; refused (save "
                          "model.state_dict() with torch.save, or as safetensors)")
    marker = "WeightsUnpickler error:"
    detail = text.split(marker, 1)[1].strip().splitlines()[0] if marker in text else type(exc).__name__
    return ModelError(f"cannot read checkpoint {path}: not a torch state dict file ({detail})")


def _head_classes(state: dict[str, torch.Tensor]) -> int | None:
    """Classes of the checkpoint's classifier head: its row count, 0 when it has none."""
    head = state.get("head.weight")
    if head is not None and head.ndim == 2:
        return int(head.shape[0])
    if not any(k.startswith("head.") for k in state):
        return 0
    return None


def _checkpoint_img_size(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """Input size implied by the checkpoint's position embedding when it differs from the model's default."""
    pos = state.get("pos_embed")
    own = getattr(model, "pos_embed", None)
    patch_embed = getattr(model, "patch_embed", None)
    if pos is None or own is None or patch_embed is None or pos.shape == own.shape:
        return None
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 0))
    grid = math.isqrt(pos.shape[1] - prefix)
    if grid * grid != pos.shape[1] - prefix:
        return None
    return grid * int(patch_embed.patch_size[0])


def build_model(name: str, checkpoint: Path | str | None = None, pretrained: bool = False,
                num_classes: int | None = None, img_size: int | None = None) -> torch.nn.Module:
    """Build a timm model in eval mode.

    With a checkpoint, the head size and the input size are taken from it unless given (a DINOv2 backbone saved at
    224 loads into `vit_small_patch14_dinov2`, whose default is 518), and loading is strict.
    The demo model always carries its committed weights unless a checkpoint replaces them.
    """
    timm_name = resolve_model_name(name)
    if img_size is not None and (not isinstance(img_size, int) or img_size <= 0):
        raise ModelError(f"--img-size must be a positive integer, got {img_size!r}")
    state = read_checkpoint(checkpoint) if checkpoint is not None else None

    kwargs: dict = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    elif state is not None and _head_classes(state) is not None:
        kwargs["num_classes"] = _head_classes(state)
    if img_size is not None:
        kwargs["img_size"] = img_size

    if timm_name == DEMO_MODEL_NAME and state is None and not kwargs:
        from dsm_tune.evaluation.demo import build_demo_model

        return build_demo_model(pretrained=True).eval()

    model = _create(timm_name, pretrained and state is None, kwargs)
    if state is not None:
        if img_size is None:
            implied = _checkpoint_img_size(model, state)
            if implied is not None:
                model = _create(timm_name, False, {**kwargs, "img_size": implied})
        _load_strict(model, state, timm_name, Path(checkpoint))
    return model.eval()


def _create(timm_name: str, pretrained: bool, kwargs: dict) -> torch.nn.Module:
    try:
        return timm.create_model(timm_name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if pretrained:
            raise ModelError(f"cannot fetch pretrained weights for {timm_name} ({first}); offline machines need "
                             "--checkpoint PATH or the weights in the local Hugging Face cache") from exc
        raise ModelError(f"cannot build {timm_name} with {kwargs}: {first}") from exc


def _load_strict(model: torch.nn.Module, state: dict, timm_name: str, path: Path) -> None:
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    wrong_shape = sorted(k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape))
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
            problems.append(f"{label} keys: {shown}")
    if problems:
        raise ModelError(f"checkpoint {path} does not fit {timm_name}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def input_size(model: torch.nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) the model is built for, read from its patch embedding.

    The pretrained config may describe another resolution (DINOv2 says 518 for a model built at 224); the patch
    embedding is what the forward pass accepts.
    """
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
        height, width = patch_embed.img_size
        proj = getattr(patch_embed, "proj", None)
        channels = int(proj.in_channels) if proj is not None and hasattr(proj, "in_channels") else 3
        return channels, int(height), int(width)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        return tuple(int(v) for v in cfg["input_size"])  # type: ignore[return-value]
    raise ModelError(f"cannot tell the input size of {type(model).__name__}: no patch embedding or input_size")


def model_identity(model: torch.nn.Module) -> dict:
    """What determines a model's outputs besides its weights: architecture name, class, input and head sizes."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {
        "architecture": cfg.get("architecture", type(model).__name__),
        "class": type(model).__qualname__,
        "input_size": list(input_size(model)),
        "num_classes": int(getattr(model, "num_classes", -1)),
        "global_pool": str(getattr(model, "global_pool", "")),
    }


def weights_digest(model: torch.nn.Module) -> str:
    """Hash of every parameter and buffer (name, dtype, shape, bytes): changes whenever the weights do."""
    digest = hashlib.blake2b(digest_size=16)
    for key, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
