"""Shared test fixtures: where the offline assets live, and determinism for every test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_ASSETS = REPO_ROOT.parent / "shared" / "assets"
DINOV2_WEIGHTS = SHARED_ASSETS / "vit_small_patch14_dinov2.imgfocus_224.safetensors"
IMAGENET_SAMPLE = SHARED_ASSETS / "imagenet-sample"


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_assets() -> Path:
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"offline assets not found at {SHARED_ASSETS} (real weights and images, next to the checkout)")
    return SHARED_ASSETS
