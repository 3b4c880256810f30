"""The embedded demo: registered timm model, committed weights and data slice, Fashion-MNIST IDX reader."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.data import create_transform, resolve_data_config

from dsm_tune.errors import DSMTuneError
from dsm_tune.evaluation import demo

FMNIST_ROOT = demo.FASHION_MNIST_ROOT
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_ROOT / "t10k-labels-idx1-ubyte.gz").is_file(), reason="Debian package dataset-fashion-mnist absent"
)


def _write_idx(path: Path, array: np.ndarray, magic: int | None = None, compress: bool = True) -> Path:
    magic = (0x0800 | array.ndim) if magic is None else magic
    payload = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def _fake_split(root: Path, n: int = 30, compress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    suffix = ".gz" if compress else ""
    _write_idx(root / f"t10k-images-idx3-ubyte{suffix}", images, compress=compress)
    _write_idx(root / f"t10k-labels-idx1-ubyte{suffix}", labels, compress=compress)
    return images, labels


# --- timm registration --------------------------------------------------------------------------------------------


def test_registry_name_builds_the_demo_architecture_with_its_eval_config():
    model = timm.create_model(demo.DEMO_MODEL_NAME)
    assert model.pretrained_cfg["architecture"] == demo.DEMO_MODEL_NAME
    assert model.patch_embed.grid_size == (16, 16)
    assert model.num_prefix_tokens == 1 and model.global_pool == "token"
    assert len(model.blocks) == demo.DEMO_ARCHITECTURE["depth"] >= 6
    assert model.head.out_features == len(demo.FASHION_MNIST_CLASSES) == 10

    config = resolve_data_config({}, model=model)
    assert config["input_size"] == (1, 32, 32)
    assert config["interpolation"] == "bilinear" and config["crop_pct"] == 1.0
    assert config["mean"] == demo.FASHION_MNIST_MEAN and config["std"] == demo.FASHION_MNIST_STD
    pixel = create_transform(**config)(Image.fromarray(np.full((28, 28), 255, dtype=np.uint8)))
    assert pixel.shape == (1, 32, 32)
    assert torch.allclose(pixel, torch.full_like(pixel, (1.0 - 0.2860) / 0.3530), atol=1e-4)


def test_timm_pretrained_loader_and_build_demo_model_give_the_committed_weights():
    committed = load_file(str(demo.DEMO_WEIGHTS_PATH))
    model = demo.build_demo_model()
    assert not model.training
    state = model.state_dict()
    assert state.keys() == committed.keys()
    assert all(torch.equal(state[k], committed[k]) for k in committed)

    via_timm = timm.create_model(demo.DEMO_MODEL_NAME, pretrained=True).state_dict()
    assert all(torch.equal(via_timm[k], committed[k]) for k in committed)

    untrained = demo.build_demo_model(pretrained=False).state_dict()
    assert not torch.equal(untrained["head.weight"], committed["head.weight"])


def test_missing_weights_raise_demo_asset_error(monkeypatch, tmp_path):
    missing = tmp_path / "nope.safetensors"
    monkeypatch.setattr(demo, "DEMO_WEIGHTS_PATH", missing)
    with pytest.raises(demo.DemoAssetError, match="nope.safetensors"):
        demo.build_demo_model()
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    monkeypatch.setattr(demo, "DEMO_WEIGHTS_PATH", corrupt)
    with pytest.raises(demo.DemoAssetError, match="unreadable"):
        demo.build_demo_model()
    assert issubclass(demo.DemoAssetError, DSMTuneError) and issubclass(demo.FashionMNISTError, DSMTuneError)


@pytest.mark.slow
def test_demo_model_classifies_the_committed_slice_through_timm_transforms():
    model = demo.build_demo_model()
    transform = create_transform(**resolve_data_config({}, model=model))
    images, labels = demo.load_demo_slice()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(images), 250):
            batch = torch.stack([transform(Image.fromarray(img)) for img in images[start : start + 250]])
            correct += int((model(batch).argmax(1) == torch.from_numpy(labels[start : start + 250])).sum())
    accuracy = 100.0 * correct / len(images)
    # Chance is 10%; broken weights or preprocessing (wrong mean/std, RGB, 28 px) land far below this bar.
    assert accuracy >= 75.0
    # The model card was written by the same evaluation in scripts/train_demo.py.
    assert accuracy == pytest.approx(demo.demo_model_card()["test_accuracy_slice"], abs=0.06)


def test_model_card_matches_the_code():
    card = demo.demo_model_card()
    assert card["model"] == demo.DEMO_MODEL_NAME
    assert card["architecture"] == demo.DEMO_ARCHITECTURE
    assert card["data"]["mean"] == list(demo.FASHION_MNIST_MEAN) and card["data"]["std"] == list(demo.FASHION_MNIST_STD)
    assert card["test_accuracy_full"] >= 75.0 and card["slice"]["images"] == 2000


# --- committed slice ----------------------------------------------------------------------------------------------


def test_slice_is_class_stratified():
    images, labels = demo.load_demo_slice()
    assert images.dtype == np.uint8 and images.shape == (2000, 28, 28)
    assert labels.dtype == np.int64 and labels.shape == (2000,)
    assert np.bincount(labels, minlength=10).tolist() == [demo.DEMO_SLICE_PER_CLASS] * 10
    indices = demo.demo_slice_indices()
    assert np.all(np.diff(indices) > 0) and indices.min() >= 0 and indices.max() < 10_000


@needs_fmnist
def test_slice_is_reproducible_from_the_test_split():
    test_images, test_labels = demo.load_fashion_mnist("test")
    assert test_images.shape == (10_000, 28, 28) and test_labels.dtype == np.int64
    indices = demo.stratified_indices(test_labels, demo.DEMO_SLICE_PER_CLASS, demo.DEMO_SLICE_SEED)
    assert np.array_equal(indices, demo.demo_slice_indices())
    images, labels = demo.load_demo_slice()
    assert np.array_equal(images, test_images[indices]) and np.array_equal(labels, test_labels[indices])


def test_stratified_indices_depend_only_on_seed():
    labels = np.repeat(np.arange(10), 50)
    first = demo.stratified_indices(labels, 7, seed=3)
    assert np.array_equal(first, demo.stratified_indices(labels, 7, seed=3))
    assert not np.array_equal(first, demo.stratified_indices(labels, 7, seed=4))
    assert np.bincount(labels[first]).tolist() == [7] * 10
    with pytest.raises(demo.FashionMNISTError, match="fewer than 51"):
        demo.stratified_indices(labels, 51, seed=0)


def test_missing_slice_raises_demo_asset_error(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "DEMO_SLICE_PATH", tmp_path / "gone.npz")
    with pytest.raises(demo.DemoAssetError, match="gone.npz"):
        demo.load_demo_slice()
    broken = tmp_path / "broken.npz"
    np.savez(broken, images=np.zeros((1, 28, 28), dtype=np.uint8))  # no labels
    monkeypatch.setattr(demo, "DEMO_SLICE_PATH", broken)
    with pytest.raises(demo.DemoAssetError, match="broken.npz is unreadable"):
        demo.load_demo_slice()


# --- IDX reader ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_idx_reader_round_trips_plain_and_gzip(tmp_path, compress):
    images, labels = _fake_split(tmp_path, compress=compress)
    got_images, got_labels = demo.load_fashion_mnist("test", tmp_path)
    assert np.array_equal(got_images, images) and got_images.dtype == np.uint8
    assert np.array_equal(got_labels, labels) and got_labels.dtype == np.int64


def test_idx_reader_names_the_missing_folder_and_how_to_get_the_files(tmp_path):
    with pytest.raises(demo.FashionMNISTError) as info:
        demo.load_fashion_mnist("test", tmp_path / "absent")
    message = str(info.value)
    assert str(tmp_path / "absent") in message and "t10k-images-idx3-ubyte" in message
    assert "dataset-fashion-mnist" in message and "\n" not in message


def test_idx_reader_rejects_unknown_split(tmp_path):
    with pytest.raises(demo.FashionMNISTError, match="unknown Fashion-MNIST split 'val'"):
        demo.load_fashion_mnist("val", tmp_path)


def test_idx_reader_rejects_wrong_magic(tmp_path):
    _fake_split(tmp_path)
    # A labels file where the images file should be: 1-dimensional magic.
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros(30, dtype=np.uint8))
    with pytest.raises(demo.FashionMNISTError, match="magic number 0x00000801, expected 0x00000803"):
        demo.load_fashion_mnist("test", tmp_path)


def test_idx_reader_rejects_truncated_data(tmp_path):
    _fake_split(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))
    with pytest.raises(demo.FashionMNISTError, match=r"holds 23420 data bytes but its header \(30, 28, 28\)"):
        demo.load_fashion_mnist("test", tmp_path)


def test_idx_reader_rejects_corrupt_gzip(tmp_path):
    _fake_split(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(demo.FashionMNISTError, match="cannot read IDX file .*t10k-labels-idx1-ubyte.gz"):
        demo.load_fashion_mnist("test", tmp_path)


def test_idx_reader_rejects_count_mismatch(tmp_path):
    _fake_split(tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(29, dtype=np.uint8))
    with pytest.raises(demo.FashionMNISTError, match="30 images but 29 labels"):
        demo.load_fashion_mnist("test", tmp_path)


# --- training script ----------------------------------------------------------------------------------------------


def _load_train_script():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "scripts" / "train_demo.py"
    spec = importlib.util.spec_from_file_location("train_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_script_writes_the_stratified_slice_and_reports_missing_data(tmp_path, capsys):
    script = _load_train_script()
    data_root = tmp_path / "fmnist"
    data_root.mkdir()
    images, labels = _fake_split(data_root, n=2100)
    assert script.main(["--data-root", str(data_root), "--out-dir", str(tmp_path / "out"), "--slice-only"]) == 0
    with np.load(tmp_path / "out" / demo.DEMO_SLICE_PATH.name, allow_pickle=False) as archive:
        indices = archive["test_indices"]
        assert np.array_equal(indices, demo.stratified_indices(labels, demo.DEMO_SLICE_PER_CLASS, demo.DEMO_SLICE_SEED))
        assert np.array_equal(archive["images"], images[indices]) and archive["labels"].dtype == np.int64

    assert script.main(["--data-root", str(tmp_path / "absent"), "--out-dir", str(tmp_path / "out2")]) == 2
    assert "train_demo: error: Fashion-MNIST file t10k-images-idx3-ubyte[.gz] not found" in capsys.readouterr().err
