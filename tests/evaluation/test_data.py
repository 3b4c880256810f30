"""Evaluation data: label mapping, preprocessing, stratified limits, fingerprints and the errors for bad data."""

from __future__ import annotations

import os
import urllib.error
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from dsm_tune.errors import DSMTuneError
from dsm_tune.evaluation import data as data_module
from dsm_tune.evaluation.data import (
    DataError, DataSpec, evaluation_order, imagenet_wnids, load_data, model_transform,
)

from tests.conftest import IMAGENET_SAMPLE

# Ten classes spread over the 1k index, so a sorted-order mapping (0..9) could not pass for the true one.
SUBSET_WNIDS = ("n01440764", "n01530575", "n02085620", "n02123045", "n02504458", "n03000134", "n03594945",
                "n04037443", "n07753592", "n15075141")


def tiny_model(num_classes: int = 1000, in_chans: int = 3) -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=num_classes,
                             in_chans=in_chans).eval()


def make_images(folder: Path, count: int, size=(40, 30), start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        path = folder / f"img{i:03d}.png"
        Image.new("RGB", size, ((37 * i) % 256, (91 * i) % 256, (13 * i) % 256)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def imagenet_subset(shared_assets, tmp_path) -> Path:
    root = tmp_path / "val-subset"
    root.mkdir()
    for wnid in SUBSET_WNIDS:
        os.symlink(IMAGENET_SAMPLE / wnid, root / wnid)
    return root


def test_packaged_wnid_list_is_the_imagenet_1k_order(shared_assets):
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and len(set(wnids)) == 1000
    assert list(wnids) == sorted(p.name for p in IMAGENET_SAMPLE.iterdir() if p.is_dir())


def test_imagenet_subset_gets_true_1k_indices(imagenet_subset):
    data = load_data(imagenet_subset, tiny_model())
    assert data.kind == "imagenet-folders" and data.labeled and data.num_images == 10
    true_index = {wnid: i for i, wnid in enumerate(sorted(p.name for p in IMAGENET_SAMPLE.iterdir()))}
    for i in range(data.num_images):
        path = data.dataset.paths[i]
        assert data.labels[i].item() == true_index[path.parent.name]
        image, label = data.dataset[i]
        assert label == true_index[path.parent.name]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert sorted(data.labels.tolist()) == sorted(true_index[w] for w in SUBSET_WNIDS)
    assert max(data.labels.tolist()) == 999  # n15075141 is the last ImageNet-1k class


def test_synset_folders_for_a_model_tuned_on_exactly_them_map_sorted(imagenet_subset):
    data = load_data(imagenet_subset, tiny_model(num_classes=10))
    assert data.kind == "class-folders"
    assert sorted(data.labels.tolist()) == list(range(10))


def test_synset_folders_that_fit_neither_way(imagenet_subset):
    with pytest.raises(DataError, match="ImageNet-1k synsets but the model's head has 100 classes"):
        load_data(imagenet_subset, tiny_model(num_classes=100))


def test_plain_class_folders_map_in_sorted_order(tmp_path):
    for name, count in (("zebra", 2), ("apple", 3), ("mango", 1)):
        make_images(tmp_path / name, count)
    data = load_data(tmp_path, tiny_model(num_classes=3))
    assert data.kind == "class-folders" and data.class_names == ("apple", "mango", "zebra")
    by_folder = {data.dataset.paths[i].parent.name: data.labels[i].item() for i in range(data.num_images)}
    assert by_folder == {"apple": 0, "mango": 1, "zebra": 2}


def test_plain_class_folders_that_do_not_fit_the_head(tmp_path):
    for name in ("cat", "dog"):
        make_images(tmp_path / name, 1)
    with pytest.raises(DataError, match="2 classes but the model's head has 1000") as info:
        load_data(tmp_path, tiny_model())
    assert "\n" not in str(info.value)


def test_headless_backbone_accepts_any_labels(tmp_path):
    for name in ("cat", "dog"):
        make_images(tmp_path / name, 1)
    assert load_data(tmp_path, tiny_model(num_classes=0)).num_images == 2


def test_unlabeled_folder(tmp_path):
    make_images(tmp_path, 5)
    (tmp_path / "notes.txt").write_text("not an image")
    data = load_data(tmp_path, tiny_model())
    assert data.kind == "unlabeled-folder" and not data.labeled
    assert data.labels.tolist() == [-1] * 5
    assert data.dataset[0][1] == -1


def test_limit_is_stratified_and_deterministic(tmp_path):
    for c, count in enumerate((9, 6, 3)):
        make_images(tmp_path / f"class{c}", count, start=10 * c)
    model = tiny_model(num_classes=3)
    first = load_data(tmp_path, model, limit=6)
    again = load_data(tmp_path, model, limit=6)
    assert first.num_images == 6
    assert Counter(first.labels.tolist()) == {0: 2, 1: 2, 2: 2}
    assert first.dataset.paths == again.dataset.paths and first.fingerprint == again.fingerprint
    # Every prefix of the evaluation order is stratified too (early abort sees all classes at once).
    assert sorted(first.labels[:3].tolist()) == [0, 1, 2]
    other_seed = load_data(tmp_path, model, limit=6, seed=1)
    assert other_seed.dataset.paths != first.dataset.paths
    assert Counter(other_seed.labels.tolist()) == {0: 2, 1: 2, 2: 2}
    # Smaller classes run out: the rest of the limit comes from the classes that still have images.
    assert Counter(load_data(tmp_path, model, limit=15).labels.tolist()) == {0: 6, 1: 6, 2: 3}


def test_evaluation_order_properties():
    labels = np.array([2, 0, 1, 0, 2, 2, 1, 0, -1][:8])
    order = evaluation_order(labels, None, seed=0)
    assert sorted(order.tolist()) == list(range(8))
    assert sorted(labels[order[:3]].tolist()) == [0, 1, 2]
    unlabeled = evaluation_order(np.full(10, -1), 4, seed=3)
    assert len(unlabeled) == 4 and len(set(unlabeled.tolist())) == 4
    assert evaluation_order(np.full(10, -1), 4, seed=3).tolist() == unlabeled.tolist()


def test_fingerprint_tracks_files_limit_and_preprocessing(tmp_path):
    make_images(tmp_path / "a", 3)
    make_images(tmp_path / "b", 3)
    model = tiny_model(num_classes=2)
    base = load_data(tmp_path, model).fingerprint
    assert load_data(tmp_path, model).fingerprint == base
    assert load_data(tmp_path, model, limit=4).fingerprint != base
    bigger = timm.create_model("vit_tiny_patch16_224", img_size=48, depth=1, num_classes=2)
    assert load_data(tmp_path, bigger).fingerprint != base
    make_images(tmp_path / "b", 1, size=(80, 60), start=7)
    assert load_data(tmp_path, model).fingerprint != base


def test_preprocessing_follows_the_built_model_size():
    model = timm.create_model("vit_small_patch14_dinov2", img_size=224, num_classes=0, depth=1)
    transform, mode, config = model_transform(model)
    assert config["input_size"] == (3, 224, 224) and mode == "RGB"
    assert config["interpolation"] == "bicubic" and config["crop_pct"] == 1.0
    assert transform(Image.new("RGB", (300, 200))).shape == (3, 224, 224)


@pytest.mark.parametrize("make, problem", [
    (lambda root: None, "holds no images"),
    (lambda root: (root / "sub").mkdir(), "holds no images"),
    (lambda root: (make_images(root / "a", 1), (root / "b").mkdir()), "class folder .*b holds no images"),
    (lambda root: (make_images(root / "a", 1), (root / "b").mkdir(), (root / "b" / "x.jpg").write_bytes(b"junk")),
     "unreadable image .*x.jpg"),
])
def test_bad_folders_fail_at_load_time(tmp_path, make, problem):
    root = tmp_path / "data"
    root.mkdir()
    make(root)
    with pytest.raises(DataError, match=problem) as info:
        load_data(root, tiny_model(num_classes=2))
    assert isinstance(info.value, DSMTuneError) and "\n" not in str(info.value)


def test_missing_path_and_bad_values(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(tmp_path / "nowhere", tiny_model())
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        load_data(tmp_path / "file.txt", tiny_model())
    make_images(tmp_path / "imgs", 2)
    for limit in (0, -3, 2.5):
        with pytest.raises(DataError, match="--limit"):
            load_data(tmp_path / "imgs", tiny_model(), limit=limit)
    with pytest.raises(DataError, match="unknown split"):
        DataSpec.parse("cifar10:val")


def test_truncated_image_is_reported_with_its_path(tmp_path):
    (tmp_path / "a").mkdir()
    jpeg = tmp_path / "a" / "img000.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(jpeg, quality=90)
    content = jpeg.read_bytes()
    jpeg.write_bytes(content[: len(content) * 2 // 3])  # header intact (passes the load-time check), pixels cut
    data = load_data(tmp_path, tiny_model(num_classes=1))
    with pytest.raises(DataError, match="cannot decode image .*img000.jpg"):
        data.dataset[0]


def test_fashion_mnist_arrays_go_through_the_model_transform(monkeypatch):
    images = np.stack([np.full((28, 28), 10 * i, dtype=np.uint8) for i in range(20)])
    labels = np.arange(20, dtype=np.int64) % 10
    monkeypatch.setattr(data_module, "_load_named", lambda spec: (images, labels, tuple("0123456789"), "memory"))
    gray = load_data("fashion-mnist", tiny_model(num_classes=10, in_chans=1), limit=10)
    assert gray.kind == "fashion-mnist" and gray.labeled
    assert Counter(gray.labels.tolist()) == {c: 1 for c in range(10)}
    assert gray.dataset[0][0].shape == (1, 32, 32)
    rgb = load_data("fashion-mnist", tiny_model(num_classes=10), limit=10)
    assert rgb.dataset[0][0].shape == (3, 32, 32)
    assert rgb.fingerprint != gray.fingerprint
    with pytest.raises(DataError, match="data set fashion-mnist has 10 classes but the model's head has 1000"):
        load_data("fashion-mnist", tiny_model())


def test_real_fashion_mnist_from_the_debian_package():
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    data = load_data("fashion-mnist", tiny_model(num_classes=10, in_chans=1), limit=50)
    assert data.num_images == 50 and Counter(data.labels.tolist()) == {c: 5 for c in range(10)}
    assert "/usr/share/datasets/fashion-mnist" in data.description


def test_offline_download_is_a_clear_error(monkeypatch, tmp_path):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("DSM_TUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match="cifar10 is not in .* could not be downloaded") as info:
        load_data("cifar10", tiny_model(num_classes=10))
    assert str(tmp_path) in str(info.value)


def test_demo_slice(shared_assets):
    from dsm_tune.evaluation import demo

    if not demo.DEMO_SLICE_PATH.is_file():
        pytest.skip("the demo data slice is not committed yet")
    data = load_data("demo-fashion-mnist", tiny_model(num_classes=10, in_chans=1), limit=100)
    assert data.num_images == 100 and Counter(data.labels.tolist()) == {c: 10 for c in range(10)}
