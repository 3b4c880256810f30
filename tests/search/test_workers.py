"""Ray workers: the host timing guard (reader-writer flock), placement from the target profile, and the pool's
handling of finished, failed and dead actors."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from dsm_tune.merging import DSMConfig, ModelFingerprint, Stage
from dsm_tune.search.testing import StandInEvaluator, StandInFactory
from dsm_tune.search.workers import (
    Placement, TimingGuard, TrialDone, TrialWorker, WorkerDied, WorkerPool, WorkerReady, start_ray, stop_ray,
)

DEMO = ModelFingerprint("dsm_tune_demo_vit", 6, (16, 16), 1, (32, 32), 64)
DENSE = DSMConfig(start_layer=0, hierarchy_depth=0, stages=(Stage(6, ratio=0.0),), model=DEMO)
MERGING = DSMConfig(start_layer=1, hierarchy_depth=1, stages=(Stage(2, ratio=0.2), Stage(3, ratio=0.2)), model=DEMO)


def _hold(context, entered: threading.Event, release: threading.Event, log: list, name: str) -> threading.Thread:
    def body():
        with context:
            log.append(("in", name, time.monotonic()))
            entered.set()
            release.wait(5)
            log.append(("out", name, time.monotonic()))
    thread = threading.Thread(target=body)
    thread.start()
    return thread


def test_accuracy_passes_overlap_but_timing_runs_alone(tmp_path):
    guards = [TimingGuard(tmp_path / "timing.lock") for _ in range(3)]
    log: list = []
    a_in, b_in, t_in = threading.Event(), threading.Event(), threading.Event()
    release_a, release_b, release_t = threading.Event(), threading.Event(), threading.Event()
    a = _hold(guards[0].accuracy(), a_in, release_a, log, "accuracy-a")
    b = _hold(guards[1].accuracy(), b_in, release_b, log, "accuracy-b")
    assert a_in.wait(5) and b_in.wait(5), "two accuracy passes hold the lock together"
    timer = _hold(guards[2].timing(), t_in, release_t, log, "timing")
    assert not t_in.wait(0.3), "timing must wait while accuracy passes run"
    release_a.set()
    assert not t_in.wait(0.3)
    release_b.set()
    assert t_in.wait(5), "timing starts once the last accuracy pass is done"
    # A new accuracy pass waits for the timing to finish.
    c_in, release_c = threading.Event(), threading.Event()
    c = _hold(TimingGuard(tmp_path / "timing.lock").accuracy(), c_in, release_c, log, "accuracy-c")
    assert not c_in.wait(0.3)
    release_t.set()
    assert c_in.wait(5)
    release_c.set()
    for thread in (a, b, timer, c):
        thread.join(5)
    timing_in = next(t for kind, name, t in log if (kind, name) == ("in", "timing"))
    timing_out = next(t for kind, name, t in log if (kind, name) == ("out", "timing"))
    for kind, name, moment in log:
        if name != "timing":
            assert not timing_in < moment < timing_out, f"{name} {kind} during the timed section"


def test_a_waiting_timer_is_not_starved_by_new_accuracy_passes(tmp_path):
    path = tmp_path / "timing.lock"
    log: list = []
    first_in, release_first = threading.Event(), threading.Event()
    first = _hold(TimingGuard(path).accuracy(), first_in, release_first, log, "first")
    assert first_in.wait(5)
    timer_in, release_timer = threading.Event(), threading.Event()
    timer = _hold(TimingGuard(path).timing(), timer_in, release_timer, log, "timing")
    time.sleep(0.2)   # the timer is now queued on the turnstile and the exclusive lock
    late_in, release_late = threading.Event(), threading.Event()
    late = _hold(TimingGuard(path).accuracy(), late_in, release_late, log, "late")
    assert not late_in.wait(0.3), "an accuracy pass arriving after a waiting timer queues behind it"
    release_first.set()
    assert timer_in.wait(5)
    assert not late_in.is_set()
    release_timer.set()
    assert late_in.wait(5)
    release_late.set()
    for thread in (first, timer, late):
        thread.join(5)


def test_worker_times_the_whole_evaluation_exclusively(tmp_path, monkeypatch):
    class PlainEvaluator:          # the Evaluator protocol at its smallest
        fingerprint = DEMO
        baseline = {"latency_ms": 1.0}
        data_fingerprint = None

        def __init__(self):
            self.seen_exclusive = None

        def evaluate(self, cfg):
            probe = TimingGuard(tmp_path / "timing.lock")
            import fcntl
            import os

            fd = os.open(probe.path, os.O_RDWR | os.O_CREAT)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    self.seen_exclusive = False
                    fcntl.flock(fd, fcntl.LOCK_UN)
                except BlockingIOError:
                    self.seen_exclusive = True
            finally:
                os.close(fd)
            return {"accuracy_drop": 0.0, "latency_ms": 1.0}

    monkeypatch.setattr(TimingGuard.__init__, "__defaults__", (tmp_path / "timing.lock",))
    worker = TrialWorker(PlainEvaluator, "worker-0", guard_timing=True)
    answer = worker.evaluate(DENSE)
    assert answer.result["latency_ms"] == 1.0 and "lock_wait_s" in answer.result
    assert worker.evaluator.seen_exclusive is True
    # Without the guard (GPU targets) nothing is locked.
    free = TrialWorker(PlainEvaluator, "worker-1", guard_timing=False)
    free.evaluate(DENSE)
    assert free.evaluator.seen_exclusive is False


def test_worker_reports_construction_and_evaluation_errors_as_data():
    from dsm_tune.search.space import SpaceError

    def broken_factory():
        raise SpaceError("demo.yaml: key 'x': bad")

    worker = TrialWorker(broken_factory, "worker-0", guard_timing=False)
    info = worker.describe()
    assert isinstance(info.error, SpaceError) and "key 'x'" in info.error_text and not info.started
    failing = TrialWorker(StandInFactory(DEMO, fail_on=("*",)), "worker-1", guard_timing=False)
    answer = failing.evaluate(DENSE)
    assert answer.error.startswith("RuntimeError: stand-in failure") and answer.user_error is False


def test_placement_follows_the_target_profile():
    cpu = SimpleNamespace(device="cpu", num_gpus=0, ray_resources={})
    a100 = SimpleNamespace(device="cuda", num_gpus=1, ray_resources={"accelerator_type:A100": 0.001})
    assert Placement.for_target(cpu, workers=2).guard_timing is True
    assert Placement.for_target(cpu, workers=1).guard_timing is False
    gpu = Placement.for_target(a100, workers=4)
    assert gpu.num_gpus == 1.0 and gpu.resources == {"accelerator_type:A100": 0.001} and not gpu.guard_timing


def test_stand_in_metrics_trade_accuracy_for_speed():
    evaluator = StandInEvaluator(DEMO)
    dense, merged = evaluator.evaluate(DENSE), evaluator.evaluate(MERGING)
    assert dense["accuracy_drop"] == 0.0 and dense["speedup"] == pytest.approx(1.0)
    assert merged["accuracy_drop"] > 0 and merged["speedup"] > 1.0 and merged["tokens_kept"] < 1.0
    again = evaluator.evaluate(MERGING)
    assert {k: v for k, v in again.items() if k != "eval_seconds"} == \
        {k: v for k, v in merged.items() if k != "eval_seconds"}, "deterministic"


@pytest.mark.slow
def test_pool_runs_trials_and_replaces_a_dead_actor():
    started = start_ray(None, num_cpus=2)
    try:
        import ray

        assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
        pool = WorkerPool(StandInFactory(DEMO, die_on=(MERGING.key(),)), 2, Placement())
        events = []
        deadline = time.monotonic() + 60
        while len(pool.idle_slots()) < 2 and time.monotonic() < deadline:
            events += pool.wait(0.5)
        assert [type(e) for e in events] == [WorkerReady, WorkerReady]
        assert events[0].info.fingerprint == DEMO.to_dict()
        first, second = pool.idle_slots()
        pool.submit(first, DENSE, "dense-task")
        pool.submit(second, MERGING, "killer-task")
        outcome = {}
        while len(outcome) < 2 and time.monotonic() < deadline:
            for event in pool.wait(0.5):
                outcome[event.task] = event
        assert isinstance(outcome["dense-task"], TrialDone)
        assert outcome["dense-task"].result["accuracy_drop"] == 0.0
        died = outcome["killer-task"]
        assert isinstance(died, WorkerDied) and "died mid-trial" in died.reason and died.slot is second
        pool.replace(second)
        assert second.name == "worker-1.1" and not second.idle
        while not second.idle and time.monotonic() < deadline:
            pool.wait(0.5)
        assert second.idle
        assert pool.cancel_all() == []
    finally:
        stop_ray(started)
