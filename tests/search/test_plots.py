"""Pareto plots (HTML + PNG) and `dsm-tune report`, from a study storage alone."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dsm_tune.cli import main as cli_main
from dsm_tune.search.plots import FRONT_COLOUR, WINNER_COLOUR, plotly_figure, write_pareto_plots
from dsm_tune.search.results import trials_frame
from tests.helpers.synthetic_study import create_study, expected_front, populate


@pytest.fixture(scope="module")
def study_and_dir(tmp_path_factory):
    study, study_dir = create_study(tmp_path_factory.mktemp("plots"), "plotted")
    populate(study)
    return study, study_dir


def _rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]) / 255.0


def _pixels_near(image: np.ndarray, colour: str, tolerance: float = 0.06) -> int:
    return int((np.abs(image[..., :3] - _rgb(colour)).max(axis=-1) < tolerance).sum())


def test_plots_are_written_and_show_the_front(study_and_dir, tmp_path):
    import matplotlib.image

    study, _ = study_and_dir
    html, png = write_pareto_plots(trials_frame(study), tmp_path, max_drop=1.0)
    assert html.name == "pareto.html" and png.name == "pareto.png"

    text = html.read_text()
    # Viewable offline: plotly.js is a file beside the page (written once per folder), nothing from a CDN.
    assert (tmp_path / "plotly.min.js").stat().st_size > 1_000_000 and len(text) < 200_000
    assert not re.search(r"<script[^>]+src=\"https?://", text) and 'src="plotly.min.js"' in text
    for label in ('"name":"Pareto front"', '"name":"ToMe seed"', '"name":"dense (no merging)"',
                  "infeasible: drop \\u003e 1"):
        assert label in text, label

    image = matplotlib.image.imread(png)
    height, width = image.shape[:2]
    assert (height, width) == (720, 1080)
    not_white = (image[..., :3] < 0.95).any(axis=-1).mean()
    assert 0.02 < not_white < 0.6  # drawn on, not a blank or a solid block
    assert _pixels_near(image, FRONT_COLOUR) > 200  # the stepped front and its points
    assert _pixels_near(image, WINNER_COLOUR, 0.08) > 50  # the export-default star


def test_plotly_traces_hold_the_front_seeds_and_winner(study_and_dir):
    study, _ = study_and_dir
    figure = plotly_figure(trials_frame(study), max_drop=1.0)
    traces = {trace.name: trace for trace in figure.data}
    measured = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(traces["all trials"].x) == len(measured)  # failed and aborted trials are not points

    front = sorted(expected_front(study), key=lambda n: study.trials[n].user_attrs["latency_ms"])
    assert list(traces["Pareto front"].x) == [study.trials[n].user_attrs["latency_ms"] for n in front]
    assert traces["Pareto front"].line.shape == "hv"  # stepped
    assert list(traces["dense (no merging)"].y) == [0.0]
    assert list(traces["ToMe seed"].x) == [study.trials[1].user_attrs["latency_ms"]]
    assert "DSM paper seed" in traces

    feasible = [t for t in measured if t.user_attrs["accuracy_drop"] <= 1.0]
    winner = min(feasible, key=lambda t: t.user_attrs["latency_ms"]).number
    assert f"export default (trial {winner})" in traces
    shaded = [shape for shape in figure.layout.shapes if shape.type == "rect"]
    assert len(shaded) == 1 and shaded[0].y0 == 1.0 and shaded[0].y1 > 1.0


def test_plots_of_a_study_without_measured_trials(tmp_path):
    study, _ = create_study(tmp_path, "nothing")
    html, png = write_pareto_plots(trials_frame(study), tmp_path / "out", max_drop=None)
    assert html.is_file() and png.stat().st_size > 5_000
    assert "no measured trials yet" in html.read_text()


def test_report_prints_the_front_and_writes_plots(study_and_dir, capsys, tmp_path):
    study, study_dir = study_and_dir
    plots_dir = tmp_path / "report-plots"
    code = cli_main(["report", "--study", "plotted", "--out", str(study_dir.parent), "--plots-dir", str(plots_dir)])
    out = capsys.readouterr().out
    assert code == 0
    assert "study plotted: demo on cpu, metric top1, accuracy-drop limit 1.0" in out
    assert "16 trial" in out or "trials: 16" in out
    front = expected_front(study)
    assert f"{len(front)} on the Pareto front" in out
    table_trials = [int(m) for m in re.findall(r"^\s*(\d+)\*?\s", out.split("-----")[-1], flags=re.M)]
    assert sorted(table_trials) == front
    feasible = [t for t in study.trials if t.state.name == "COMPLETE" and t.user_attrs["accuracy_drop"] <= 1.0]
    winner = min(feasible, key=lambda t: t.user_attrs["latency_ms"]).number
    assert re.search(rf"^\s*{winner}\*\s", out, flags=re.M)
    assert (plots_dir / "pareto.png").is_file() and (plots_dir / "pareto.html").is_file()


def test_report_all_lists_every_measured_trial(study_and_dir, capsys, tmp_path):
    study, study_dir = study_and_dir
    code = cli_main(["report", "--study", "plotted", "--out", str(study_dir.parent), "--all",
                     "--plots-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    rows = re.findall(r"^\s*(\d+)\*?P?\s", out.split("-----")[-1], flags=re.M)
    assert len(rows) == sum(1 for t in study.trials if t.state.name == "COMPLETE")


def test_report_on_a_missing_study_is_one_line(tmp_path, capsys):
    assert cli_main(["report", "--study", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsm-tune: error: no study at") and "\n" not in err
