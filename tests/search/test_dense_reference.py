"""One dense reference per study, the same latency figures on every surface, and speedups whose noise is known."""

from __future__ import annotations

import math

import pytest

from dsm_tune.evaluation.latency import LatencyResult
from dsm_tune.search.dense_reference import DenseReference


def _latency(speedup: float, spread: float) -> LatencyResult:
    return LatencyResult(baseline_ms=10.0, baseline_iqr_ms=0.1, candidate_ms=10.0 / speedup, candidate_iqr_ms=0.1,
                         speedup=speedup, speedup_iqr=spread * speedup, compile_s=None, batch_size=1,
                         dtype="float32", device="cpu")


def test_noisy_timing_is_timed_again_and_flagged_only_when_still_noisy(monkeypatch):
    """A first timing beyond the spread bound is timed once more; the quieter one is kept, and the trial is flagged
    `speedup_noisy` only if that one is still beyond the bound."""
    from dsm_tune.evaluation import trial as trial_module
    from dsm_tune.evaluation.trial import NOISY_SPEEDUP_SPREAD, TrialEvaluator
    from dsm_tune.merging import DSMConfig, Stage

    evaluator = TrialEvaluator("demo", "cpu", limit=8, warmup=0, repeats=1)
    evaluator.accuracy = None   # timing only: the accuracy pass plays no part here
    cfg = DSMConfig.for_model(evaluator.model, start_layer=0, hierarchy_depth=0, stages=[Stage(6, ratio=0.2)])

    def run(*timings):
        queue = list(timings)
        calls = []

        def fake(*args, **kwargs):
            calls.append(kwargs.get("seed"))
            return queue.pop(0)

        monkeypatch.setattr(trial_module, "measure_latency", fake)
        return evaluator.evaluate(cfg), calls

    quiet, calls = run(_latency(1.5, NOISY_SPEEDUP_SPREAD / 2))
    assert calls == [0] and quiet["speedup_noisy"] is False and "speedup_retimed" not in quiet

    calmer, calls = run(_latency(1.9, 0.4), _latency(1.5, 0.05))
    assert calls == [0, 1] and calmer["speedup"] == 1.5 and calmer["speedup_noisy"] is False
    assert calmer["speedup_retimed"] is True

    noisy, calls = run(_latency(1.9, 0.3), _latency(1.2, 0.5))
    assert calls == [0, 1] and noisy["speedup"] == 1.9 and noisy["speedup_noisy"] is True


def test_reference_is_the_median_of_the_dense_timings_and_figures_follow_it():
    reference = DenseReference.of([10.0, 100.0, 12.0, 11.0, 9.0], first_ms=341.0)
    assert reference.latency_ms == 11.0 and reference.timings == 5 and reference.first_ms == 341.0
    figures = reference.figures({"latency_ms": 50.0, "baseline_latency_ms": 100.0, "speedup": 2.0})
    assert figures == {"latency_ms": 5.5, "baseline_latency_ms": 11.0, "speedup": 2.0,
                       "latency_measured_ms": 50.0, "baseline_measured_ms": 100.0}
    # Read again under a later reference, the raw medians stay and the derived figures follow.
    later = DenseReference.of([20.0], None).figures(figures)
    assert later["latency_ms"] == 10.0 and later["baseline_latency_ms"] == 20.0
    assert later["latency_measured_ms"] == 50.0 and later["baseline_measured_ms"] == 100.0
    # Not timed: nothing to derive. No dense timing at all: the study's first one stands in.
    assert reference.figures({"latency_ms": math.nan, "speedup": None})["latency_ms"] is not None
    assert DenseReference.of([], 30.0).latency_ms == 30.0 and DenseReference.of([], None).latency_ms is None


# -- a study whose dense timings drift 10x between trials -------------------------------------------------------

DRIFT = (10.0, 1.0, 1.0)      # every third evaluation (the first included) runs 10x slower, speedups unchanged
NOISY_EVERY = 4               # every fourth reports a speedup 1.5x too high, flagged noisy
MAX_DROP = 0.5


class RecordingTracker:
    """Tracker double: keeps the records logged per trial and the records given at the end."""

    parent_run_id = None

    def __init__(self):
        self.logged: list[dict] = []
        self.final: list[dict] = []

    def start_study(self, study_dir, attrs, resumed):
        pass

    def log_trial(self, record):
        self.logged.append(dict(record))

    def refresh_artifacts(self, study_dir):
        pass

    def end_study(self, pareto_trial_numbers, records=()):
        self.final = [dict(r) for r in records]


@pytest.fixture(scope="module")
def drifting_study(tmp_path_factory):
    import io

    from dsm_tune.merging import ModelFingerprint
    from dsm_tune.search.space import SPACES_DIR
    from dsm_tune.search.study import StudySpec, run_study
    from dsm_tune.search.testing import StandInFactory
    from dsm_tune.search.workers import start_ray, stop_ray

    out = tmp_path_factory.mktemp("drift")
    fingerprint = ModelFingerprint("dsm_tune_demo_vit", 6, (16, 16), 1, (32, 32), 64)
    spec = StudySpec(model="demo", target="cpu", trials=14, workers=1, out=out, mlflow=False,
                     max_accuracy_drop=MAX_DROP, space=str(SPACES_DIR / "sampled" / "demo.yaml"))
    tracker, stream = RecordingTracker(), io.StringIO()
    started = start_ray(None, num_cpus=2)
    try:
        result = run_study(spec, evaluator_factory=StandInFactory(fingerprint, drift=DRIFT, noisy_every=NOISY_EVERY),
                           tracker=tracker, stream=stream)
    finally:
        stop_ray(started)
    return {"spec": spec, "result": result, "tracker": tracker, "output": stream.getvalue(),
            "dir": out / spec.study}


def _timed(frame):
    return frame[(frame["state"] == "COMPLETE") & frame["speedup"].notna()]


def test_the_reference_is_robust_to_drift_and_every_frame_figure_uses_it(drifting_study):
    import pandas as pd

    from dsm_tune.search.dense_reference import REFERENCE_ATTR
    from dsm_tune.search.results import load_study, trials_frame

    study = load_study(drifting_study["dir"])
    frame = trials_frame(study)
    timed = _timed(frame)
    raw = pd.to_numeric(timed["baseline_measured_ms"])
    assert raw.max() / raw.min() == pytest.approx(10.0)               # the drift really happened
    assert study.user_attrs["baseline"]["latency_ms"] == 100.0         # and the first timing was the slow one
    assert study.user_attrs[REFERENCE_ATTR]["latency_ms"] == 10.0      # the median is not fooled by it
    assert (timed["baseline_latency_ms"] == 10.0).all()
    assert (timed["latency_ms"] - 10.0 / timed["speedup"]).abs().max() < 1e-5
    # The raw medians stay beside it, 10x apart where the machine was slow.
    assert ((pd.to_numeric(timed["latency_measured_ms"]) / timed["latency_ms"]).round(4).isin([1.0, 10.0])).all()
    # trials.csv, written by the driver, holds the same figures.
    csv = pd.read_csv(drifting_study["dir"] / "trials.csv").set_index("number")
    for number, row in timed.set_index("number").iterrows():
        assert csv.loc[number, "latency_ms"] == pytest.approx(row["latency_ms"], abs=1e-9)
    # Optuna's stored value is as told: the first trial was told under the first timing alone (100 ms).
    first = frame.set_index("number").loc[0]
    assert first["values_1"] == pytest.approx(100.0 / first["speedup"], rel=1e-5)


def test_progress_line_front_table_and_report_agree(drifting_study, capsys):
    import argparse
    import re

    from dsm_tune.commands import report
    from dsm_tune.search.results import load_study, pareto_numbers, trials_frame

    frame = trials_frame(load_study(drifting_study["dir"]))
    timed = _timed(frame).set_index("number")
    quiet = timed[~timed["speedup_noisy"].fillna(False).astype(bool)]
    assert len(quiet) < len(timed)          # some trials were flagged noisy
    feasible = quiet[quiet["accuracy_drop"] <= MAX_DROP]
    best = feasible["speedup"].max()
    front = pareto_numbers(frame, MAX_DROP)
    assert front and not set(front) & set(timed.index.difference(quiet.index))   # noise builds no front

    output = drifting_study["output"]
    last = [line for line in output.splitlines() if line.startswith("trials ")][-1]
    assert "dense 10 ms" in last
    assert f"pareto {len(front)}" in last
    assert f"@drop<={MAX_DROP:g}: {best:.2f}x ({10.0 / best:.4g} ms)" in last

    def table_rows(text: str) -> dict[int, float]:
        """trial number -> latency_ms column of a `render.format_trials` table, read by the columns the dashes
        under the header mark (cells such as the seed or an interval may be empty or hold spaces)."""
        lines = text.splitlines()
        at = next(i for i, line in enumerate(lines) if line.startswith("trial ") and "latency_ms" in line)
        spans = {lines[at][m.start():m.end()].strip(): (m.start(), m.end())
                 for m in re.finditer(r"-+", lines[at + 1])}
        rows = {}
        for line in lines[at + 2:]:
            number = re.fullmatch(r"(\d+)[*P~]*", line[slice(*spans["trial"])].strip())
            if not number:
                break
            rows[int(number.group(1))] = float(line[slice(*spans["latency_ms"])])
        return rows

    printed = table_rows(output.split("Pareto front (accuracy drop")[1])
    assert printed and set(printed) <= set(front)
    for number, latency in printed.items():
        assert latency == pytest.approx(timed.loc[number, "latency_ms"], abs=5e-4)

    report.main(argparse.Namespace(out=str(drifting_study["spec"].out), study=drifting_study["spec"].study,
                                   all=True, plots_dir=None))
    text = capsys.readouterr().out
    assert "dense reference: 10 ms per batch (median of" in text
    listed = table_rows(text)
    assert set(listed) == set(timed.index)
    for number, latency in listed.items():
        assert latency == pytest.approx(timed.loc[number, "latency_ms"], abs=5e-4)
    assert "~ = noisy speedup" in text


def test_plot_data_uses_the_reference(drifting_study):
    from dsm_tune.search.plots import NOISY_LABEL, plotly_figure
    from dsm_tune.search.results import load_study, trials_frame

    frame = trials_frame(load_study(drifting_study["dir"]))
    timed = _timed(frame)
    figure = plotly_figure(frame, MAX_DROP)
    traces = {trace.name: trace for trace in figure.data}
    assert sorted(traces["all trials"].x) == pytest.approx(sorted(timed["latency_ms"]))
    noisy = timed[timed["speedup_noisy"].fillna(False).astype(bool)]
    assert sorted(traces[NOISY_LABEL].x) == pytest.approx(sorted(noisy["latency_ms"]))
    assert not set(traces["Pareto front"].x) & set(noisy["latency_ms"])
    dense_lines = [shape for shape in figure.layout.shapes if shape.x0 == shape.x1]
    assert [line.x0 for line in dense_lines] == [10.0]


def test_mlflow_records_best_json_and_verify_agree(drifting_study):
    from dsm_tune.commands.verify import recorded_figures
    from dsm_tune.merging import load_config
    from dsm_tune.search.results import load_study, trials_frame
    from dsm_tune.search.tracking import mlflow_payload

    frame = trials_frame(load_study(drifting_study["dir"]))
    timed = _timed(frame).set_index("number")
    tracker = drifting_study["tracker"]
    final = {r["number"]: mlflow_payload(r)["metrics"] for r in tracker.final}
    for number, row in timed.iterrows():
        assert final[number]["latency_ms"] == pytest.approx(row["latency_ms"], abs=1e-9)
        assert final[number]["baseline_latency_ms"] == 10.0
    # A child logged while a trial was told keeps the figures of its time: the first, under a 100 ms reference.
    first = mlflow_payload(tracker.logged[0])["metrics"]
    assert first["baseline_latency_ms"] == 100.0 and first["latency_measured_ms"] == first["latency_ms"]

    best_path = drifting_study["result"].best_path
    best = load_config(best_path)
    winner = best.provenance["trial"]
    assert not timed.loc[winner].get("speedup_noisy") is True
    metrics = best.metrics
    assert metrics["baseline_latency_ms"] == 10.0 == metrics["baseline"]["latency_ms"]
    assert metrics["baseline"]["first_latency_ms"] == 100.0
    assert metrics["latency_ms"] == pytest.approx(metrics["baseline_latency_ms"] / metrics["speedup"], abs=1e-6)
    assert metrics["latency_ms"] == pytest.approx(timed.loc[winner, "latency_ms"], abs=1e-9)
    recorded = recorded_figures(best, best_path)
    assert recorded["latency_ms"] == metrics["latency_ms"] and recorded["baseline_latency_ms"] == 10.0
    assert recorded["speedup"] == pytest.approx(recorded["baseline_latency_ms"] / recorded["latency_ms"], rel=1e-6)


def test_rules_and_the_front_leave_noisy_speedups_out(tmp_path):
    from dsm_tune.search.results import pareto_numbers, trials_frame
    from dsm_tune.search.select import NoWinnerError, Rule, pick_winner

    from tests.helpers.synthetic_study import add_measured, create_study, make_config

    study, _ = create_study(tmp_path, "noisy")
    add_measured(study, make_config(0, 0, [0.0]), 0.0, 10.0, seed_kind="dense")
    quiet = add_measured(study, make_config(1, 0, [0.2]), 0.5, 7.0).number
    lucky = add_measured(study, make_config(2, 0, [0.1]), 0.4, 5.0, figures={"speedup_noisy": True}).number
    frame = trials_frame(study)
    assert lucky not in pareto_numbers(frame) and quiet in pareto_numbers(frame, 1.0)
    assert pick_winner(frame, Rule(), 1.0) == quiet
    assert pick_winner(frame, Rule(min_speedup=1.4), 1.0) == quiet
    assert pick_winner(frame, Rule(trial=lucky), 1.0) == lucky
    # Only the noisy trial reaches 1.6x: no winner, and the message says what was left out.
    with pytest.raises(NoWinnerError, match=r"no trial reaches a speedup >= 1.6x .*1 measured trial\(s\) with a "
                                            r"noisy speedup left out \(pick one with --trial N\)"):
        pick_winner(frame, Rule(min_speedup=1.6), 1.0)


def test_progress_line_counts_quiet_points_by_speedup_under_the_current_reference():
    import io

    from dsm_tune.search.progress import Progress

    progress = Progress(total=4, max_drop=1.0, stream=io.StringIO(), live=False)
    progress.reference_ms = 100.0                      # a first timing under load
    progress.record("COMPLETE", 0.0, 100.0, 1.0, number=0)
    progress.reference_ms = 10.0                       # the median once more trials came in
    progress.record("COMPLETE", 0.5, 5.0, 2.0, number=1)
    progress.record("COMPLETE", 0.2, 2.0, 5.0, number=2, noisy=True)   # would dominate both if it counted
    progress.record("COMPLETE", 3.0, 2.5, 4.0, number=3)               # over the limit
    line = progress.render()
    assert progress.feasible == 3 and progress.pareto_size == 2
    assert "best speedup @drop<=1: 2.00x (5 ms)" in line and "dense 10 ms" in line
