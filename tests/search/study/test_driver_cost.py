"""The driver's work per told trial does not grow with the study: trials.csv is kept one row at a time (and still
says what `trials_frame` says), the Teller takes the trial `study.tell` returns, the progress line keeps its front
as points come in."""

from __future__ import annotations

import errno
import io
import math
import random
import shutil

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from dsm_tune.search.diskspace import write_atomically
from dsm_tune.search.folder import StudyFolder
from dsm_tune.search.progress import Progress
from dsm_tune.search.results import TrialsTable, front, trials_frame
from dsm_tune.search.study.outputs import DerivedWrites, LiveOutputs
from dsm_tune.search.study.tell import Teller
from dsm_tune.search.tracking import NullTracker

from tests.helpers.synthetic_study import (
    BASELINE_LATENCY_MS, add_aborted, add_failed, add_measured, create_study, make_config, trial_figures,
)


def _replace(path, fill):
    write_atomically(path, fill, path.name)


class Counting(TrialsTable):
    """Counts whole rewrites (the rest were appends)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rewrites = 0

    def _rewrite(self, path, replace):
        self.rewrites += 1
        super()._rewrite(path, replace)


def _expected_text(study: optuna.Study) -> str:
    text = io.StringIO()
    trials_frame(study).to_csv(text, index=False)
    return text.getvalue()


def _config(i: int):
    return make_config(i % 4, 1, [round(0.05 + 0.01 * i, 3)])


def test_live_trials_csv_is_the_frame_of_the_trials_told(tmp_path):
    study, study_dir = create_study(tmp_path, "live")
    path = study_dir / "trials.csv"
    table = Counting()
    table.load(study)
    table.write(path, _replace)
    steps = [
        lambda i: add_measured(study, _config(i), 0.2 * i, 9.0 - 0.1 * i),
        lambda i: add_measured(study, _config(i), 0.3, 8.5),
        lambda i: add_measured(study, _config(i), 0.1, 8.0, figures={"speedup_noisy": True}),   # a new column
        lambda i: add_measured(study, _config(i), 0.5, 7.5),
        lambda i: add_failed(study, _config(i)),                                                 # num_images: NaN
        lambda i: add_aborted(study, _config(i)),
        lambda i: add_measured(study, _config(i), 0.4, 7.0),
        lambda i: add_measured(study, _config(i), 0.6, 6.5),
    ]
    for i, step in enumerate(steps):
        table.told(step(i))
        table.write(path, _replace)
        assert path.read_text() == _expected_text(study), f"after trial {i}"
    assert table.frame().equals(trials_frame(study))
    # The first write, the new column, the failed trial (its missing figures turn integer columns to floats) and
    # the aborted one (values it lacks, types that change): the other trials were appended.
    assert table.rewrites < len(steps) - 2, table.rewrites


def test_a_moving_dense_reference_rewrites_every_row_under_the_new_one(tmp_path):
    study, study_dir = create_study(tmp_path, "drift")
    path = study_dir / "trials.csv"
    table = TrialsTable(reference_interval_s=0.0)
    table.load(study)
    for i, dense in enumerate([10.0, 12.0, 9.0, 11.0]):
        latency = dense / 1.5
        figures = trial_figures(0.2, latency, baseline_latency_ms=dense, speedup=1.5)
        table.told(add_measured(study, _config(i), 0.2, latency, figures=figures))
        table.write(path, _replace)
        assert path.read_text() == _expected_text(study), f"after trial {i}"


def test_a_moving_reference_within_the_interval_keeps_one_reference_for_every_row(tmp_path):
    study, study_dir = create_study(tmp_path, "drift-later")
    path = study_dir / "trials.csv"
    table = TrialsTable(reference_interval_s=3600.0)
    table.load(study)
    for i, dense in enumerate([10.0, 12.0, 9.0]):
        figures = trial_figures(0.2, dense / 1.5, baseline_latency_ms=dense, speedup=1.5)
        table.told(add_measured(study, _config(i), 0.2, dense / 1.5, figures=figures))
        table.write(path, _replace)
    written = pd.read_csv(path)
    assert written["baseline_latency_ms"].nunique() == 1
    assert len(written) == 3 and table.frame().equals(trials_frame(study))


def test_trials_told_out_of_order_and_told_again_read_back_as_the_frame(tmp_path):
    study, study_dir = create_study(tmp_path, "order")
    path = study_dir / "trials.csv"
    first, second = study.ask(), study.ask()       # two workers: the later trial finishes first
    table = TrialsTable()
    table.load(study)                               # both RUNNING
    table.write(path, _replace)
    for trial, drop in ((second, 0.3), (first, 0.1)):
        for key, value in trial_figures(drop, 8.0).items():
            trial.set_user_attr(key, value)
        table.told(study.tell(trial, [drop, 8.0]))
        table.write(path, _replace)
    third = study.ask()
    table.told(study.tell(third, state=TrialState.FAIL))
    table.write(path, _replace)
    live = pd.read_csv(path).sort_values("number").reset_index(drop=True)
    final = io.StringIO(_expected_text(study))
    pd.testing.assert_frame_equal(live, pd.read_csv(final), check_dtype=False)


def test_live_outputs_keep_trials_csv_without_reading_the_study_again(tmp_path, monkeypatch):
    study, study_dir = create_study(tmp_path, "outputs")
    outputs = LiveOutputs(StudyFolder.at(study_dir), 1.0, NullTracker(), interval_s=None)
    frozen = add_measured(study, _config(0), 0.1, 9.0)
    outputs.trial_told(study, frozen)      # the first tell reads the storage once
    storage, reads = study._storage, []
    read_all = storage.get_all_trials
    monkeypatch.setattr(storage, "get_all_trials", lambda *a, **k: reads.append(1) or read_all(*a, **k))
    for i in range(1, 6):
        frozen = add_measured(study, _config(i), 0.1 * i, 9.0 - i * 0.2)
        reads.clear()
        outputs.trial_told(study, frozen)
        assert reads == [], f"trial {i}"
    assert (study_dir / "trials.csv").read_text() == _expected_text(study)


def test_a_full_disk_while_appending_is_warned_once_and_leaves_the_last_whole_file(tmp_path, monkeypatch):
    study, study_dir = create_study(tmp_path, "full")
    said = []
    outputs = LiveOutputs(StudyFolder.at(study_dir), 1.0, NullTracker(), interval_s=None,
                          derived=DerivedWrites(said.append))
    outputs.trial_told(study, add_measured(study, _config(0), 0.1, 9.0))
    before = (study_dir / "trials.csv").read_text()
    copy = shutil.copyfile

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full)
    for i in (1, 2):
        outputs.trial_told(study, add_measured(study, _config(i), 0.2, 8.0))
    assert len(said) == 1 and "trials.csv" in said[0]
    assert (study_dir / "trials.csv").read_text() == before
    assert [p.name for p in study_dir.iterdir() if p.name.startswith(".trials")] == []
    monkeypatch.setattr(shutil, "copyfile", copy)
    outputs.trial_told(study, add_measured(study, _config(3), 0.3, 7.0))
    assert (study_dir / "trials.csv").read_text() == _expected_text(study)


class CountingStorage:
    """The study's storage, counting the trials read one by one."""

    def __init__(self, storage):
        self.storage, self.get_trial_calls = storage, 0

    def get_trial(self, trial_id):
        self.get_trial_calls += 1
        return self.storage.get_trial(trial_id)

    def __getattr__(self, name):
        return getattr(self.storage, name)


def test_teller_hands_on_the_trial_that_tell_returned(tmp_path):
    study, _ = create_study(tmp_path, "teller")
    storage = CountingStorage(study._storage)
    told = []
    teller = Teller(study, storage, 1.0, told.append)
    teller.prune(study.ask(), "not measured: over the space's constraint")
    teller.fail(study.ask(), "evaluation failed: boom", worker="worker-0/cpu")
    assert storage.get_trial_calls == 0
    assert [(t.number, t.state) for t in told] == [(0, TrialState.PRUNED), (1, TrialState.FAIL)]
    assert told[0].user_attrs["fail_reason"].startswith("not measured") and told[1].user_attrs["worker"]
    assert told[0].datetime_complete is not None


def test_progress_front_and_best_follow_every_point(tmp_path):
    rng = random.Random(3)
    progress = Progress(total=500, max_drop=1.0, stream=io.StringIO())
    points = []
    for number in range(400):
        drop, speedup = round(rng.uniform(0.0, 1.2), 2), rng.choice([1.0, 1.5, 2.0, 2.5, rng.uniform(1.0, 3.0)])
        progress.record("COMPLETE", drop, BASELINE_LATENCY_MS / speedup, speedup, number)
        if drop <= 1.0:
            points.append((1.0 / speedup, drop, number, speedup))
        assert progress.pareto_size == len(front(p[:3] for p in points))
        best = max(points, key=lambda p: p[3]) if points else None
        assert (progress.best_point.number if progress.best_point else None) == (best[2] if best else None)
    assert math.isclose(progress.best_speedup, max(p[3] for p in points))


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
