"""The traced search through the real study driver (Ray on loopback, the stand-in evaluator): every measured config
is an ordinary trial, the proposer's options reach the evaluator, and a study resumes in the middle of a traced
shape, including a trial that was running when the driver died."""

from __future__ import annotations

import io
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from dsm_tune.merging import ModelFingerprint
from dsm_tune.search.folder import StudyFolder
from dsm_tune.search.results import load_study
from dsm_tune.search.space import load_space
from dsm_tune.search.strategies import TracedSpace
from dsm_tune.record import SHAPE as SHAPE_ATTR
from dsm_tune.record import SPEEDUP_PREDICTED as SPEEDUP_PREDICTED_ATTR
from dsm_tune.search.strategies.traced import TracedProposer
from dsm_tune.search.study import StudySpec, run_study
from dsm_tune.search.testing import StandInFactory
from dsm_tune.search.workers import start_ray, stop_ray

DEMO = ModelFingerprint("dsm_tune_demo_vit", 6, (16, 16), 1, (32, 32), 64)


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    started = start_ray(None, num_cpus=2)
    yield
    stop_ray(started)


def _spec(tmp_path: Path, trials: int) -> StudySpec:
    return StudySpec(model="demo", target="cpu", trials=trials, workers=1, out=tmp_path, mlflow=False,
                     max_accuracy_drop=0.5)


def _run(spec: StudySpec):
    return run_study(spec, evaluator_factory=StandInFactory(DEMO), stream=io.StringIO())


def _settled(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def test_traced_study_measures_shapes_and_budgets_as_ordinary_trials(tmp_path):
    result = _run(_spec(tmp_path, trials=12))
    study = load_study(result.study_dir)
    trials = _settled(study)
    assert len(trials) == 12
    assert trials[0].user_attrs["seed_kind"] == "dense" and trials[0].params["budget"] == 0.0
    # Every other trial belongs to a shape, starting with ToMe's; parameters are the shape's and the budget.
    assert all(SHAPE_ATTR in t.user_attrs for t in trials[1:])
    assert trials[1].user_attrs["seed_kind"] == "tome"
    assert {"start_layer", "hierarchy_depth", "front_loading", "proportional_attention", "budget"} <= \
        set(trials[1].params)
    # The evaluator got the screen and the timing policy; the prediction is recorded beside the measurement.
    options = trials[2].user_attrs["options_seen"]
    assert options["screen_drop"] == 0.5 and options["timing"]["max_drop"] == 0.5
    assert all(SPEEDUP_PREDICTED_ATTR in t.user_attrs for t in trials[1:])
    # A shape's budgets are never measured twice, and they bracket the limit.
    by_shape: dict[str, list[optuna.trial.FrozenTrial]] = {}
    for trial in trials[1:]:
        by_shape.setdefault(trial.user_attrs[SHAPE_ATTR], []).append(trial)
    tome = by_shape[trials[1].user_attrs[SHAPE_ATTR]]
    budgets = [t.params["budget"] for t in tome]
    assert len(budgets) == len(set(budgets)) >= 3
    drops = [t.user_attrs["accuracy_drop"] for t in tome]
    assert min(drops) <= 0.5 < max(drops)
    assert result.best_path is not None and result.best_path.is_file()


def test_resume_continues_a_traced_shape_and_remeasures_the_trial_a_dead_driver_left(tmp_path):
    first = _run(_spec(tmp_path, trials=3))        # dense + two budgets of the ToMe shape
    study = load_study(first.study_dir)
    tome_key = study.trials[1].user_attrs[SHAPE_ATTR]
    measured = {t.params["budget"] for t in study.trials if t.user_attrs.get(SHAPE_ATTR) == tome_key}
    # What a killed driver leaves: the next proposal asked (parameters stored) but never told.
    storage = StudyFolder.at(first.study_dir).open_storage()
    live = optuna.load_study(study_name=first.study_name, storage=storage)
    space = load_space(None, "demo", DEMO)
    assert isinstance(space, TracedSpace)
    proposer = TracedProposer(space, 0.5)
    for trial in live.get_trials():
        proposer.observe(trial)
    orphan = proposer.propose(live)
    orphan_number, orphan_params = orphan.trial.number, dict(orphan.trial.params)
    storage.remove_session()
    assert orphan.trial.user_attrs[SHAPE_ATTR] == tome_key and orphan_params["budget"] not in measured

    resumed = _run(_spec(tmp_path, trials=6))
    study = load_study(resumed.study_dir)
    assert study.trials[orphan_number].state == TrialState.FAIL
    rerun = [t for t in study.trials if t.user_attrs.get("requeued_from") == orphan_number]
    assert len(rerun) == 1 and rerun[0].params == orphan_params and rerun[0].state != TrialState.FAIL
    # The shape goes on from where it stopped: no budget of it is measured twice.
    tome = [t for t in _settled(study) if t.user_attrs.get(SHAPE_ATTR) == tome_key]
    budgets = [t.params["budget"] for t in tome]
    assert len(budgets) == len(set(budgets)) >= 3
    assert len(_settled(study)) == 6


def test_a_config_that_kills_its_worker_is_stepped_over_and_the_study_completes(tmp_path):
    space = load_space(None, "demo", DEMO)
    tome = space.seed_shapes()[0][1]
    first_budget = round(space.budget[0] + 0.5 * (space.budget[1] - space.budget[0]), 4)
    deadly = space.compile(tome, first_budget).key()
    result = run_study(_spec(tmp_path, trials=6), evaluator_factory=StandInFactory(DEMO, die_on=(deadly,)),
                       stream=io.StringIO())
    study = load_study(result.study_dir)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].params["budget"] == first_budget
    assert len(_settled(study)) == 6
    # The ToMe shape went on below the budget that crashed (treated as infeasible), never asking it again.
    tome_trials = [t for t in study.trials if t.user_attrs.get(SHAPE_ATTR) == tome.key()]
    assert [t.params["budget"] for t in tome_trials].count(first_budget) == 1
    assert any(t.params["budget"] < first_budget for t in _settled(study) if t.user_attrs.get(SHAPE_ATTR) == tome.key())
