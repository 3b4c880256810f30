"""The plan cache (`search/study/dedup.py`): the first task of a plan goes to a worker, later ones wait for it or
copy its measurement."""

from __future__ import annotations

from types import SimpleNamespace

from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from dsm_tune.search.study.dedup import PlanCache, Task


def task(key: str, number: int = 0) -> Task:
    return Task(SimpleNamespace(number=number), cfg=None, key=key, seed_kind=None)


def finished(key: str | None, state: TrialState = TrialState.COMPLETE, **attrs):
    user_attrs = {**({"plan_key": key} if key else {}), **attrs}
    values = [0.1, 5.0] if state == TrialState.COMPLETE else None
    return create_trial(state=state, values=values, params={"x": 0.5},
                        distributions={"x": FloatDistribution(0, 1)}, user_attrs=user_attrs)


def test_a_resume_knows_the_plans_measured_before():
    measured, pruned = finished("a"), finished("b", TrialState.PRUNED)
    cache = PlanCache([measured, pruned, finished("c", TrialState.FAIL), finished("d", duplicate_of=0),
                       finished(None)])
    assert set(cache.known) == {"a", "b"}
    assert cache.measured(task("a")) is measured and cache.measured(task("b")) is pruned
    assert cache.measured(task("c")) is None     # failed: to be measured again
    assert cache.measured(task("d")) is None     # a copy is not where a plan was measured
    assert cache.outstanding() == 0


def test_remember_keeps_the_first_measurement_of_a_plan():
    cache = PlanCache()
    first, second = finished("a"), finished("a")
    cache.remember(first)
    cache.remember(second)
    cache.remember(finished(None))
    assert cache.known == {"a": first}


def test_the_first_task_of_a_plan_is_claimed_later_ones_wait():
    cache = PlanCache()
    first, second, third, other = task("a", 0), task("a", 1), task("a", 2), task("b", 3)
    assert cache.claim(first) is True
    assert cache.claim(second) is False and cache.claim(third) is False
    assert cache.claim(other) is True
    assert cache.outstanding() == 4
    assert cache.inflight == {"a": first, "b": other} and cache.waiting == {"a": [second, third]}


def test_release_returns_the_waiters_and_frees_the_plan():
    cache = PlanCache()
    first, second = task("a", 0), task("a", 1)
    cache.claim(first)
    cache.claim(second)
    assert cache.release(first) == [second]
    assert cache.outstanding() == 0 and cache.inflight == {} and cache.waiting == {}
    assert cache.release(first) == []            # twice: nothing left
    assert cache.claim(task("a", 2)) is True     # the plan can be claimed again (e.g. after a failure)


def test_release_of_an_unclaimed_plan_is_harmless():
    cache = PlanCache()
    cache.claim(task("a"))
    assert cache.release(task("zzz")) == []
    assert cache.outstanding() == 1


def test_drain_forgets_everything_in_flight_and_returns_the_waiters():
    cache = PlanCache([finished("known")])
    running, waiting_a, other, waiting_b = task("a", 0), task("a", 1), task("b", 2), task("b", 3)
    for t in (running, waiting_a, other, waiting_b):
        cache.claim(t)
    assert sorted(t.trial.number for t in cache.drain()) == [1, 3]
    assert cache.outstanding() == 0 and cache.inflight == {} and cache.waiting == {}
    assert set(cache.known) == {"known"}         # measurements survive an interrupt
