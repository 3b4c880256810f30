"""Evaluation data: image folders and named data sets, preprocessed the way the model was trained.

Everything a worker would trip over (missing or empty folders, unreadable images, classes the model's head does not
have) is found here, when the data is loaded, so a study fails before it starts any worker.

Labels:
- folders named by ImageNet synsets (`n01440764`, ...) get their standard ImageNet-1k index, also when only some of
  the 1,000 classes are present (a validation slice rarely holds them all);
- other class folders map in sorted order (a model fine-tuned on exactly those classes);
- a folder of images without class folders is unlabeled (label -1): only label-free metrics apply.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dsm_tune.errors import DSMTuneError
from dsm_tune.evaluation.models import input_size

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif"})
NAMED_DATASETS = ("fashion-mnist", "cifar10", "demo-fashion-mnist")
IMAGENET_WNIDS_PATH = Path(__file__).with_name("assets") / "imagenet_wnids.txt"
UNLABELED = -1
# Bump when the way data is selected or preprocessed changes, so cached dense outputs are not reused.
_FINGERPRINT_VERSION = "2"


class DataError(DSMTuneError):
    """Evaluation data that cannot be used: missing, empty, unreadable, or not fitting the model."""


def cache_root() -> Path:
    """Where downloads and cached dense outputs go: $DSM_TUNE_CACHE, else $XDG_CACHE_HOME/dsm-tune."""
    if os.environ.get("DSM_TUNE_CACHE"):
        return Path(os.environ["DSM_TUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "dsm-tune"


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k synsets in class-index order (sorted)."""
    return tuple(IMAGENET_WNIDS_PATH.read_text().split())


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """A parsed `--data` value: a folder, or a named data set with an optional `:train`/`:test` split."""

    source: str
    named: bool
    split: str = "test"

    @classmethod
    def parse(cls, spec: str | os.PathLike) -> "DataSpec":
        text = str(spec).strip()
        if not text:
            raise DataError("empty --data value")
        name, _, split = text.partition(":")
        if name.lower() in NAMED_DATASETS and not Path(text).exists():
            split = split or "test"
            if split not in ("train", "test") or (name.lower() == "demo-fashion-mnist" and split != "test"):
                raise DataError(f"unknown split '{split}' for data set {name} (use {name}:test"
                                + (" or :train)" if name.lower() != "demo-fashion-mnist" else ")"))
            return cls(source=name.lower(), named=True, split=split)
        path = Path(text).expanduser()
        if not path.exists():
            raise DataError(f"data folder {path} does not exist (and '{text}' is not a named data set: "
                            f"{', '.join(NAMED_DATASETS)})")
        if not path.is_dir():
            raise DataError(f"--data {path} is not a folder of images")
        return cls(source=str(path.resolve()), named=False)


@dataclasses.dataclass
class EvalData:
    """Preprocessed evaluation images in evaluation order (class-interleaved, so any prefix is stratified)."""

    dataset: torch.utils.data.Dataset
    labels: torch.Tensor  # int64, UNLABELED (-1) where the data has no labels
    labeled: bool
    fingerprint: str
    num_images: int
    description: str
    kind: str  # "imagenet-folders" | "class-folders" | "unlabeled-folder" | a named data set
    class_names: tuple[str, ...] = ()

    def batches(self, batch_size: int, threads: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) batches in order; images are decoded and transformed on a few threads."""
        threads = threads or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for start in range(0, self.num_images, batch_size):
                stop = min(start + batch_size, self.num_images)
                items = list(pool.map(self.dataset.__getitem__, range(start, stop)))
                yield torch.stack([img for img, _ in items]), self.labels[start:stop]


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], labels: list[int], transform: Callable, mode: str):
        self.paths, self.labels, self.transform, self.mode = paths, labels, transform, mode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                image = image.convert(self.mode)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(f"cannot decode image {path}: {exc}") from exc
        return self.transform(image), self.labels[index]


class _ImageArrays(torch.utils.data.Dataset):
    """uint8 arrays (N, H, W) or (N, H, W, 3) fed to the model's transform as PIL images, like files would be."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable, mode: str):
        self.images, self.labels, self.transform, self.mode = images, labels, transform, mode

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.images[index]).convert(self.mode)
        return self.transform(image), int(self.labels[index])


def model_transform(model: torch.nn.Module) -> tuple[Callable, str, dict]:
    """The model's own eval preprocessing at the size the model is built for, its PIL mode, and its config."""
    from timm.data import create_transform, resolve_data_config

    channels, height, width = input_size(model)
    if channels not in (1, 3):
        raise DataError(f"model takes {channels}-channel input; only 1 (grayscale) or 3 (RGB) channels are supported")
    config = dict(resolve_data_config(model=model))
    # pretrained_cfg can name another resolution (DINOv2: 518) than the one the model was built at.
    config["input_size"] = (channels, height, width)
    for key in ("mean", "std"):
        values = tuple(float(v) for v in config[key])
        if len(values) != channels:
            values = (sum(values) / len(values),) * channels
        config[key] = values
    transform = create_transform(**config, is_training=False)
    return transform, ("L" if channels == 1 else "RGB"), config


# How a prefix of the evaluation order is drawn. "balanced": rounds of one image per class, the classes of each round
# in a seeded random order, so any prefix is a random sample spread over the whole label range. "class-prefix": the
# order of studies made before it, whose rounds ran in label order, so a prefix shorter than the class count held
# the lowest class indices only; kept so such a study resumes on the very images it was scored on.
ORDERS = ("balanced", "class-prefix")
DEFAULT_ORDER = "balanced"
# What a stratified split of the data is used for: the search scores configs on one part, the confirmation of the
# front on the other, which the search never sees.
PARTS = ("all", "search", "confirm")


def evaluation_order(labels: np.ndarray, limit: int | None, seed: int, order: str = DEFAULT_ORDER) -> np.ndarray:
    """Indices to evaluate: shuffled within each class (by `seed`), then taken one per class in turn.

    Any prefix of the order is class-stratified, so `--limit N` keeps the class balance and a chunked evaluation
    that stops early has still seen every class it could. With the balanced order (the default) the classes of a
    round come in random order, so a prefix shorter than the number of classes is spread over all of them.
    """
    if order not in ORDERS:
        raise DataError(f"unknown evaluation order {order!r}; choose one of {', '.join(ORDERS)}")
    count = len(labels)
    rng = np.random.default_rng(seed)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if (labels == UNLABELED).all():
        indices = rng.permutation(count)
    else:
        per_class = [rng.permutation(np.flatnonzero(labels == cls)) for cls in np.unique(labels)]
        rounds = max(len(members) for members in per_class)
        picked = []
        for i in range(rounds):
            this_round = np.array([members[i] for members in per_class if i < len(members)])
            picked.append(rng.permutation(this_round) if order == "balanced" else this_round)
        indices = np.concatenate(picked)
    return indices[:limit] if limit is not None else indices


def split_positions(count: int, holdout: float) -> np.ndarray:
    """Boolean mask over `count` positions: True for an evenly spread `holdout` share (every 1/holdout-th)."""
    if not 0.0 <= holdout < 1.0:
        raise DataError(f"--confirm must be a fraction in [0, 1), got {holdout!r}")
    positions = np.arange(count)
    return np.floor((positions + 1) * holdout) > np.floor(positions * holdout)


def search_holdout(confirm: float | None, confirm_data: str | None) -> float:
    """The share of `--data` held out of the search: `--confirm`'s, unless a `--confirm-data` folder of its own
    confirms the front, which leaves every `--data` image to the search."""
    return 0.0 if confirm_data else float(confirm or 0.0)


def holdout_mask(labels: np.ndarray, holdout: float, seed: int) -> np.ndarray:
    """Which images are held out of the search: a `holdout` share of every class (its images in seeded random
    order), the remainders spread over the classes, so a one-image-per-class folder holds out a random share of
    its classes. Independent of the evaluation order and of --limit, so a study's two parts never change."""
    rng = np.random.default_rng([seed, 0x5EED])   # its own stream: the order's shuffles stay as they were
    if (labels == UNLABELED).all():
        sequence = rng.permutation(len(labels))
    else:
        classes = rng.permutation(np.unique(labels))
        sequence = np.concatenate([rng.permutation(np.flatnonzero(labels == cls)) for cls in classes])
    mask = np.zeros(len(labels), dtype=bool)
    mask[sequence[split_positions(len(sequence), holdout)]] = True
    return mask


def select_part(labels: np.ndarray, limit: int | None, seed: int, order: str = DEFAULT_ORDER,
                part: str = "all", holdout: float = 0.0) -> np.ndarray:
    """Indices of one part of the data, in evaluation order, `limit` at most.

    `part="search"` and `"confirm"` split the images by `holdout_mask` before the order and the limit apply, so
    the two parts never share an image whatever the limit, and each part's prefixes are balanced on their own."""
    if part not in PARTS:
        raise DataError(f"unknown data part {part!r}; choose one of {', '.join(PARTS)}")
    if part == "all" or not holdout > 0:
        chosen = evaluation_order(labels, None, seed, order) if part != "confirm" else np.zeros(0, dtype=np.int64)
    else:
        held = holdout_mask(labels, holdout, seed)
        members = np.flatnonzero(held if part == "confirm" else ~held)
        chosen = members[evaluation_order(labels[members], None, seed, order)]
    return chosen[:limit] if limit is not None else chosen


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise DataError(f"--limit must be a positive number of images, got {limit!r}")


def _list_images(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / f for f in sorted(files)
                     if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS)
    return found


def _scan_folder(root: Path, class_count: int) -> tuple[str, list[Path], list[int], tuple[str, ...]]:
    """Kind, image paths, labels and class names of a data folder, for a model with `class_count` outputs."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not p.name.startswith("."))
    if not subdirs:
        if not loose:
            raise DataError(f"data folder {root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        return "unlabeled-folder", loose, [UNLABELED] * len(loose), ()
    per_class = {d.name: _list_images(d) for d in subdirs}
    if not any(per_class.values()):
        if loose:
            return "unlabeled-folder", loose, [UNLABELED] * len(loose), ()
        raise DataError(f"data folder {root} holds no images, neither in it nor in its {len(subdirs)} sub-folders")
    empty = [name for name, files in per_class.items() if not files]
    if empty:
        raise DataError(f"class folder {root / empty[0]} holds no images"
                        + (f" ({len(empty) - 1} more empty class folders)" if len(empty) > 1 else ""))
    wnid_index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    # Synset folders index ImageNet-1k, except for a model fine-tuned on just those synsets (e.g. Imagenette).
    if all(name in wnid_index for name in per_class) and (
            class_count == len(wnid_index) or class_count != len(per_class)):
        kind, index = "imagenet-folders", wnid_index
    else:
        kind, index = "class-folders", {name: i for i, name in enumerate(sorted(per_class))}
    paths, labels = [], []
    for name, files in per_class.items():
        paths.extend(files)
        labels.extend([index[name]] * len(files))
    return kind, paths, labels, tuple(per_class)


def _check_headers(paths: list[Path]) -> None:
    """Open every selected image's header: a non-image or a corrupt file is reported now, not inside a worker."""
    def check(path: Path) -> str | None:
        try:
            with Image.open(path) as image:
                image.size  # noqa: B018 - parsing the header is the check
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            return f"unreadable image {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        return None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for problem in pool.map(check, paths):
            if problem:
                raise DataError(problem)


def _load_named(spec: DataSpec) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], str]:
    """uint8 images, int64 labels, class names, and where they came from."""
    if spec.source == "demo-fashion-mnist":
        from dsm_tune.evaluation.demo import FASHION_MNIST_CLASSES, load_demo_slice

        images, labels = load_demo_slice()
        return images, labels, tuple(FASHION_MNIST_CLASSES), "the embedded Fashion-MNIST test slice"
    if spec.source == "fashion-mnist":
        from dsm_tune.evaluation.demo import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, load_fashion_mnist

        try:
            images, labels = load_fashion_mnist(spec.split)
            return images, labels, tuple(FASHION_MNIST_CLASSES), str(FASHION_MNIST_ROOT)
        except DSMTuneError:
            pass  # not installed system-wide: torchvision's copy (downloaded once into the cache)
    return _load_torchvision(spec)


def _load_torchvision(spec: DataSpec) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], str]:
    import torchvision.datasets

    cls = {"fashion-mnist": torchvision.datasets.FashionMNIST, "cifar10": torchvision.datasets.CIFAR10}[spec.source]
    root = cache_root() / "datasets" / spec.source
    try:
        dataset = cls(root=str(root), train=spec.split == "train", download=True)
    except Exception as exc:  # network, checksum or disk failures all mean the same thing to the user
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        hint = " or install the Debian package dataset-fashion-mnist" if spec.source == "fashion-mnist" else ""
        raise DataError(f"data set {spec.source} is not in {root} and could not be downloaded ({detail}); "
                        f"connect to the internet once{hint}") from exc
    data = dataset.data
    images = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    labels = np.asarray(dataset.targets, dtype=np.int64)
    return images.astype(np.uint8), labels, tuple(dataset.classes), str(root)


def _fingerprint(parts: list[bytes | str]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:32]


def head_classes(model: torch.nn.Module) -> int:
    """Classes of the model's classifier head; 0 for a headless backbone."""
    return int(getattr(model, "num_classes", 0) or 0)


def _check_fits_head(kind: str, labels: np.ndarray, class_count: int, model: torch.nn.Module, where: str) -> None:
    """Labeled data must index the model's classifier; a headless backbone ignores labels."""
    classes = head_classes(model)
    if classes == 0 or (labels == UNLABELED).all():
        return
    if kind == "imagenet-folders":
        if classes != len(imagenet_wnids()):
            raise DataError(f"{where}: folders are ImageNet-1k synsets but the model's head has {classes} classes "
                            f"(an ImageNet-1k classifier has {len(imagenet_wnids())})")
        return
    if class_count != classes:
        raise DataError(f"{where} has {class_count} classes but the model's head has {classes}; use data with the "
                        "model's classes (ImageNet synset folders for an ImageNet-1k model) or a matching model")


def load_data(spec: str | os.PathLike | DataSpec, model: torch.nn.Module, limit: int | None = None,
              seed: int = 0, *, order: str = DEFAULT_ORDER, part: str = "all", holdout: float = 0.0) -> EvalData:
    """Evaluation data for `model` (its preprocessing, its classes): `limit` images of `part` (see `select_part`)."""
    _check_limit(limit)
    spec = spec if isinstance(spec, DataSpec) else DataSpec.parse(spec)
    transform, mode, data_config = model_transform(model)
    transform_key = repr(sorted((k, str(v)) for k, v in data_config.items()))
    # A study made with the class-prefix order keeps its fingerprint (and its cached dense outputs).
    selection_key = ["1"] if order == "class-prefix" and part == "all" else \
        [_FINGERPRINT_VERSION, order, part, repr(float(holdout))]

    if spec.named:
        images, labels, class_names, origin = _load_named(spec)
        kind = spec.source
        _check_fits_head(kind, labels, len(class_names), model, f"data set {spec.source}")
        chosen = select_part(labels, limit, seed, order, part, holdout)
        images, labels = images[chosen], labels[chosen]
        fingerprint = _fingerprint([*selection_key, kind, spec.split, str(limit), str(seed), transform_key,
                                    np.ascontiguousarray(images).tobytes(), labels.tobytes()])
        dataset: torch.utils.data.Dataset = _ImageArrays(images, labels, transform, mode)
        description = f"{spec.source}:{spec.split} from {origin}"
    else:
        root = Path(spec.source)
        kind, paths, label_list, class_names = _scan_folder(root, head_classes(model))
        all_labels = np.asarray(label_list, dtype=np.int64)
        _check_fits_head(kind, all_labels, len(class_names), model, f"data folder {root}")
        chosen = select_part(all_labels, limit, seed, order, part, holdout)
        paths = [paths[i] for i in chosen]
        labels = all_labels[chosen]
        _check_headers(paths)
        listing = "\n".join(f"{p.relative_to(root)}|{p.stat().st_size}|{label}" for p, label in zip(paths, labels))
        fingerprint = _fingerprint([*selection_key, kind, str(limit), str(seed), transform_key, listing])
        dataset = _ImageFiles(paths, labels.tolist(), transform, mode)
        description = f"{root} ({kind}, {len(class_names)} classes)" if class_names else f"{root} ({kind})"

    count = len(labels)
    if count == 0:
        raise DataError(f"no {part} images in {description} (--limit {limit}, --confirm {holdout:g})")
    description += f", {count} images" + (f" (limit {limit}, seed {seed})" if limit is not None else "")
    if part != "all" and holdout > 0:
        description += f", {part} part of a {holdout:g} hold-out split"
    return EvalData(dataset=dataset, labels=torch.as_tensor(labels, dtype=torch.int64),
                    labeled=bool((labels != UNLABELED).any()), fingerprint=fingerprint, num_images=count,
                    description=description, kind=kind, class_names=tuple(class_names))


def default_data_spec(model_name: str) -> str | None:
    """The data a model is evaluated on when the user gives none: the embedded slice for the demo model."""
    from dsm_tune.evaluation.models import is_demo_model

    return "demo-fashion-mnist" if is_demo_model(model_name) else None
