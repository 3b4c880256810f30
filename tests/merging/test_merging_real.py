"""DSM on a real pretrained ViT (DINOv2-style ViT-S/14) and real ImageNet images (../shared/assets)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from dsm_tune.merging import DSMConfig, Stage, apply_dsm, remove_dsm, token_schedule

from tests.conftest import DINOV2_WEIGHTS, IMAGENET_SAMPLE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dinov2_and_images():
    if not DINOV2_WEIGHTS.is_file() or not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"real-weights asset absent: {DINOV2_WEIGHTS} / {IMAGENET_SAMPLE}")
    import safetensors.torch

    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=224)
    model.load_state_dict(safetensors.torch.load_file(str(DINOV2_WEIGHTS)))
    model.eval()
    data_config = timm.data.resolve_data_config(model=model)
    data_config["input_size"] = (3, *model.patch_embed.img_size)  # the model as built (224), not its 518 cfg
    transform = timm.data.create_transform(**data_config)
    # 24 images spread over the classes, chosen deterministically.
    files = sorted(IMAGENET_SAMPLE.glob("*/*"))[::40][:24]
    images = torch.stack([transform(Image.open(path).convert("RGB")) for path in files])
    with torch.inference_mode():
        dense = model(images)
    return model, images, dense


def mean_cosine(model, config, images, dense) -> float:
    apply_dsm(model, config)
    try:
        with torch.inference_mode():
            merged = model(images)
    finally:
        remove_dsm(model)
    return F.cosine_similarity(merged, dense).mean().item()


def token_budget(config: DSMConfig) -> int:
    return sum(token_schedule(config))


def test_moderate_dsm_keeps_the_embedding(dinov2_and_images):
    model, images, dense = dinov2_and_images
    config = DSMConfig.for_model(model, start_layer=3, hierarchy_depth=1,
                                 stages=[Stage(4, ratio=0.1), Stage(5, ratio=0.1)])
    cosine = mean_cosine(model, config, images, dense)
    schedule = token_schedule(config)
    print(f"\nmoderate DSM {schedule[0]}->{schedule[-1]} tokens: mean cosine to dense = {cosine:.5f}")
    assert schedule[-1] < schedule[0] // 2  # genuinely merging: fewer than half the tokens at the end
    assert cosine > 0.99


def test_delayed_start_stays_closer_at_equal_token_budget(dinov2_and_images):
    """DSM's claim: merging in the first blocks (attention not converged yet) costs more than merging later."""
    model, images, dense = dinov2_and_images
    early = DSMConfig.for_model(model, start_layer=0, hierarchy_depth=0, stages=[Stage(12, r=6)])
    candidates = [DSMConfig.for_model(model, start_layer=4, hierarchy_depth=0, stages=[Stage(8, r=r)])
                  for r in range(1, 40)]
    delayed = min(candidates, key=lambda c: abs(token_budget(c) - token_budget(early)))
    assert abs(token_budget(delayed) - token_budget(early)) / token_budget(early) < 0.01
    early_cosine = mean_cosine(model, early, images, dense)
    delayed_cosine = mean_cosine(model, delayed, images, dense)
    print(f"\nequal token budget {token_budget(early)}: start 0 (r=6) cosine {early_cosine:.5f}, "
          f"start 4 (r={delayed.stages[0].r}) cosine {delayed_cosine:.5f}; "
          f"1-cos ratio {(1 - early_cosine) / (1 - delayed_cosine):.2f}x")
    assert delayed_cosine > early_cosine
