"""The traced search's operator choice: shapes that prune first and merge by a variant after, the space keys that
turn it on, its seeds, and what stays exactly as it was for a space without them."""

from __future__ import annotations

import dataclasses
import io
import random
from pathlib import Path

import optuna
import pytest

from dsm_tune.merging import ModelFingerprint, block_plan
from dsm_tune.record import SEED_KIND
from dsm_tune.search.space import SPACES_DIR, parse_space
from dsm_tune.search.strategies import SpaceError, TracedSpace
from dsm_tune.search.strategies.traced.shapes import TOME_SHAPE, Shape, compile_schedule, mutate, tome_budget
from dsm_tune.search.study import StudySpec, run_study
from dsm_tune.search.testing import StandInFactory
from dsm_tune.search.tracking import NullTracker
from tests.search.strategies.test_traced_search import FP, SPACE_YAML

OPERATOR_YAML = SPACE_YAML + "prune_blocks: [0, 4]\nmerge_operator: [merge, merge_norm, merge_energy]\n"


def space(text: str = OPERATOR_YAML) -> TracedSpace:
    parsed = parse_space(text, FP, Path("ops.yaml"))
    assert isinstance(parsed, TracedSpace)
    return parsed


class Recorder:
    """Answers suggest_* like a fixed trial and records which parameters were asked."""

    def __init__(self, params):
        self.params, self.asked = params, []

    def _get(self, name, *_, **__):
        self.asked.append(name)
        return self.params[name]

    suggest_int = suggest_float = suggest_categorical = _get


def test_a_space_without_operators_asks_and_enqueues_what_it_always_did():
    plain = space(SPACE_YAML)
    assert not plain.searches_operators
    params = plain.params_for(TOME_SHAPE, 0.5)
    assert set(params) == {"start_layer", "hierarchy_depth", "local_blocks", "front_loading",
                           "proportional_attention", "budget"}
    recorder = Recorder({**params, "hierarchy_depth": 1})
    plain.suggest(recorder)
    assert "prune_blocks" not in recorder.asked and "merge_operator" not in recorder.asked
    assert TOME_SHAPE.key() == "s0-d0-k0-a0.000-p1"   # the key studies stored before operators existed
    assert [kind for kind, _ in plain.seed_shapes()] == ["tome", "paper", "late"]


def test_default_operators_compile_to_the_same_config_for_every_shape_and_budget():
    rng = random.Random(0)
    for _ in range(50):
        shape = Shape(rng.randint(0, 4), rng.randint(0, 2), rng.randint(1, 4), rng.uniform(-1, 1.5), True)
        budget = rng.uniform(0.0, 0.9)
        cfg = compile_schedule(shape, budget, FP)
        assert all(stage.operator == "merge" for stage in cfg.stages)
        assert cfg.format_version == 1


def test_prune_blocks_hand_over_to_the_merge_operator_at_the_wanted_block():
    shape = dataclasses.replace(TOME_SHAPE, prune_blocks=4, merge_operator="merge_norm")
    cfg = compile_schedule(shape, tome_budget(8, FP), FP)
    operators = [plan.operator for plan in block_plan(cfg)]
    assert operators == ["prune"] * 4 + ["merge_norm"] * 8
    default = compile_schedule(TOME_SHAPE, tome_budget(8, FP), FP)
    assert [p.tokens_out for p in block_plan(cfg)] == [p.tokens_out for p in block_plan(default)]


def test_a_windowed_stage_prunes_whole_when_the_hand_over_falls_inside_it():
    shape = Shape(2, 1, 3, 0.0, True, prune_blocks=1, merge_operator="merge")
    plans = block_plan(compile_schedule(shape, 0.5, FP))
    merging = plans[2:]
    assert [p.windows for p in merging[:3]] == [4, 4, 4]          # the windowed level keeps its three blocks
    assert [p.operator for p in merging[:3]] == ["prune"] * 3 and merging[3].operator == "merge"


def test_operator_shapes_have_their_own_keys_and_round_trip_through_params():
    ops = space()
    shape = Shape(1, 0, 1, -0.5, True, prune_blocks=2, merge_operator="merge_energy")
    assert shape.key() != dataclasses.replace(shape, prune_blocks=0, merge_operator="merge").key()
    params = ops.params_for(shape, 0.4)
    assert params["prune_blocks"] == 2 and params["merge_operator"] == "merge_energy"
    assert ops.config_from_params(params).key() == compile_schedule(shape, 0.4, FP).key()
    recorder = Recorder(params)
    assert ops.suggest(recorder).key() == compile_schedule(shape, 0.4, FP).key()
    assert recorder.asked[-3:] == ["prune_blocks", "merge_operator", "budget"]


def test_operator_seeds_follow_tome_s_own():
    seeds = space().seed_shapes()
    kinds = [kind for kind, _ in seeds]
    assert kinds == ["tome", "paper", "late", "prune-merge", "energy"]
    by_kind = dict(seeds)
    assert by_kind["tome"].default_operators and by_kind["paper"].default_operators   # unchanged
    assert by_kind["prune-merge"] == dataclasses.replace(by_kind["tome"], prune_blocks=4, merge_operator="merge_norm")
    assert by_kind["energy"] == dataclasses.replace(by_kind["tome"], merge_operator="merge_energy")


def test_mutation_moves_operators_only_where_the_space_searches_them():
    rng = random.Random(1)
    plain, ops = space(SPACE_YAML), space()
    shape = Shape(1, 1, 2, 0.0, True)
    assert all(mutate(shape, plain, rng).default_operators for _ in range(200))
    moved = [mutate(shape, ops, rng) for _ in range(200)]
    assert any(m.prune_blocks for m in moved) and any(m.merge_operator != "merge" for m in moved)
    assert all(0 <= m.prune_blocks <= 4 and m.merge_operator in ops.merge_operators for m in moved)


@pytest.mark.parametrize("line, message", [
    ("prune_blocks: [0, 13]", r"'prune_blocks': must lie within \[0, 12\]"),
    ("merge_operator: [merge, prune]", "'merge_operator': must be one or a list of merge, merge_norm, merge_energy"),
    ("merge_operator: []", "'merge_operator'"),
])
def test_bad_operator_keys_are_named(line, message):
    with pytest.raises(SpaceError, match=message):
        parse_space(SPACE_YAML.replace("start_layer: [0, 4]", "start_layer: [0, 0]") + line + "\n", FP,
                    Path("ops.yaml"))


def test_the_shipped_operator_spaces_parse_for_their_models():
    from dsm_tune.evaluation.models import build_model

    demo = parse_space((SPACES_DIR / "operators" / "demo.yaml").read_text(),
                       ModelFingerprint.from_model(build_model("demo")), SPACES_DIR / "operators" / "demo.yaml")
    vit = parse_space((SPACES_DIR / "operators" / "vit_small.yaml").read_text(), FP,
                      SPACES_DIR / "operators" / "vit_small.yaml")
    assert demo.searches_operators and vit.searches_operators


def test_a_traced_study_on_an_operator_space_measures_operator_configs(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = StudySpec(model="demo", target="cpu", trials=16, out=tmp_path, mlflow=False, no_ray=True, confirm=0.0,
                     space=str(SPACES_DIR / "operators" / "demo.yaml"), seed=0)
    demo = ModelFingerprint("dsm_tune_demo_vit", 6, (16, 16), 1, (32, 32), 64)
    run_study(spec, evaluator_factory=StandInFactory(demo), tracker=NullTracker(), stream=io.StringIO())
    trials = [t for t in spec.folder.load().trials if t.state.is_finished()]
    kinds = {t.user_attrs.get(SEED_KIND) for t in trials}
    assert {"tome", "prune-merge"} <= kinds
    operators = {stage["operator"] for t in trials for stage in t.user_attrs["config"]["merge"]["stages"]
                 if "operator" in stage}
    assert "prune" in operators


def test_operators_a_space_fixes_apply_to_every_trial():
    fixed = space(SPACE_YAML + "prune_blocks: 2\nmerge_operator: merge_norm\n")
    assert not fixed.searches_operators
    params = fixed.params_for(fixed.seed_shapes()[0][1], 0.5)
    assert "prune_blocks" not in params and "merge_operator" not in params   # no parameter, yet applied:
    assert [p.operator for p in block_plan(fixed.config_from_params(params))][:3] == ["prune", "prune", "merge_norm"]
    recorder = Recorder(params)
    assert fixed.suggest(recorder).key() == fixed.config_from_params(params).key()
