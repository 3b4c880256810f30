"""The traced search: shape + budget compilation, budget tracing, the latency model, multi-fidelity
screening, timing decisions, and replay of a study in the middle of a traced shape."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from dsm_tune.evaluation.metrics import AccuracyEvaluator, AccuracyResult
from dsm_tune.evaluation.policy import TimingPolicy
from dsm_tune.evaluation.trial import timing_skip_reason
from dsm_tune.merging import DSMConfig, ModelFingerprint, Stage, block_plan
from dsm_tune.record import SPEEDUP_PREDICTED as SPEEDUP_PREDICTED_ATTR
from dsm_tune.search.space import parse_space
from dsm_tune.search.strategies import SpaceError, TracedSpace
from dsm_tune.search.strategies.traced import TracedProposer
from dsm_tune.search.strategies.traced.latency_model import LatencyModel
from dsm_tune.search.strategies.traced.shapes import TOME_SHAPE, Shape, compile_schedule, tome_budget
from dsm_tune.search.strategies.traced.tracer import BudgetTracer

from tests.evaluation.test_metrics import Lookup, one_hot, toy_data

FP = ModelFingerprint(name="vit_small_patch14_dinov2", num_blocks=12, grid=(16, 16), num_prefix_tokens=1,
                      img_size=(224, 224), embed_dim=384)
SPACE_YAML = """
description: test space
start_layer: [0, 4]
hierarchy_depth: [0, 2]
local_blocks: [1, 4]
front_loading: [-0.5, 2.0]
budget: [0.0, 0.9]
proportional_attention: [true, false]
"""


def traced_space() -> TracedSpace:
    space = parse_space(SPACE_YAML, FP, Path("test.yaml"))
    assert isinstance(space, TracedSpace)
    return space


# shapes --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [1, 2, 5, 8, 13, 16, 20])
def test_tome_shape_reproduces_r_exactly(r):
    cfg = compile_schedule(TOME_SHAPE, tome_budget(r, FP), FP)
    tome = DSMConfig(start_layer=0, hierarchy_depth=0, stages=(Stage(FP.num_blocks, r=r),),
                     proportional_attention=True, model=FP)
    assert cfg.key() == tome.key()


def _tokens(cfg: DSMConfig) -> list[int]:
    return [p.tokens_out for p in block_plan(cfg)]


def test_every_block_loses_tokens_monotonically_with_the_budget():
    rng = random.Random(0)
    for _ in range(25):
        shape = Shape(rng.randint(0, 5), rng.randint(0, 2), rng.randint(1, 4), rng.uniform(-0.5, 2.0),
                      rng.random() < 0.5)
        previous = None
        for step in range(0, 91):
            tokens = _tokens(compile_schedule(shape, step / 100, FP))
            if previous is not None:
                assert all(now <= before for now, before in zip(tokens, previous)), (shape, step)
            previous = tokens


def test_budget_is_what_goes_by_the_end_and_front_loading_moves_it_early():
    initial = FP.grid[0] * FP.grid[1]
    flat = compile_schedule(Shape(2, 0, 1, 0.0, True), 0.5, FP)
    early = compile_schedule(Shape(2, 0, 1, 1.5, True), 0.5, FP)
    for cfg in (flat, early):
        assert abs((initial - _tokens(cfg)[-1]) - 0.5 * initial) <= 2
        assert _tokens(cfg)[:2] == [initial, initial]   # the delay: blocks 0-1 merge nothing
    # Front-loading removes more tokens in the first merging blocks than the flat spread at the same budget.
    assert _tokens(early)[4] < _tokens(flat)[4]


def test_windowed_stages_merge_inside_windows_then_globally():
    cfg = compile_schedule(Shape(1, 2, 2, 0.0, True), 0.6, FP)
    plans = block_plan(cfg)
    assert cfg.hierarchy_depth == 2
    assert [p.windows for p in plans[1:6]] == [16, 16, 4, 4, 1]
    assert sum(p.merged for p in plans[1:5]) > 0


def test_traced_space_keys_and_clear_errors_for_mixed_keys():
    space = traced_space()
    assert space.budget == (0.0, 0.9) and space.front_loading == (-0.5, 2.0)
    with pytest.raises(SpaceError, match="'stage_ratio' belongs to a sampled space.*budget"):
        parse_space(SPACE_YAML + "stage_ratio: [0.0, 0.3]\n", FP)
    with pytest.raises(SpaceError, match="'front_loading' needs 'budget'"):
        parse_space("start_layer: 0\nfront_loading: [0, 1]\nstage_ratio: [0, 0.3]\n", FP)
    with pytest.raises(SpaceError, match="'budget'"):
        parse_space(SPACE_YAML.replace("budget: [0.0, 0.9]", "budget: [0.0, 1.2]"), FP)
    with pytest.raises(SpaceError, match="missing: give 'budget'"):
        parse_space("start_layer: 0\n", FP)


# tracer --------------------------------------------------------------------------------------------------------

def _trace(tracer: BudgetTracer, drop_of) -> list[float]:
    asked = []
    while (budget := tracer.propose()) is not None:
        tracer.claim(budget)
        asked.append(budget)
        tracer.tell(budget, drop_of(budget))
        assert len(asked) < 20
    return asked


@pytest.mark.parametrize("knee", [0.2, 0.45, 0.7])
def test_tracer_finds_the_largest_feasible_budget_of_a_monotone_problem(knee):
    limit = 1.0
    drop_of = lambda b: math.exp(8.0 * (b - knee))        # drop == limit exactly at b == knee
    tracer = BudgetTracer(limit=limit, low=0.0, high=0.9, start=0.5, resolution=0.01, max_evals=4)
    asked = _trace(tracer, drop_of)
    best = tracer.best_feasible()
    assert best is not None and best.drop <= limit
    # Within 4 evaluations the best feasible budget is close to the true boundary (at most ~0.04 below).
    assert knee - 0.045 <= best.budget <= knee
    # Lower targets get a point each near half and a quarter of the limit.
    for share in (0.5, 0.25):
        assert any(0.6 * share <= p.drop <= share for p in tracer.points), share
    assert len(asked) <= 6
    assert tracer.done()


def test_tracer_stops_when_nothing_is_feasible_or_everything_is():
    hopeless = BudgetTracer(limit=1.0, low=0.0, high=0.9, start=0.5, resolution=0.01, max_evals=4)
    _trace(hopeless, lambda b: 5.0 + b)
    assert hopeless.best_feasible() is None
    free = BudgetTracer(limit=1.0, low=0.0, high=0.9, start=0.5, resolution=0.01, max_evals=4)
    _trace(free, lambda b: 0.01 * b)
    assert free.best_feasible().budget == pytest.approx(0.9)


# latency model -------------------------------------------------------------------------------------------------

def _random_configs(count: int, seed: int) -> list[DSMConfig]:
    rng = random.Random(seed)
    return [compile_schedule(Shape(rng.randint(0, 5), rng.randint(0, 2), rng.randint(1, 3), rng.uniform(-0.5, 2),
                                   True), rng.uniform(0.05, 0.9), FP) for _ in range(count)]


def test_latency_model_learns_a_cpu_cost_and_reports_its_error():
    def latency(cfg):   # fixed overhead + linear + quadratic token costs
        plans = block_plan(cfg)
        return 2.0 + sum(0.02 * (p.tokens_in + p.tokens_out) + 4e-5 * p.tokens_in ** 2 for p in plans)

    dense = latency(DSMConfig(0, 0, (Stage(12, ratio=0.0),), model=FP))
    model = LatencyModel(FP, batch_size=8, device="cpu")
    for cfg in _random_configs(12, seed=1):
        model.add(cfg, dense / latency(cfg))
    errors = [abs(model.predict(cfg).speedup / (dense / latency(cfg)) - 1) for cfg in _random_configs(20, seed=2)]
    assert max(errors) < 0.02
    assert model.rel_error is not None and model.rel_error < 0.02


def test_latency_model_finds_the_gpu_tail_effect_steps():
    batch, quantum = 1, 32

    def latency(cfg):   # kernels run in waves: time steps with the rows rounded up to 32
        plans = block_plan(cfg)
        return 1.0 + sum(math.ceil((p.tokens_in + 1) * batch / quantum) * 0.05
                         + math.ceil((p.tokens_out + 1) * batch / quantum) * 0.05 for p in plans)

    dense = latency(DSMConfig(0, 0, (Stage(12, ratio=0.0),), model=FP))
    gpu = LatencyModel(FP, batch_size=batch, device="cuda")
    cpu_like = LatencyModel(FP, batch_size=batch, device="cpu")
    for cfg in _random_configs(16, seed=3):
        gpu.add(cfg, dense / latency(cfg))
        cpu_like.add(cfg, dense / latency(cfg))
    assert gpu.quantum == quantum
    held_out = _random_configs(30, seed=4)
    gpu_error = max(abs(gpu.predict(c).speedup / (dense / latency(c)) - 1) for c in held_out)
    smooth_error = max(abs(cpu_like.predict(c).speedup / (dense / latency(c)) - 1) for c in held_out)
    assert gpu_error < 0.01 < smooth_error


# evaluation: screening and timing decisions ---------------------------------------------------------------------

def test_screening_stops_a_clearly_infeasible_config_on_a_prefix_and_scores_a_close_one_fully():
    labels = [i % 3 for i in range(40)]
    data = toy_data(labels)
    dense = Lookup(one_hot(labels), 3)                                       # 100 % right
    evaluator = AccuracyEvaluator(dense, data, "top1", batch_size=5)
    bad = Lookup(one_hot([(l + 1) % 3 if i % 2 else l for i, l in enumerate(labels)]), 3)   # 50 % right
    screened = evaluator.evaluate(bad, screen_drop=10.0)
    assert screened.aborted and screened.extra.get("screened") and screened.num_images == 10
    assert screened.drop == pytest.approx(50.0) and screened.extra["screen_drop"] == 10.0
    close = Lookup(one_hot([(l + 1) % 3 if i == 7 else l for i, l in enumerate(labels)]), 3)  # 1 wrong: 2.5 pts
    full = evaluator.evaluate(close, screen_drop=10.0)
    assert not full.aborted and full.num_images == 40 and full.drop == pytest.approx(2.5)


def _accuracy(drop: float, aborted: bool = False) -> AccuracyResult:
    return AccuracyResult("feature", drop, 0.0, drop, aborted, 10, {})


def test_timing_is_skipped_only_when_the_config_cannot_enter_the_front():
    policy = TimingPolicy(max_drop=1.0, front=((0.4, 1.50),), predicted_speedup=1.30, margin=0.10)
    assert "over the limit" in timing_skip_reason(_accuracy(1.2), policy)
    assert "over the limit" in timing_skip_reason(_accuracy(0.5, aborted=True), policy)
    assert "dominated" in timing_skip_reason(_accuracy(0.6), policy)          # 1.43x optimistic < 1.50x
    assert timing_skip_reason(_accuracy(0.3), policy) is None                 # lower drop than the front point
    assert timing_skip_reason(_accuracy(0.6), dataclasses.replace(policy, predicted_speedup=1.40)) is None   # could beat it
    assert timing_skip_reason(_accuracy(0.6), None) is None
    # Screened against a faster timed point's lower drop, a partial drop within the limit is not "over the limit":
    # the reason names the bar it cleared.
    screened = AccuracyResult("top1", 0.0, 0.0, 0.0, True, 128, {"screened": True, "screen_drop": -1.0})
    reason = timing_skip_reason(screened, policy)
    assert "over the limit" not in reason and "screened out on 128 images" in reason and "above -1.000" in reason


# the proposer over a synthetic model -----------------------------------------------------------------------------

def _synthetic(cfg: DSMConfig) -> tuple[float, float]:
    """Drop grows with merging, more so in early blocks and less inside windows; latency follows tokens."""
    harm = 0.0
    plans = block_plan(cfg)
    for index, plan in enumerate(plans):
        weight = (3.0 if index < 2 else 1.0) * (0.7 if plan.windows > 1 else 1.0)
        harm += weight * (plan.merged / max(plan.tokens_in, 1)) ** 1.5
    relative = sum(0.1 + 0.9 * (p.tokens_in + p.tokens_out) / 512 for p in plans) / len(plans)
    return 4.0 * harm, 1.0 / relative


def _run(study: optuna.Study, proposer: TracedProposer, trials: int) -> None:
    for _ in range(trials):
        proposal = proposer.propose(study)
        assert proposal is not None
        drop, speedup = _synthetic(proposal.cfg)
        trial = proposal.trial
        trial.set_user_attr("accuracy_drop", drop)
        skipped = timing_skip_reason(_accuracy(drop), proposal.options["timing"])
        if skipped:
            trial.set_user_attr("fail_reason", skipped)
            study.tell(trial, state=TrialState.PRUNED)
        else:
            trial.set_user_attr("speedup", speedup)
            study.tell(trial, [drop, 1.0 / speedup])
        proposer.observe(study.trials[trial.number])


def test_traced_search_beats_a_tome_sweep_on_a_synthetic_model():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = traced_space()
    study = optuna.create_study(directions=["minimize", "minimize"])
    proposer = TracedProposer(space, max_drop=1.0, seed=0)
    _run(study, proposer, 30)
    feasible = [t.user_attrs["speedup"] for t in study.trials
                if t.state == TrialState.COMPLETE and t.user_attrs["accuracy_drop"] <= 1.0]
    sweep = [s for d, s in (_synthetic(space.compile(TOME_SHAPE, tome_budget(r, FP))) for r in range(2, 21, 2))
             if d <= 1.0]
    assert max(feasible) >= 1.05 * max(sweep)
    # Every timed trial records the speedup the model predicted for it.
    timed = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert all(SPEEDUP_PREDICTED_ATTR in t.user_attrs for t in timed)
    assert proposer.summary()["latency_model_rel_error"] < 0.05


def test_replay_resumes_in_the_middle_of_a_traced_shape():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = traced_space()
    study = optuna.create_study(directions=["minimize", "minimize"])
    first = TracedProposer(space, max_drop=1.0, seed=0)
    _run(study, first, 3)                      # dense + two budgets of the first (ToMe) shape
    open_runs = [run for run in first.runs.values() if not run.finished]
    assert len(open_runs) == 1 and len(open_runs[0].tracer.points) == 2
    resumed = TracedProposer(space, max_drop=1.0, seed=0)
    for trial in study.trials:
        resumed.observe(trial)
    key = open_runs[0].shape.key()
    assert [(p.budget, p.drop) for p in resumed.runs[key].tracer.points] == \
        [(p.budget, p.drop) for p in open_runs[0].tracer.points]
    # The resumed study continues that shape where it stopped, with the budget the first run would have asked.
    expected = open_runs[0].tracer.propose()
    proposal = resumed.propose(study)
    assert proposal.trial.user_attrs["shape"] == key
    assert proposal.trial.params["budget"] == pytest.approx(round(expected, 4))
    measured = {round(t.params["budget"], 4) for t in study.trials[:-1] if t.user_attrs.get("shape") == key}
    assert round(proposal.trial.params["budget"], 4) not in measured


def test_every_shipped_traced_space_loads_and_compiles_for_its_models():
    from dsm_tune.search.space import load_space

    from .test_space import MODELS

    for name, fingerprint in MODELS:
        space = load_space(None, name, fingerprint)
        assert isinstance(space, TracedSpace), name
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(10):
            trial = study.ask()
            cfg = space.suggest(trial)
            assert sum(s.blocks for s in cfg.stages) == fingerprint.num_blocks - cfg.start_layer
            assert space.config_from_params(trial.params).key() == cfg.key()
            study.tell(trial, 0.0)
        assert [kind for kind, _ in space.seed_shapes()][0] == "tome"


def test_full_scoring_only_when_the_config_could_enter_the_front():
    proposer = TracedProposer(traced_space(), max_drop=1.0)
    cfg = compile_schedule(TOME_SHAPE, tome_budget(4, FP), FP)
    assert proposer._options(cfg)["screen_drop"] == 1.0               # nothing timed yet: screen at the limit
    predicted = proposer.latency.predict(cfg).speedup
    # A timed point far faster than this config can be makes its drop the bar; a slower one does not.
    proposer.timed_front = [(0.3, 3.0 * predicted), (0.1, 1.0)]
    options = proposer._options(cfg)
    assert options["screen_drop"] == 0.3
    assert options["timing"].front == tuple(proposer.timed_front)


def test_a_requeued_dense_trial_is_measured_again_without_blocking_any_shape():
    from dsm_tune.record import QUEUED_AGAIN as QUEUED_AGAIN_ATTR
    from dsm_tune.search.study.tell import enqueue_again

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = traced_space()
    study = optuna.create_study(directions=["minimize", "minimize"])
    first = TracedProposer(space, max_drop=1.0)
    dense = first.propose(study)
    assert dense.seed_kind == "dense"
    dense.trial.set_user_attr(QUEUED_AGAIN_ATTR, True)          # what the driver does when Ctrl-C hits it
    study.tell(dense.trial, state=TrialState.FAIL)
    enqueue_again(study, dict(dense.trial.params), dense.trial.number, "dense")
    _run(study, first, 4)                                         # the requeued dense first, then the ToMe shape
    numbers = [t.number for t in study.trials if t.user_attrs.get("requeued_from") == dense.trial.number]
    assert len(numbers) == 1 and study.trials[numbers[0]].state == TrialState.COMPLETE
    tome = [t for t in study.trials if t.user_attrs.get("seed_kind") == "tome"]
    assert len(tome) == 3 and len({t.params["budget"] for t in tome}) == 3


def test_timing_policy_for_a_prediction_sets_the_margin_and_the_screen_bar():
    policy = TimingPolicy.for_prediction(1.0, [(0.4, 1.50), (0.2, 1.20)], 1.30, rel_error=0.02, min_margin=0.10)
    assert policy.margin == pytest.approx(0.10)                              # 2 * 0.02 is below the floor
    assert policy.optimistic_speedup() == pytest.approx(1.43)
    assert policy.screen_drop() == 0.4                                       # only the 1.50x point is as fast
    assert TimingPolicy(max_drop=1.0).screen_drop() == 1.0
    assert TimingPolicy.of(policy.to_dict()) == policy
