"""Accuracy metrics on tiny cases with known answers, the dense-output cache, and early abort."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dsm_tune.evaluation.data import EvalData
from dsm_tune.evaluation.metrics import AccuracyEvaluator, MetricError, default_metric

from tests.conftest import DINOV2_WEIGHTS, IMAGENET_SAMPLE


class Lookup(nn.Module):
    """A 'model' whose output for image i is row i of a table: metrics with answers computable by hand."""

    def __init__(self, table: list[list[float]], num_classes: int):
        super().__init__()
        self.register_buffer("table", torch.tensor(table, dtype=torch.float32))
        self.num_classes = num_classes
        self.pretrained_cfg = {"architecture": "lookup", "input_size": (1, 1, 1)}
        self.images_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images_seen += x.shape[0]
        return self.table[x[:, 0, 0, 0].round().long()]


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, labels: list[int]):
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return torch.full((1, 1, 1), float(i)), self.labels[i]


def toy_data(labels: list[int], fingerprint: str = "toy-1") -> EvalData:
    return EvalData(dataset=_Indexed(labels), labels=torch.tensor(labels), labeled=any(l >= 0 for l in labels),
                    fingerprint=fingerprint, num_images=len(labels), description="toy", kind="toy")


def one_hot(predictions: list[int], classes: int = 3) -> list[list[float]]:
    return [[5.0 if c == p else 0.0 for c in range(classes)] for p in predictions]


def test_top1_drop_in_points():
    data = toy_data([0, 1, 2, 0])
    dense = Lookup(one_hot([0, 1, 2, 1]), 3)      # 3 of 4 right: 75 %
    merged = Lookup(one_hot([0, 2, 2, 2]), 3)     # 2 of 4 right: 50 %, agrees with dense on 2 of 4
    evaluator = AccuracyEvaluator(dense, data, "top1", batch_size=3)
    assert evaluator.baseline_value == pytest.approx(75.0)
    result = evaluator.evaluate(merged)
    assert (result.metric, result.value, result.baseline, result.drop) == ("top1", 50.0, 75.0, 25.0)
    assert not result.aborted and result.num_images == 4
    assert result.extra["agreement"] == pytest.approx(50.0)
    # A merged model better than the dense one has a negative drop.
    assert evaluator.evaluate(Lookup(one_hot([0, 1, 2, 0]), 3)).drop == pytest.approx(-25.0)


def test_agreement_and_kl():
    data = toy_data([-1, -1])
    dense = Lookup([[0.0, 0.0], [3.0, 0.0]], 2)
    merged = Lookup([[math.log(3.0), 0.0], [0.0, 3.0]], 2)
    evaluator = AccuracyEvaluator(dense, data)  # unlabeled: agreement by default
    assert evaluator.metric == "agreement" and evaluator.baseline_value == 100.0
    result = evaluator.evaluate(merged)
    # Image 0: dense (0.5, 0.5) argmax 0, merged (0.75, 0.25) argmax 0 -> agree; image 1 flips -> 50 %.
    assert result.value == pytest.approx(50.0) and result.drop == pytest.approx(50.0)
    kl_0 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    p = torch.softmax(torch.tensor([3.0, 0.0]), 0)
    kl_1 = float((p * (p.log() - p.flip(0).log())).sum())
    assert result.extra["kl"] == pytest.approx((kl_0 + kl_1) / 2, rel=1e-5)
    assert evaluator.evaluate(dense).extra["kl"] == pytest.approx(0.0, abs=1e-7)


def test_feature_distance():
    data = toy_data([-1] * 4)
    embeddings = [[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [1.0, 1.0]]
    dense = Lookup(embeddings, 0)
    merged = Lookup([[2.0, 0.0], [0.0, 1.0], [3.0, 3.0], [1.0, -1.0]], 0)  # cosines 1, 1, 1, 0
    evaluator = AccuracyEvaluator(dense, data)
    assert evaluator.metric == "feature" and evaluator.baseline_value == 0.0
    result = evaluator.evaluate(merged)
    assert result.value == pytest.approx(25.0) and result.drop == pytest.approx(25.0)
    assert result.extra["mean_cosine"] == pytest.approx(0.75) and result.extra["min_cosine"] == pytest.approx(0.0)


def test_metric_choice_and_refusals():
    labeled, unlabeled = toy_data([0, 1]), toy_data([-1, -1])
    classifier, backbone = Lookup(one_hot([0, 1], 2), 2), Lookup([[1.0], [2.0]], 0)
    assert default_metric(classifier, labeled) == "top1"
    assert default_metric(classifier, unlabeled) == "agreement"
    assert default_metric(backbone, labeled) == "feature"
    with pytest.raises(MetricError, match="top1 needs labeled images"):
        AccuracyEvaluator(classifier, unlabeled, "top1")
    with pytest.raises(MetricError, match="needs a classifier head"):
        AccuracyEvaluator(backbone, labeled, "agreement")
    with pytest.raises(MetricError, match="unknown metric"):
        AccuracyEvaluator(classifier, labeled, "top5")


def test_dense_outputs_cache_hit_miss_and_invalidation(tmp_path):
    labels = [0, 1, 2, 0, 1, 2]
    table = one_hot([0, 1, 2, 0, 2, 2])

    first_model = Lookup(table, 3)
    first = AccuracyEvaluator(first_model, toy_data(labels), "top1", batch_size=4, cache_dir=tmp_path)
    assert first.cache_status == "miss" and first_model.images_seen == 6
    assert first.cache_path.is_file() and first.cache_path.parent == tmp_path

    # Same model, same data: the dense model is not run at all.
    again_model = Lookup(table, 3)
    again = AccuracyEvaluator(again_model, toy_data(labels), "top1", batch_size=4, cache_dir=tmp_path)
    assert again.cache_status == "hit" and again_model.images_seen == 0
    assert torch.equal(again.dense_outputs, first.dense_outputs)
    assert again.baseline_value == first.baseline_value
    # agreement reads the same logits: same entry.
    assert AccuracyEvaluator(Lookup(table, 3), toy_data(labels), "agreement",
                             cache_dir=tmp_path).cache_status == "hit"

    # Anything the outputs depend on changes the key: weights, data (e.g. another limit), precision.
    changed = [row[:] for row in table]
    changed[0][1] = 9.0
    assert AccuracyEvaluator(Lookup(changed, 3), toy_data(labels), "top1", cache_dir=tmp_path).cache_status == "miss"
    assert AccuracyEvaluator(Lookup(table, 3), toy_data(labels, "toy-limit-5"), "top1",
                             cache_dir=tmp_path).cache_status == "miss"
    assert AccuracyEvaluator(Lookup(table, 3), toy_data(labels), "top1", dtype="bfloat16",
                             cache_dir=tmp_path).cache_status == "miss"

    # A damaged file, or one whose recorded key does not match, is recomputed and rewritten, never trusted.
    first.cache_path.write_bytes(b"garbage")
    damaged_model = Lookup(table, 3)
    damaged = AccuracyEvaluator(damaged_model, toy_data(labels), "top1", cache_dir=tmp_path)
    assert damaged.cache_status == "invalid" and damaged_model.images_seen == 6
    assert AccuracyEvaluator(Lookup(table, 3), toy_data(labels), "top1", cache_dir=tmp_path).cache_status == "hit"
    torch.save({"format": 1, "key": "someone else's", "outputs": torch.zeros(6, 3)}, first.cache_path)
    forged = AccuracyEvaluator(Lookup(table, 3), toy_data(labels), "top1", cache_dir=tmp_path)
    assert forged.cache_status == "invalid" and forged.baseline_value == first.baseline_value


def test_no_cache_dir_means_memory_only(tmp_path):
    evaluator = AccuracyEvaluator(Lookup(one_hot([0, 1]), 3), toy_data([0, 1]), "top1")
    assert evaluator.cache_status == "disabled" and evaluator.cache_path is None


def test_early_abort_top1_stops_once_the_drop_is_certain():
    labels = [0, 1, 2, 0, 1, 2, 0, 1]
    dense = Lookup(one_hot(labels), 3)                       # 100 %
    wrong_first = [(l + 1) % 3 for l in labels[:4]] + labels[4:]
    evaluator = AccuracyEvaluator(dense, toy_data(labels), "top1", batch_size=2)

    merged = Lookup(one_hot(wrong_first), 3)
    result = evaluator.evaluate(merged, max_drop=20.0)
    # After 2 images, both wrong: even 6 right of the remaining 6 leaves 75 % -> a 25-point drop > 20.
    assert result.aborted and result.num_images == 2 and merged.images_seen == 2
    assert result.extra["certain_drop"] == pytest.approx(25.0)
    assert result.drop == pytest.approx(100.0)  # the figure on the images evaluated
    assert result.drop > 20.0

    # With a looser limit the drop (50) never becomes certain to exceed 60: evaluated to the end.
    merged = Lookup(one_hot(wrong_first), 3)
    result = evaluator.evaluate(merged, max_drop=60.0)
    assert not result.aborted and result.num_images == 8 and result.drop == pytest.approx(50.0)

    # No limit: never aborts, same figure.
    assert evaluator.evaluate(Lookup(one_hot(wrong_first), 3)).drop == pytest.approx(50.0)
    # A drop that merely equals the limit is not an abort.
    assert not evaluator.evaluate(Lookup(one_hot(wrong_first), 3), max_drop=50.0).aborted


def test_early_abort_agreement_and_feature():
    dense = Lookup(one_hot([0, 1, 2, 0]), 3)
    agreement = AccuracyEvaluator(dense, toy_data([-1] * 4), "agreement", batch_size=1)
    result = agreement.evaluate(Lookup(one_hot([1, 1, 2, 0]), 3), max_drop=20.0)
    assert result.aborted and result.num_images == 1 and result.drop == pytest.approx(100.0)

    backbone = Lookup([[1.0, 0.0]] * 4, 0)
    feature = AccuracyEvaluator(backbone, toy_data([-1] * 4), batch_size=2)
    # Cosine 0 on every image: after 2 images the mean distance is at least 2 / 4 -> 50 > 30.
    result = feature.evaluate(Lookup([[0.0, 1.0]] * 4, 0), max_drop=30.0)
    assert result.aborted and result.num_images == 2 and result.drop == pytest.approx(100.0)
    assert result.extra["certain_drop"] == pytest.approx(50.0)


@pytest.mark.slow
def test_real_backbone_feature_metric(shared_assets, tmp_path):
    """The real DINOv2 backbone on real images: identity is exact, merging moves the embedding a little."""
    from dsm_tune.evaluation.data import load_data
    from dsm_tune.evaluation.models import build_model
    from dsm_tune.evaluation.trial import shared_weights_copy
    from dsm_tune.merging import DSMConfig, Stage, apply_dsm

    if not DINOV2_WEIGHTS.is_file():
        pytest.skip(f"{DINOV2_WEIGHTS.name} not in {shared_assets}")
    model = build_model("dinov2_small", checkpoint=DINOV2_WEIGHTS)
    data = load_data(IMAGENET_SAMPLE, model, limit=8)
    evaluator = AccuracyEvaluator(model, data, batch_size=4, cache_dir=tmp_path)
    assert evaluator.metric == "feature"
    merged = shared_weights_copy(model)
    apply_dsm(merged, DSMConfig.dense(model))
    assert evaluator.evaluate(merged).drop == pytest.approx(0.0, abs=1e-4)
    apply_dsm(merged, DSMConfig.for_model(model, start_layer=4, hierarchy_depth=1,
                                          stages=[Stage(4, ratio=0.2), Stage(4, ratio=0.2)]))
    result = evaluator.evaluate(merged)
    assert 0.0 < result.drop < 10.0 and result.extra["mean_cosine"] > 0.9


@pytest.mark.slow
def test_demo_slice_accuracy_matches_the_model_card():
    """Our data path (slice -> PIL -> the model's timm transform) reproduces what the training script recorded."""
    import json

    from dsm_tune.evaluation import demo
    from dsm_tune.evaluation.data import load_data
    from dsm_tune.evaluation.models import build_model

    if not (demo.DEMO_WEIGHTS_PATH.is_file() and demo.DEMO_MODEL_CARD_PATH.is_file()):
        pytest.skip("the demo model's weights are not committed yet")
    card = json.loads(demo.DEMO_MODEL_CARD_PATH.read_text())
    model = build_model("demo")
    evaluator = AccuracyEvaluator(model, load_data("demo-fashion-mnist", model), batch_size=500)
    assert evaluator.metric == "top1" and evaluator.data.num_images == card["slice"]["images"]
    assert evaluator.baseline_value == pytest.approx(card["test_accuracy_slice"], abs=0.051)
