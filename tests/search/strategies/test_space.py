"""Sampled search spaces (search_spaces/sampled/): the YAML files load for their models, the one mapping params ->
config inverts exactly, seeds are the promised kinds, and bad files fail with one line naming the file and the key.
The traced spaces (the default files) are tested in test_traced_search.py."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
import pytest

from dsm_tune.errors import DSMTuneError
from dsm_tune.merging import DSMConfig, ModelFingerprint, Stage, token_schedule
from dsm_tune.search.space import SPACES_DIR, load_space, parse_space, space_file_for
from dsm_tune.search.strategies import SampledSpace, SpaceError, plan_key, replay_attrs

optuna.logging.set_verbosity(optuna.logging.WARNING)

SAMPLED_DIR = SPACES_DIR / "sampled"


def sampled_space(name: str, fingerprint: ModelFingerprint) -> SampledSpace:
    """The shipped sampled space a model's name picks."""
    return load_space(space_file_for(name, fingerprint, SAMPLED_DIR), name, fingerprint)

DEMO = ModelFingerprint("dsm_tune_demo_vit", 6, (16, 16), 1, (32, 32), 64)
VIT_BASE = ModelFingerprint("vit_base_patch16_224", 12, (14, 14), 1, (224, 224), 768)
VIT_LARGE = ModelFingerprint("vit_large_patch16_224", 24, (14, 14), 1, (224, 224), 1024)
VIT_HUGE = ModelFingerprint("vit_huge_patch14_224", 32, (16, 16), 1, (224, 224), 1280)
DEIT_DISTILLED = ModelFingerprint("deit_base_distilled_patch16_224", 12, (14, 14), 2, (224, 224), 768)
DINOV2_SMALL = ModelFingerprint("vit_small_patch14_dinov2", 12, (16, 16), 1, (224, 224), 384)
ODD = ModelFingerprint("eva02_tiny_patch14_224", 40, (16, 16), 1, (224, 224), 192)

MODELS = [("demo", DEMO), ("vit_base", VIT_BASE), ("vit_large", VIT_LARGE), ("vit_huge", VIT_HUGE),
          ("deit_base_distilled_patch16_224", DEIT_DISTILLED), ("vit_small_patch14_dinov2", DINOV2_SMALL),
          ("vit_tiny_patch16_224", ModelFingerprint("vit_tiny_patch16_224", 12, (14, 14), 1, (224, 224), 192)),
          ("eva02_tiny_patch14_224", ODD)]

BASE_YAML = """
start_layer: [0, 2]
hierarchy_depth: [0, 2]
num_stages: [1, 3]
stage_ratio: [0.0, 0.5]
proportional_attention: [true, false]
"""


def _space(text: str = BASE_YAML, fingerprint: ModelFingerprint = DEMO) -> SampledSpace:
    return parse_space(text, fingerprint, Path("test_space.yaml"))


@pytest.mark.parametrize("name, expected", [
    ("demo", "demo"), ("dsm_tune_demo_vit", "demo"), ("vit_base_patch16_224", "vit_base"),
    ("vit_large_patch16_224", "vit_large"), ("vit_huge_patch14_224", "vit_huge"), ("vit_tiny", "vit_tiny"),
    ("deit_small_patch16_224", "deit"), ("deit3_base_patch16_224", "deit"),
    ("vit_small_patch14_dinov2", "vit_small"), ("eva02_tiny_patch14_224", "generic"),
])
def test_space_file_is_picked_by_model_name(name, expected):
    path = space_file_for(name)
    assert path.stem == expected
    assert path.is_file()


@pytest.mark.parametrize("name, fingerprint", MODELS, ids=[m[0] for m in MODELS])
def test_every_shipped_space_loads_and_its_mapping_inverts(name, fingerprint):
    space = sampled_space(name, fingerprint)
    assert 0 <= space.start_layer[0] <= space.start_layer[1] < fingerprint.num_blocks
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a pinned value outside its distribution would warn
        for _ in range(40):
            trial = study.ask()
            cfg = space.suggest(trial)
            assert sum(s.blocks for s in cfg.stages) == fingerprint.num_blocks - cfg.start_layer
            # Stored params give the same config again (resume), and params_for finds them (seeds).
            assert space.config_from_params(trial.params).key() == cfg.key()
            assert space.config_from_params(space.params_for(cfg)).key() == cfg.key()
            study.tell(trial, [0.0, 1.0])


def test_depth_is_clipped_to_what_the_grid_allows():
    # 14x14 splits into 2x2 windows of 7x7 tokens, not into 4x4 windows; 16x16 allows windows of 2x2 tokens.
    assert sampled_space("vit_base", VIT_BASE).hierarchy_depth == (0, 1)
    assert sampled_space("vit_huge", VIT_HUGE).hierarchy_depth == (0, 3)
    assert _space(BASE_YAML.replace("[0, 2]\nnum", "[0, 6]\nnum")).hierarchy_depth == (0, 3)


def test_generic_space_scales_with_the_block_count():
    space = sampled_space("eva02_tiny_patch14_224", ODD)
    assert space.source.name == "generic.yaml"
    assert space.start_layer == (0, int(0.45 * 40))
    small = sampled_space("eva02_tiny_patch14_224",
                       ModelFingerprint("eva02_tiny_patch14_224", 8, (16, 16), 1, (224, 224), 192))
    assert small.start_layer == (0, 3)


def test_seeds_are_dense_tome_and_paper_style_and_replay_through_optuna():
    space = sampled_space("vit_base", VIT_BASE)
    seeds = space.seeds()
    kinds = [s.kind for s in seeds]
    assert kinds[0] == "dense" and kinds.count("tome") == 3 and kinds.count("paper") >= 1
    dense = seeds[0].config
    assert all(stage.ratio == 0.0 for stage in dense.stages)
    assert token_schedule(dense) == [196] * 12
    for seed in seeds:
        if seed.kind == "tome":
            cfg = seed.config
            assert (cfg.start_layer, cfg.hierarchy_depth, len(cfg.stages)) == (0, 0, 1)
            assert cfg.stages[0].r in (8, 12, 14)   # ToMe's own r for ViT-B/16 are 8..16
        if seed.kind == "paper":
            assert seed.config.start_layer == 2 and seed.config.hierarchy_depth == 1
            assert len(seed.config.stages) == 2
    # Enqueued seeds come back out of Optuna as exactly these configs, without out-of-range warnings leaking.
    study = optuna.create_study(directions=["minimize", "minimize"])
    for seed in seeds:
        params = space.params_for(seed.config)
        study.enqueue_trial(params, user_attrs={**replay_attrs(params), "seed_kind": seed.kind})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replayed = []
        for _ in seeds:
            trial = study.ask()
            replayed.append((trial.user_attrs["seed_kind"], space.suggest(trial).key()))
            study.tell(trial, [0.0, 1.0])
    assert replayed == [(s.kind, s.config.key()) for s in seeds]


def test_stage_parameters_follow_the_sampled_stage_count():
    space = _space()
    cfg = space.config_from_params({"start_layer": 1, "hierarchy_depth": 1, "num_stages": 3,
                                    "proportional_attention": True, "stage0_split": 0.4, "stage1_split": 0.3,
                                    "stage2_ratio": 0.3, "stage0_ratio": 0.1, "stage1_ratio": 0.2})
    assert [s.blocks for s in cfg.stages] == [2, 1, 2]          # 5 blocks: 40% of 5, then 30% of 3, the rest
    assert [s.ratio for s in cfg.stages] == [0.1, 0.2, 0.3]
    # More stages than blocks left: the config keeps one stage per block.
    cfg = space.config_from_params({"start_layer": 2, "hierarchy_depth": 0, "num_stages": 3,
                                    "proportional_attention": False, "stage0_split": 1.0, "stage1_split": 1.0,
                                    "stage0_ratio": 0.1, "stage1_ratio": 0.1, "stage2_ratio": 0.1})
    assert [s.blocks for s in cfg.stages] == [2, 1, 1]


def test_params_for_refuses_configs_outside_the_space():
    space = _space(BASE_YAML.replace("[0.0, 0.5]", "[0.0, 0.2]"))
    outside = DSMConfig(start_layer=0, hierarchy_depth=0, stages=(Stage(6, ratio=0.3),), model=DEMO)
    with pytest.raises(SpaceError, match="stage0_ratio 0.3 not in"):
        space.params_for(outside)
    off_grid = DSMConfig(start_layer=0, hierarchy_depth=0, stages=(Stage(6, ratio=0.123),), model=DEMO)
    with pytest.raises(SpaceError, match="ratio_step"):
        space.params_for(off_grid)


def test_min_tokens_kept_constraint():
    space = _space(BASE_YAML + "constraints:\n  min_tokens_kept: 0.1\n")
    mild = DSMConfig(start_layer=0, hierarchy_depth=0, stages=(Stage(6, ratio=0.1),), model=DEMO)
    harsh = DSMConfig(start_layer=0, hierarchy_depth=0, stages=(Stage(6, ratio=0.5),), model=DEMO)
    assert space.violation(mild) is None
    assert "under the space's min_tokens_kept 0.1" in space.violation(harsh)
    # Seeds never break the space's own constraints (except the dense reference).
    assert all(space.violation(s.config) is None for s in space.seeds())


def test_plan_key_identifies_configs_that_compute_the_same_model():
    dense = DSMConfig(start_layer=0, hierarchy_depth=0, stages=(Stage(6, ratio=0.0),),
                      proportional_attention=False, model=DEMO)
    # 0.01 of a 16-token window merges nothing: the dense model again, whatever the split or attention flag.
    nothing = DSMConfig(start_layer=1, hierarchy_depth=2, stages=(Stage(2, ratio=0.01), Stage(3, ratio=0.0)),
                        proportional_attention=True, model=DEMO)
    merging = DSMConfig(start_layer=0, hierarchy_depth=0, stages=(Stage(6, ratio=0.1),), model=DEMO)
    assert dense.key() != nothing.key()
    assert plan_key(dense) == plan_key(nothing)
    assert plan_key(merging) != plan_key(dense)
    assert plan_key(merging) != plan_key(merging.replace(proportional_attention=False))


@pytest.mark.parametrize("text, key", [
    ("start_layer: [0, 2]\nhierarchy_depth: [0, 1]\nstage_ratio: [0, 0.5]\nbogus: 1\n", "bogus"),
    ("start_layer: [0, 2]\nstage_ratio: [0.0, 0.7]\n", "stage_ratio"),
    ("start_layer: [0, 6]\nstage_ratio: [0.0, 0.5]\n", "start_layer"),
    ("start_layer: [3, 1]\nstage_ratio: [0.0, 0.5]\n", "start_layer"),
    ("start_layer: [0, 2]\nstart_layer_fraction: [0, 0.5]\nstage_ratio: [0.0, 0.5]\n", "start_layer"),
    ("start_layer: [0, 2]\nhierarchy_depth: [4, 5]\nstage_ratio: [0.0, 0.5]\n", "hierarchy_depth"),
    ("start_layer: [0, 2]\nnum_stages: [0, 2]\nstage_ratio: [0.0, 0.5]\n", "num_stages"),
    ("start_layer: [0, 2]\nstage_ratio: [0.0, 0.45]\nratio_step: 0.1\n", "stage_ratio"),
    ("start_layer: [0, 2]\nnum_stages: [1, 2]\nstage_ratio: [[0, 0.5]]\n", "stage_ratio"),
    ("start_layer: [0, 2]\nstage_ratio: [0.0, 0.5]\nproportional_attention: maybe\n", "proportional_attention"),
    ("start_layer: [0, 2]\nstage_ratio: [0.0, 0.5]\nconstraints: {max_flops: 1}\n", "constraints.max_flops"),
    ("start_layer: [0, 2]\nstage_ratio: [0.0, 0.5]\nconstraints: {min_tokens_kept: 2}\n",
     "constraints.min_tokens_kept"),
    ("start_layer: [0, 2.5]\nstage_ratio: [0.0, 0.5]\n", "start_layer"),
    ("start_layer: [0, 2]\n", "stage_ratio"),
])
def test_bad_space_names_file_and_key(text, key):
    with pytest.raises(SpaceError) as info:
        _space(text)
    message = str(info.value)
    assert message.startswith("test_space.yaml: key ")
    assert f"'{key}'" in message
    assert "\n" not in message
    assert isinstance(info.value, DSMTuneError)


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("start_layer: [0, 2\nstage_ratio: 0.1\n")
    with pytest.raises(SpaceError, match=r"broken.yaml: not valid YAML at line \d+"):
        load_space(bad, "demo", DEMO)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(SpaceError, match="list.yaml: a search space must be a mapping"):
        load_space(listing, "demo", DEMO)
    with pytest.raises(SpaceError, match="not found"):
        load_space(tmp_path / "absent.yaml", "demo", DEMO)


def test_all_shipped_files_are_known_to_the_pattern_list():
    from dsm_tune.search.space import GENERIC_SPACE, SPACE_PATTERNS

    listed = {stem for _, stem in SPACE_PATTERNS} | {GENERIC_SPACE}
    assert {p.stem for p in SPACES_DIR.glob("*.yaml")} == listed
    assert {p.stem for p in SAMPLED_DIR.glob("*.yaml")} == listed


GPU_CHOICE_YAML = """
start_layer: [0, 2]
budget: [0.0, 0.9]
proportional_attention: [true]
proportional_attention_gpu: [true, false]
"""


@pytest.mark.parametrize("target, expected", [
    (None, (True,)), ("cpu", (True,)), ("ort-cpu", (True,)), ("a100", (True, False)), ("h200", (True, False)),
])
def test_gpu_targets_take_the_gpu_proportional_attention_choices(target, expected):
    space = parse_space(GPU_CHOICE_YAML, DEMO, Path("gpu.yaml"), target=target)
    assert space.proportional_attention == expected
    # The axis reaches the sampler: on a GPU target both values are asked for.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {space.suggest(study.ask()).proportional_attention for _ in range(20)}
    assert seen == set(expected)


def test_gpu_choice_from_a_target_file(tmp_path):
    profile = tmp_path / "box.yaml"
    profile.write_text("box: {device: 'cuda:1', dtype: bfloat16, batch_size: 8, compile: false, "
                       "ray_resources: {}, num_gpus: 1}\n")
    assert parse_space(GPU_CHOICE_YAML, DEMO, target=str(profile)).proportional_attention == (True, False)


def test_a_space_without_the_gpu_key_is_the_same_on_every_target():
    text = GPU_CHOICE_YAML.replace("proportional_attention_gpu: [true, false]\n", "")
    assert parse_space(text, DEMO, target="h100").proportional_attention == (True,)
    # Without the key the target is not even resolved (a stand-in study's made-up target stays harmless).
    assert parse_space(text, DEMO, target="no-such-target").proportional_attention == (True,)


def test_bad_gpu_choices_fail_on_the_cpu_too():
    with pytest.raises(SpaceError, match="'proportional_attention_gpu'.*true, false") as info:
        parse_space(GPU_CHOICE_YAML.replace("[true, false]", "[maybe]"), DEMO, Path("gpu.yaml"), target="cpu")
    assert "\n" not in str(info.value) and "gpu.yaml" in str(info.value)


def test_shipped_spaces_keep_the_bias_on_the_cpu_and_let_gpus_drop_it():
    for name, fingerprint in MODELS:
        cpu = load_space(None, name, fingerprint, target="cpu")
        gpu = load_space(None, name, fingerprint, target="h200")
        assert set(gpu.proportional_attention) == {True, False}, name
        if name != "demo":   # the demo tries both everywhere
            assert cpu.proportional_attention == (True,), name
            assert load_space(None, name, fingerprint).proportional_attention == (True,), name
