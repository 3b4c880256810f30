"""`run --probe` narrowing, as a pure function on a space mapping: the probe's neighbours always stay possible,
the narrowed file still parses, pinned start layers are refused in one line."""

from __future__ import annotations

import json

import pytest
import yaml

from dsm_tune.evaluation.probe import BlockStats, ProbeResult, convergence_rule
from dsm_tune.merging import ModelFingerprint
from dsm_tune.search.probe_narrow import ProbeNarrowError, narrow_space, start_margin, start_range
from dsm_tune.search.space import SPACES_DIR, parse_space

VIT_BASE = ModelFingerprint("vit_base_patch16_224", 12, (14, 14), 1, (224, 224), 768)
DEMO = ModelFingerprint("dsm_tune_demo_vit", 6, (16, 16), 1, (32, 32), 64)


def probe_with(similarity: list[float], convergence: int | None) -> ProbeResult:
    blocks = tuple(
        BlockStats(block=i, entropy=0.5, sink_share=0.1, sink_tokens=(0,), outlier_count=0.0, outlier_tokens=(),
                   neighbour_similarity=s, similarity_change=None if i == 0 else s - similarity[i - 1])
        for i, s in enumerate(similarity))
    return ProbeResult(model="test", num_blocks=len(similarity), num_tokens=197, num_prefix_tokens=1, grid=(14, 14),
                       num_images=8, data="synthetic", blocks=blocks, convergence_block=convergence,
                       rule=convergence_rule())


def flat_probe(num_blocks: int, convergence: int | None, peak_at_convergence: bool = True) -> ProbeResult:
    similarity = [0.2 + 0.05 * i for i in range(num_blocks)]
    if convergence is not None and peak_at_convergence:
        similarity = [min(s, similarity[convergence]) for s in similarity]
    return probe_with(similarity, convergence)


SAMPLED = {"start_layer": [0, 6], "hierarchy_depth": [0, 3], "num_stages": [1, 3], "stage_ratio": [0.0, 0.4],
           "ratio_step": 0.01, "proportional_attention": [True, False]}
TRACED = {"start_layer_fraction": [0.0, 0.45], "hierarchy_depth": [0, 2], "local_blocks": [1, 3],
          "front_loading": [-1.0, 2.0], "budget": [0.0, 0.9], "proportional_attention": [True, False]}
SHIPPED = sorted(SPACES_DIR.glob("*.yaml")) + sorted(SPACES_DIR.glob("sampled/*.yaml"))


def reparse(mapping: dict, fingerprint: ModelFingerprint):
    return parse_space(yaml.safe_dump(mapping), fingerprint)


def test_start_layers_centre_on_the_convergence_block():
    mapping = SAMPLED
    narrowed, why = narrow_space(mapping, flat_probe(12, 4), 12)
    assert narrowed["start_layer"] == [3, 5]
    assert why["start_layer"]["before"] == [0, 6] and why["start_layer"]["after"] == [3, 5]
    assert why["convergence_block"] == 4 and why["rule"] == convergence_rule()
    assert "within the space's [0, 6]" in why["start_layer"]["why"]
    space = reparse(narrowed, VIT_BASE)
    assert space.start_layer == (3, 5)
    json.dumps(why)   # recorded as a study attribute: must be JSON-safe
    assert mapping["start_layer"] == [0, 6]   # the input mapping is not modified


def test_fraction_key_is_replaced_by_blocks():
    mapping = {**SAMPLED, "start_layer_fraction": [0.0, 0.5]}   # -> blocks 0..3 of 6
    del mapping["start_layer"]
    narrowed, why = narrow_space(mapping, flat_probe(6, 2), 6)
    assert "start_layer_fraction" not in narrowed and narrowed["start_layer"] == [1, 3]
    assert why["start_layer"]["key_before"] == "start_layer_fraction" and why["start_layer"]["before"] == [0, 3]
    assert reparse(narrowed, DEMO).start_layer == (1, 3)


def test_deeper_models_keep_a_wider_margin():
    assert start_margin(6) == 1 and start_margin(12) == 1 and start_margin(24) == 2 and start_margin(32) == 3
    narrowed, _ = narrow_space({"start_layer": [0, 10], "stage_ratio": [0.0, 0.3]}, flat_probe(24, 6), 24)
    assert narrowed["start_layer"] == [4, 8]


@pytest.mark.parametrize("num_blocks", [2, 3, 6, 12, 24, 32])
def test_the_probe_block_and_its_neighbours_always_stay_possible(num_blocks):
    for convergence in range(num_blocks - 1):
        for low in range(num_blocks):
            for high in range(low + 1, num_blocks):
                mapping = {"start_layer": [low, high], "stage_ratio": [0.0, 0.4]}
                narrowed, _ = narrow_space(mapping, flat_probe(num_blocks, convergence), num_blocks)
                new_low, new_high = narrowed["start_layer"]
                assert 0 <= new_low <= new_high <= num_blocks - 1
                wanted = {b for b in (convergence - 1, convergence, convergence + 1) if 0 <= b <= num_blocks - 1}
                assert all(new_low <= b <= new_high for b in wanted), (mapping, convergence, narrowed)
                # Inside the space wherever the space and the probe's neighbourhood overlap.
                assert new_low >= min(low, convergence - 1) and new_high <= max(high, convergence + 1)


def test_a_block_outside_the_space_widens_it_and_says_so():
    narrowed, why = narrow_space({"start_layer": [0, 4], "stage_ratio": [0.0, 0.4]}, flat_probe(12, 9), 12)
    assert narrowed["start_layer"] == [8, 10]
    assert "reaches outside the space's [0, 4]" in why["start_layer"]["why"]
    assert reparse(narrowed, VIT_BASE).start_layer == (8, 10)


def test_no_convergence_block_keeps_the_space():
    mapping = SAMPLED
    narrowed, why = narrow_space(mapping, flat_probe(12, None), 12)
    assert narrowed == mapping
    assert why["start_layer"]["changed"] is False and "no convergence block" in why["start_layer"]["why"]


def test_first_stage_ratio_scales_with_the_redundancy_at_convergence():
    similarity = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.8, 0.8, 0.8, 0.8]
    narrowed, why = narrow_space(SAMPLED, probe_with(similarity, 3), 12)
    # 0.5 / 0.8 of [0, 0.4] -> 0.25; later stages keep [0, 0.4]
    assert narrowed["stage_ratio"] == [[0.0, 0.25], [0.0, 0.4], [0.0, 0.4]]
    assert why["first_stage"]["after"] == [0.0, 0.25] and why["first_stage"]["share"] == pytest.approx(0.625)
    space = reparse(narrowed, VIT_BASE)
    assert space.stage_ratio == ((0.0, 0.25), (0.0, 0.4), (0.0, 0.4))


def test_first_stage_ratio_in_a_per_stage_space_snaps_to_the_grid():
    mapping = {"start_layer": [0, 6], "num_stages": [1, 2], "stage_ratio": [[0.05, 0.35], [0.0, 0.2]],
               "ratio_step": 0.05}
    similarity = [0.1] * 3 + [0.33] + [1.0] * 8
    narrowed, _ = narrow_space(mapping, probe_with(similarity, 3), 12)
    # 0.05 + floor(0.3 * 0.33 / 0.05) = 1 step of 0.05 -> 0.10
    assert narrowed["stage_ratio"] == [[0.05, 0.1], [0.0, 0.2]]
    assert reparse(narrowed, VIT_BASE).stage_ratio[0] == (0.05, 0.1)


def test_first_stage_keeps_at_least_one_ratio_step():
    similarity = [0.0] * 4 + [1.0] * 8
    narrowed, _ = narrow_space({"start_layer": [0, 6], "stage_ratio": [0.0, 0.4]}, probe_with(similarity, 2), 12)
    assert narrowed["stage_ratio"] == [[0.0, 0.01]]


def test_fixed_or_missing_ratio_is_left_alone():
    narrowed, why = narrow_space({"start_layer": [0, 6], "stage_ratio": 0.1}, flat_probe(12, 4), 12)
    assert narrowed["stage_ratio"] == 0.1 and why["first_stage"]["changed"] is False
    narrowed, why = narrow_space({"start_layer": [0, 6]}, flat_probe(12, 4), 12)
    assert "stage_ratio" not in narrowed and "neither stage_ratio nor front_loading" in why["first_stage"]["why"]


def test_traced_space_scales_front_loading():
    mapping = TRACED
    similarity = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.8, 0.8, 0.8, 0.8]
    narrowed, why = narrow_space(mapping, probe_with(similarity, 3), 12)
    assert narrowed["start_layer"] == [2, 4]
    assert narrowed["front_loading"] == [-1.0, pytest.approx(-1.0 + 0.625 * 3.0)]
    assert why["first_stage"]["key"] == "front_loading"
    space = reparse(narrowed, VIT_BASE)
    assert space.start_layer == (2, 4) and space.front_loading[1] == pytest.approx(0.875)


@pytest.mark.parametrize("mapping, shown", [
    ({"start_layer": 3, "stage_ratio": [0.0, 0.4]}, "start_layer: 3 -> block 3"),
    ({"start_layer": [2, 2], "stage_ratio": [0.0, 0.4]}, "start_layer: [2, 2] -> block 2"),
    ({"start_layer_fraction": [0.3, 0.32], "stage_ratio": [0.0, 0.4]}, "-> block 3"),
])
def test_a_pinned_start_layer_is_refused_in_one_line(mapping, shown):
    with pytest.raises(ProbeNarrowError) as error:
        narrow_space(mapping, flat_probe(12, 4), 12)
    message = str(error.value)
    assert "pins the start layer" in message and shown in message and "\n" not in message


def test_a_probe_of_another_depth_is_refused():
    with pytest.raises(ProbeNarrowError, match="12-block model .* 24 blocks"):
        narrow_space(SAMPLED, flat_probe(12, 4), 24)


def test_start_range_reads_either_key():
    assert start_range({"start_layer": [1, 5]}, 12) == ("start_layer", (1, 5))
    assert start_range({"start_layer_fraction": [0.0, 0.45]}, 12) == ("start_layer_fraction", (0, 5))
    with pytest.raises(ProbeNarrowError, match="exactly one"):
        start_range({"start_layer": [0, 3], "start_layer_fraction": [0, 0.5]}, 12)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(SPACES_DIR)))
def test_every_shipped_space_narrows_into_a_valid_space(path):
    mapping = yaml.safe_load(path.read_text())
    fingerprint = DEMO if path.stem == "demo" else ModelFingerprint(
        "m", {"vit_huge": 32, "vit_large": 24}.get(path.stem, 12), (16, 16), 1, (224, 224), 384)
    blocks = fingerprint.num_blocks
    for convergence in (0, blocks // 3, blocks - 2):
        narrowed, _ = narrow_space(mapping, flat_probe(blocks, convergence, peak_at_convergence=False), blocks)
        space = reparse(narrowed, fingerprint)
        assert space.start_layer[0] <= max(0, convergence - 1) and space.start_layer[1] >= convergence + 1
