"""The embedded demo: a small timm ViT trained on Fashion-MNIST, shipped with a slice of the test split.

`dsm-tune run --model demo` must work on a fresh machine with no downloads, so the weights
(`assets/demo_vit_fmnist.safetensors`) and 2,000 stratified test images (`assets/fashion_mnist_test_slice.npz`)
live inside the package. Importing this module registers the architecture with timm as `dsm_tune_demo_vit`, so
`timm.create_model`, `resolve_data_config` and `create_transform` treat it like any other timm model.

The weights are produced by `scripts/train_demo.py`, which imports the architecture and preprocessing constants
from here so that training and evaluation cannot drift apart.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import torch
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer

from dsm_tune.errors import DSMTuneError

DEMO_MODEL_NAME = "dsm_tune_demo_vit"

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEMO_WEIGHTS_PATH = ASSETS_DIR / "demo_vit_fmnist.safetensors"
DEMO_MODEL_CARD_PATH = ASSETS_DIR / "demo_vit_fmnist.json"
DEMO_SLICE_PATH = ASSETS_DIR / "fashion_mnist_test_slice.npz"

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# The usual pixel statistics of the 28x28 Fashion-MNIST train split in [0, 1]. Upsampling to 32x32 smooths the
# images (std ~0.335, recorded in the model card); the weights were trained with these constants, so they stay.
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

# Patch 2 on a 32x32 input gives a 16x16 grid (256 patch tokens), which is divisible by 4**3 windows, so merge
# hierarchy depths 0..3 all fit, as they do for ViT-B/16 at 224 (14x14 is not, hence 32 rather than 28).
DEMO_ARCHITECTURE = dict(
    img_size=32,
    patch_size=2,
    in_chans=1,
    num_classes=len(FASHION_MNIST_CLASSES),
    embed_dim=64,
    depth=6,
    num_heads=2,
    mlp_ratio=2.0,
    class_token=True,
    global_pool="token",
)

DEMO_SLICE_PER_CLASS = 200
DEMO_SLICE_SEED = 0

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


class DemoAssetError(DSMTuneError):
    """A file the embedded demo ships with (weights, data slice) is missing or unreadable."""


class FashionMNISTError(DSMTuneError):
    """The Fashion-MNIST IDX files are absent or malformed."""


# timm's register_model reads the pretrained cfg from this module-level name.
default_cfgs = {
    DEMO_MODEL_NAME: dict(
        file=str(DEMO_WEIGHTS_PATH),
        input_size=(1, 32, 32),
        fixed_input_size=True,
        interpolation="bilinear",
        crop_pct=1.0,
        crop_mode="center",
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
        num_classes=len(FASHION_MNIST_CLASSES),
        label_names=FASHION_MNIST_CLASSES,
        first_conv="patch_embed.proj",
        classifier="head",
        description="dsm-tune demo ViT (patch 2, 16x16 grid) trained on Fashion-MNIST by scripts/train_demo.py",
    )
}


@register_model
def dsm_tune_demo_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The demo architecture; `pretrained=True` loads the committed weights through timm's own loader."""
    return build_model_with_cfg(VisionTransformer, DEMO_MODEL_NAME, pretrained, **{**DEMO_ARCHITECTURE, **kwargs})


def build_demo_model(pretrained: bool = True) -> torch.nn.Module:
    """The demo ViT in eval mode, with the committed weights unless `pretrained=False`."""
    model = dsm_tune_demo_vit(pretrained=False)
    if pretrained:
        model.load_state_dict(_load_demo_weights(), strict=True)
    return model.eval()


def _load_demo_weights() -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not DEMO_WEIGHTS_PATH.is_file():
        raise DemoAssetError(
            f"demo model weights not found at {DEMO_WEIGHTS_PATH}; reinstall dsm-tune or regenerate them with "
            "scripts/train_demo.py"
        )
    try:
        return load_file(str(DEMO_WEIGHTS_PATH))
    except (SafetensorError, OSError) as exc:
        raise DemoAssetError(f"demo model weights at {DEMO_WEIGHTS_PATH} are unreadable: {exc}") from None


def demo_model_card() -> dict:
    """What scripts/train_demo.py recorded: architecture, seed, epochs, train time, test accuracies."""
    if not DEMO_MODEL_CARD_PATH.is_file():
        raise DemoAssetError(f"demo model card not found at {DEMO_MODEL_CARD_PATH}")
    return json.loads(DEMO_MODEL_CARD_PATH.read_text())


def load_fashion_mnist(split: str, root: Path | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST `split` ("train" or "test") from its IDX files (plain or .gz) under `root`.

    Returns images as uint8 (N, 28, 28) and labels as int64 (N,).
    """
    if split not in _IDX_FILES:
        raise FashionMNISTError(f"unknown Fashion-MNIST split {split!r}; expected one of {sorted(_IDX_FILES)}")
    root = FASHION_MNIST_ROOT if root is None else Path(root)
    images_name, labels_name = _IDX_FILES[split]
    images = _read_idx(_find_idx_file(root, images_name), _IDX_IMAGES_MAGIC)
    labels = _read_idx(_find_idx_file(root, labels_name), _IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise FashionMNISTError(
            f"Fashion-MNIST {split} split under {root} has {images.shape[0]} images but {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise FashionMNISTError(
            f"Fashion-MNIST {split} labels under {root} contain class {int(labels.max())}; expected 0..9"
        )
    return images, labels.astype(np.int64)


def _find_idx_file(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise FashionMNISTError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}; install the Debian package dataset-fashion-mnist "
        "or download the IDX files from https://github.com/zalandoresearch/fashion-mnist into that folder"
    )


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise FashionMNISTError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4:
        raise FashionMNISTError(f"IDX file {path} is truncated ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise FashionMNISTError(
            f"IDX file {path} has magic number {magic:#010x}, expected {expected_magic:#010x} "
            "(wrong file or not an IDX file)"
        )
    ndim = magic & 0xFF
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise FashionMNISTError(f"IDX file {path} is truncated inside its header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_bytes = int(np.prod(shape))
    if len(raw) - header_end != expected_bytes:
        raise FashionMNISTError(
            f"IDX file {path} holds {len(raw) - header_end} data bytes but its header {shape} needs {expected_bytes}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_end).reshape(shape).copy()


def stratified_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of `per_class` examples of every class, drawn reproducibly with `seed`."""
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if members.size < per_class:
            raise FashionMNISTError(f"class {int(cls)} has only {members.size} examples, fewer than {per_class}")
        chosen.append(rng.permutation(members)[:per_class])
    return np.sort(np.concatenate(chosen))


def load_demo_slice() -> tuple[np.ndarray, np.ndarray]:
    """The committed Fashion-MNIST test slice: uint8 (2000, 28, 28) images and int64 labels."""
    images, labels, _ = _read_slice_archive()
    return images, labels


def demo_slice_indices() -> np.ndarray:
    """Positions in the Fashion-MNIST test split of the committed slice's images (their provenance)."""
    return _read_slice_archive()[2]


def _read_slice_archive() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not DEMO_SLICE_PATH.is_file():
        raise DemoAssetError(
            f"demo data slice not found at {DEMO_SLICE_PATH}; reinstall dsm-tune or regenerate it with "
            "scripts/train_demo.py --slice-only"
        )
    try:
        with np.load(DEMO_SLICE_PATH, allow_pickle=False) as archive:
            images, labels, indices = archive["images"], archive["labels"], archive["test_indices"]
    except (OSError, ValueError, KeyError) as exc:
        raise DemoAssetError(f"demo data slice at {DEMO_SLICE_PATH} is unreadable: {exc}") from None
    return images, labels.astype(np.int64), indices.astype(np.int64)
