"""The frozen config: JSON round trip and every validation error path."""

from __future__ import annotations

import json

import pytest
import timm

from dsm_tune.merging import (
    FORMAT_NAME,
    FORMAT_VERSION,
    ConfigError,
    DSMConfig,
    ModelFingerprint,
    Stage,
    load_config,
    max_hierarchy_depth,
    token_schedule,
)


@pytest.fixture(scope="module")
def small_vit():
    # 8 blocks, 8x8 grid: fast, and deep enough for stages and a depth-2 hierarchy.
    return timm.create_model("vit_tiny_patch16_224", img_size=128, depth=8).eval()


def make_config(model, **overrides):
    settings = dict(start_layer=2, hierarchy_depth=1, stages=[Stage(3, ratio=0.2), Stage(3, ratio=0.1)],
                    proportional_attention=True)
    settings.update(overrides)
    return DSMConfig.for_model(model, **settings)


def test_for_model_fills_the_fingerprint(small_vit):
    config = make_config(small_vit)
    assert config.model == ModelFingerprint(name="vit_tiny_patch16_224", num_blocks=8, grid=(8, 8),
                                            num_prefix_tokens=1, img_size=(128, 128), embed_dim=192)


def test_json_round_trip_keeps_everything(small_vit, tmp_path):
    config = make_config(small_vit, stages=[Stage(3, ratio=0.25), Stage(3, r=4)]).replace(
        target={"device": "cpu", "dtype": "float32", "batch_size": 8, "compile": False},
        metrics={"accuracy_drop": 0.3, "speedup": 1.4},
        provenance={"study": "demo-cpu", "trial": 7},
    )
    path = tmp_path / "dsm.json"
    config.to_json(path)
    loaded = load_config(path)
    assert loaded == config
    assert loaded.target == config.target and loaded.metrics == config.metrics
    assert loaded.provenance == config.provenance
    assert json.loads(path.read_text())["format"] == FORMAT_NAME
    assert load_config(path.read_text()) == config  # JSON text works as well as a path


def test_key_ignores_everything_but_the_merge(small_vit):
    a = make_config(small_vit)
    b = a.replace(metrics={"speedup": 2.0})
    c = make_config(small_vit, start_layer=1, stages=[Stage(4, ratio=0.2), Stage(3, ratio=0.1)])
    assert a.key() == b.key() and a.key() != c.key()


def test_token_schedule_follows_windows_then_global(small_vit):
    # 64 tokens; stage 0 in 4 windows of 16: floor(0.25 * 16) = 4 per window; stage 1 global.
    config = make_config(small_vit, start_layer=2, hierarchy_depth=1,
                         stages=[Stage(2, ratio=0.25), Stage(4, ratio=0.5)])
    assert token_schedule(config) == [64, 64, 64, 48, 36, 18, 9, 5]


def test_r_form_caps_at_half_and_splits_over_windows(small_vit):
    config = make_config(small_vit, start_layer=0, hierarchy_depth=1, stages=[Stage(1, r=8), Stage(7, r=40)])
    schedule = token_schedule(config)
    assert schedule[:3] == [64, 56, 28]  # 8 over 4 windows = 2 each; then 40 capped at half of 56
    assert all(b >= a // 2 for a, b in zip(schedule, schedule[1:]))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(start_layer=-1), "start_layer must be >= 0"),
        (dict(start_layer=1.5), "start_layer must be an integer"),
        (dict(start_layer=9, stages=[Stage(1, ratio=0.1)]), "past the model's 8 blocks"),
        (dict(stages=[Stage(3, ratio=0.1)]), "stages cover 3 blocks but blocks 2..7"),
        (dict(stages=[Stage(3, ratio=0.6), Stage(3, ratio=0.1)]), "stages[0].ratio 0.6 is outside [0, 0.5]"),
        (dict(stages=[Stage(3, ratio=-0.1), Stage(3, ratio=0.1)]), "outside [0, 0.5]"),
        (dict(stages=[Stage(3), Stage(3, ratio=0.1)]), "exactly one of 'ratio' or 'r'"),
        (dict(stages=[Stage(3, ratio=0.1, r=2), Stage(3, ratio=0.1)]), "exactly one of 'ratio' or 'r'"),
        (dict(stages=[Stage(0, ratio=0.1), Stage(6, ratio=0.1)]), "stages[0].blocks must be >= 1"),
        (dict(stages=[Stage(3, r=-1), Stage(3, ratio=0.1)]), "stages[0].r must be >= 0"),
        (dict(hierarchy_depth=3), "too deep for the 8x8 patch grid"),
        (dict(hierarchy_depth=-1), "hierarchy_depth must be >= 0"),
        (dict(proportional_attention="yes"), "proportional_attention must be true or false"),
    ],
)
def test_validation_errors_name_the_problem(small_vit, change, message):
    with pytest.raises(ConfigError) as excinfo:
        make_config(small_vit, **change)
    assert message in str(excinfo.value)


def test_depth_limit_follows_the_grid():
    assert max_hierarchy_depth((16, 16)) == 3
    assert max_hierarchy_depth((14, 14)) == 1  # 7x7 windows; 14 does not split into 4
    assert max_hierarchy_depth((8, 6)) == 1
    assert max_hierarchy_depth((3, 3)) == 0


def _document(model) -> dict:
    return make_config(model).to_dict()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(version=3), "unsupported config version 3"),
        (lambda d: d.update(format="other"), "not a dsm-tune config"),
        (lambda d: d.pop("model"), "missing field 'model'"),
        (lambda d: d.pop("merge"), "missing field 'merge'"),
        (lambda d: d["merge"].pop("stages"), "missing field 'stages'"),
        (lambda d: d["merge"].update(extra=1), "unknown field(s) 'extra'"),
        (lambda d: d.update(comment="x"), "unknown field(s) 'comment'"),
        (lambda d: d["model"].pop("grid"), "missing field 'grid' in 'model'"),
        (lambda d: d["model"].update(grid=[8]), "model.grid must be a pair"),
        (lambda d: d["merge"]["stages"][0].update(ratio="0.2"), "merge.stages[0].ratio must be a number"),
        (lambda d: d["merge"].update(stages="all"), "merge.stages must be a list"),
        (lambda d: d["merge"]["stages"].append({"blocks": 2, "ratio": 0.1}), "stages cover 8 blocks"),
        (lambda d: d.update(metrics=[1, 2]), "metrics must be an object"),
    ],
)
def test_document_errors_name_the_field(small_vit, tmp_path, mutate, message):
    document = _document(small_vit)
    mutate(document)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert message in str(excinfo.value)
    assert str(path) in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


def test_bad_json_and_missing_file(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "dsm-tune/config", "version": 1,')
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_config(broken)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.json")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        DSMConfig.from_dict([1, 2, 3])


def test_format_and_version_are_written(small_vit):
    document = _document(small_vit)
    # Every stage merges: the oldest format that holds it, so runtimes that read only version 1 still apply it.
    assert document["format"] == FORMAT_NAME and document["version"] == 1 < FORMAT_VERSION


def test_merge_params_are_flat_and_complete(small_vit):
    params = make_config(small_vit, stages=[Stage(3, ratio=0.2), Stage(3, r=2)]).merge_params()
    assert params == {"start_layer": 2, "hierarchy_depth": 1, "num_stages": 2, "proportional_attention": True,
                      "stage0_blocks": 3, "stage0_ratio": 0.2, "stage1_blocks": 3, "stage1_r": 2}
