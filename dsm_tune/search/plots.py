"""Pareto plots of a study: accuracy drop vs. latency, as interactive HTML and a static PNG.

Both files show the same picture: every measured trial faint, the Pareto front stepped and highlighted, the
dense and ToMe/paper seeds marked, trials with a noisy speedup crossed, the region over the study's accuracy-drop
limit shaded, and the trial that `export` picks by default starred. Latencies are the study's dense reference
over each trial's speedup (`dsm_tune.search.dense_reference`), the dense line is that reference. They are built
from the trials frame alone, so `report` can redraw them from the study storage without the driver.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from dsm_tune import record as schema
from dsm_tune.search.diskspace import write_atomically, write_text_atomically
from dsm_tune.search.folder import BUNDLE_NAME, HTML_NAME, PNG_NAME
from dsm_tune.search.render import default_winner, pareto_front, trial_table
from dsm_tune.search.select import frame_column
from dsm_tune.search.text import interval_text, is_finite_number

# seed_kind -> (legend label, matplotlib marker, plotly symbol, colour)
SEED_STYLES = {
    "dense": ("dense (no merging)", "s", "square", "#222222"),
    "tome": ("ToMe seed", "D", "diamond", "#e07b00"),
    "paper": ("DSM paper seed", "^", "triangle-up", "#2a9d3a"),
}
SPEEDUP_TICKS = (0.5, 0.75, 1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10)
FRONT_COLOUR = "#1f5fbf"
WINNER_COLOUR = "#d62728"
INFEASIBLE_COLOUR = "#d62728"
NOISY_COLOUR = "#8c564b"
NOISY_LABEL = "noisy speedup (not on the front)"
DROP, LATENCY, CONFIRMED = schema.ACCURACY_DROP, schema.LATENCY_MS, schema.CONFIRMED_DROP


def _dense_reference(table: pd.DataFrame) -> float | None:
    """The study's dense reference: every row of a trials frame carries the same one (`results.trials_frame`),
    and each point's latency is it over the point's speedup, so the dense line and the speedup axis agree with
    the points."""
    values = table[schema.BASELINE_LATENCY_MS].dropna()
    return float(values.median()) if len(values) else None


def write_pareto_plots(df: pd.DataFrame, out_dir: Path, max_drop: float | None) -> list[Path]:
    """Write pareto.html (with plotly.min.js beside it) and pareto.png into `out_dir`; return their paths.

    Each file is written whole or not at all (`diskspace.write_atomically`): a full disk leaves the last good plot,
    and raises `DiskFullError`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = _layers(df, max_drop)
    html_path, png_path = out_dir / HTML_NAME, out_dir / PNG_NAME
    # The machines this is viewed on may have no internet, so the plotting library is a file of the folder (a CDN
    # link would show nothing offline); written once beside the page instead of inside it, the page is ~30 kB
    # rather than 4.7 MB at every redraw, and the tracker's copy of the folder stays small (BUNDLE_NAME is not
    # one of `StudyFolder.artifact_files`).
    write_plotly_bundle(out_dir)
    html = _plotly_figure(*layers).to_html(include_plotlyjs="directory", full_html=True)
    write_text_atomically(html_path, html, f"the Pareto plot {HTML_NAME}")
    write_atomically(png_path, lambda temporary: _write_png(*layers, temporary), f"the Pareto plot {PNG_NAME}")
    return [html_path, png_path]


def write_plotly_bundle(out_dir: Path) -> Path:
    """plotly.min.js of the installed plotly in `out_dir`, unless it is already there (same size: a bundle cut
    short, or of another plotly version, is replaced)."""
    from plotly.offline import get_plotlyjs

    path = Path(out_dir) / BUNDLE_NAME
    bundle = get_plotlyjs().encode("utf-8")
    if not path.is_file() or path.stat().st_size != len(bundle):
        write_atomically(path, lambda temporary: temporary.write_bytes(bundle), f"the plotting library {BUNDLE_NAME}")
    return path


def plotly_figure(df: pd.DataFrame, max_drop: float | None):
    """The interactive figure of pareto.html (traces: all trials, Pareto front, seeds, export default)."""
    return _plotly_figure(*_layers(df, max_drop))


def _layers(df: pd.DataFrame, max_drop: float | None):
    table = trial_table(df)
    front = pareto_front(table) if not table.empty else table
    return table, front, default_winner(df, max_drop), max_drop, _title(df, table, max_drop)


def _title(df: pd.DataFrame, table: pd.DataFrame, max_drop: float | None) -> str:
    metric = frame_column(df, schema.METRIC)
    metric_name = next((m for m in metric.dropna() if isinstance(m, str)), "accuracy") if metric is not None \
        else "accuracy"
    limit = f", limit {max_drop:g}" if max_drop is not None else ""
    return f"Accuracy drop ({metric_name}) vs. latency: {len(table)} measured of {len(df)} trials{limit}"


def _y_range(table: pd.DataFrame, max_drop: float | None) -> tuple[float, float]:
    drops = table[DROP]
    low = min(0.0, float(drops.min())) if len(drops) else 0.0
    high = float(drops.max()) if len(drops) else 1.0
    if max_drop is not None:
        high = max(high, max_drop * 1.5)
    span = (high - low) or 1.0
    return low - 0.05 * span, high + 0.08 * span


def _hover(row: pd.Series) -> str:
    seed = f" ({row[schema.SEED_KIND]} seed)" if row[schema.SEED_KIND] else ""
    interval = interval_text(*(row.get(k) for k in schema.INTERVAL_KEYS), 3)
    confirmed = row.get(CONFIRMED)
    confirmed_interval = interval_text(row.get(schema.CONFIRMED_DROP_CI_LOW), row.get(schema.CONFIRMED_DROP_CI_HIGH), 3)
    confirmed_text = (f"<br>confirmed {confirmed:.3f} {confirmed_interval}"
                      if isinstance(confirmed, float) and is_finite_number(confirmed) else "")
    return (f"trial {int(row['number'])}{seed}<br>drop {row[DROP]:.3f} {interval}{confirmed_text}<br>"
            f"latency {row[LATENCY]:.3f} ms (IQR {row[schema.LATENCY_IQR_MS]:.3f})<br>"
            f"speedup {row[schema.SPEEDUP]:.3f}x{' (noisy)' if row['noisy'] else ''}<br>"
            f"FLOPs ratio {row[schema.FLOPS_RATIO]:.3f}<br>"
            f"tokens kept {row[schema.TOKENS_KEPT]:.3f}<br>{row[schema.CONFIG]}")


CONFIRMED_COLOUR = "#2a9d8f"


def _error_bars(rows: pd.DataFrame, centre: str, low: str, high: str) -> tuple[list[float], list[float]] | None:
    """(below, above) distances of each row's 95% interval around `centre`; None when no row has one."""
    if low not in rows or high not in rows or not rows[low].notna().any():
        return None
    below = (rows[centre] - rows[low]).clip(lower=0).fillna(0.0)
    above = (rows[high] - rows[centre]).clip(lower=0).fillna(0.0)
    return below.tolist(), above.tolist()


def _confirmed(table: pd.DataFrame) -> pd.DataFrame:
    return table[table[CONFIRMED].notna()] if CONFIRMED in table else table.iloc[0:0]


def _plotly_figure(table, front, winner, max_drop, title):
    import plotly.graph_objects as go

    figure = go.Figure()
    for trace in _plotly_points(go, table, front, winner):
        figure.add_trace(trace)
    low, high = _y_range(table, max_drop)
    if max_drop is not None:
        figure.add_hrect(y0=max_drop, y1=high, fillcolor=INFEASIBLE_COLOUR, opacity=0.08, line_width=0,
                         annotation_text=f"infeasible: drop > {max_drop:g}", annotation_position="top left")
        figure.add_hline(y=max_drop, line=dict(color=INFEASIBLE_COLOUR, dash="dash", width=1))
    baseline = _dense_reference(table)
    if baseline is not None:
        figure.add_vline(x=baseline, line=dict(color="#222222", dash="dot", width=1),
                         annotation_text=f"dense {baseline:.3g} ms", annotation_position="bottom right")
    if table.empty:
        figure.add_annotation(text="no measured trials yet", showarrow=False, x=0.5, y=0.5, xref="paper",
                              yref="paper", font=dict(size=18))
    figure.update_layout(title=title, xaxis_title="latency per batch (ms: dense reference / speedup)",
                         yaxis_title="accuracy drop (points)", yaxis_range=[low, high], template="plotly_white",
                         legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))
    return figure


def _plotly_error_y(bars):
    return dict(type="data", symmetric=False, array=bars[1], arrayminus=bars[0], thickness=1) if bars else None


def _plotly_points(go, table, front, winner) -> list:
    """The point traces of pareto.html, bottom layer first."""
    def hover(rows):
        return rows.apply(_hover, axis=1).tolist()

    traces = [go.Scatter(x=table[LATENCY], y=table[DROP], mode="markers", name="all trials",
                         marker=dict(color="rgba(110,110,110,0.35)", size=7),
                         hovertext=hover(table) if len(table) else [], hoverinfo="text")]
    if len(front):
        bars = _error_bars(front, DROP, *schema.INTERVAL_KEYS)
        traces.append(go.Scatter(
            x=front[LATENCY], y=front[DROP], mode="lines+markers", name="Pareto front",
            line=dict(color=FRONT_COLOUR, shape="hv", width=2), marker=dict(color=FRONT_COLOUR, size=9),
            error_y=_plotly_error_y(bars), hovertext=hover(front), hoverinfo="text"))
    confirmed = _confirmed(table)
    if len(confirmed):
        bars = _error_bars(confirmed, CONFIRMED, schema.CONFIRMED_DROP_CI_LOW, schema.CONFIRMED_DROP_CI_HIGH)
        traces.append(go.Scatter(
            x=confirmed[LATENCY], y=confirmed[CONFIRMED], mode="markers",
            name="confirmed on held-out images (95% CI)",
            marker=dict(symbol="diamond", size=10, color=CONFIRMED_COLOUR),
            error_y=_plotly_error_y(bars), hovertext=hover(confirmed), hoverinfo="text"))
    for kind, (label, _, symbol, colour) in SEED_STYLES.items():
        seeds = table[table[schema.SEED_KIND] == kind]
        if len(seeds):
            traces.append(go.Scatter(
                x=seeds[LATENCY], y=seeds[DROP], mode="markers", name=label,
                marker=dict(symbol=symbol, size=12, color=colour, line=dict(color="white", width=1)),
                hovertext=hover(seeds), hoverinfo="text"))
    noisy = table[table["noisy"]]
    if len(noisy):
        traces.append(go.Scatter(
            x=noisy[LATENCY], y=noisy[DROP], mode="markers", name=NOISY_LABEL,
            marker=dict(symbol="x", size=10, color=NOISY_COLOUR), hovertext=hover(noisy), hoverinfo="text"))
    if winner is not None:
        best = table[table["number"] == winner]
        traces.append(go.Scatter(
            x=best[LATENCY], y=best[DROP], mode="markers", name=f"export default (trial {winner})",
            marker=dict(symbol="star", size=18, color=WINNER_COLOUR, line=dict(color="black", width=1)),
            hovertext=hover(best), hoverinfo="text"))
    return traces


def _write_png(table, front, winner, max_drop, title, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 6), dpi=120)
    try:
        _png_points(axes, table, front, winner)
        low, high = _y_range(table, max_drop)
        axes.set_ylim(low, high)
        if max_drop is not None:
            axes.axhspan(max_drop, high, color=INFEASIBLE_COLOUR, alpha=0.08, lw=0,
                         label=f"infeasible (drop > {max_drop:g})")
            axes.axhline(max_drop, color=INFEASIBLE_COLOUR, ls="--", lw=0.8)
        baseline = _dense_reference(table)
        if baseline is not None:
            axes.axvline(baseline, color="#222222", ls=":", lw=0.9)
            axes.annotate(f"dense {baseline:.3g} ms", (baseline, low), textcoords="offset points", xytext=(-4, 4),
                          ha="right", fontsize=8)
            if baseline > 0 and (table[LATENCY] > 0).all():
                _speedup_axis(axes, baseline)
        if table.empty:
            axes.text(0.5, 0.5, "no measured trials yet", transform=axes.transAxes, ha="center", fontsize=14)
        axes.set_xlabel("latency per batch (ms: dense reference / speedup)")
        axes.set_ylabel("accuracy drop (points)")
        axes.set_title(title, fontsize=10)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8, loc="upper right")
        figure.tight_layout()
        figure.savefig(path)
    finally:
        plt.close(figure)


def _png_points(axes, table, front, winner) -> None:
    """The points of pareto.png, in the layers of pareto.html."""
    axes.scatter(table[LATENCY], table[DROP], s=18, color="#6e6e6e", alpha=0.35, label="all trials", zorder=2)
    if len(front):
        axes.step(front[LATENCY], front[DROP], where="post", color=FRONT_COLOUR, lw=1.8, zorder=3)
        axes.scatter(front[LATENCY], front[DROP], s=36, color=FRONT_COLOUR,
                     label=f"Pareto front ({len(front)}, 95% CI)", zorder=4)
        bars = _error_bars(front, DROP, *schema.INTERVAL_KEYS)
        if bars:
            axes.errorbar(front[LATENCY], front[DROP], yerr=bars, fmt="none", ecolor=FRONT_COLOUR, elinewidth=0.8,
                          capsize=2, zorder=3)
    confirmed = _confirmed(table)
    if len(confirmed):
        bars = _error_bars(confirmed, CONFIRMED, schema.CONFIRMED_DROP_CI_LOW, schema.CONFIRMED_DROP_CI_HIGH)
        axes.errorbar(confirmed[LATENCY], confirmed[CONFIRMED], yerr=bars, fmt="D", ms=5, color=CONFIRMED_COLOUR,
                      elinewidth=0.8, capsize=2, zorder=5, label="confirmed on held-out images (95% CI)")
        for _, row in front.iterrows():
            axes.annotate(f"#{int(row['number'])} {row[schema.SPEEDUP]:.2f}x", (row[LATENCY], row[DROP]),
                          textcoords="offset points", xytext=(5, 4), fontsize=7, color=FRONT_COLOUR)
    for kind, (label, marker, _, colour) in SEED_STYLES.items():
        seeds = table[table[schema.SEED_KIND] == kind]
        if len(seeds):
            axes.scatter(seeds[LATENCY], seeds[DROP], s=70, marker=marker, color=colour, edgecolors="white",
                         linewidths=0.8, label=label, zorder=7)
    noisy = table[table["noisy"]]
    if len(noisy):
        axes.scatter(noisy[LATENCY], noisy[DROP], s=50, marker="x", color=NOISY_COLOUR, label=NOISY_LABEL, zorder=5)
    if winner is not None:
        best = table[table["number"] == winner]
        axes.scatter(best[LATENCY], best[DROP], s=260, marker="*", color=WINNER_COLOUR, edgecolors="black",
                     linewidths=0.8, label=f"export default (trial {winner})", zorder=6)


def _speedup_axis(axes, baseline: float) -> None:
    """A top axis in speedup against the study's dense reference, with ticks that do not crowd each other."""
    def invert(values):  # latency <-> speedup; the axis may probe 0 while laying out ticks
        return baseline / np.maximum(np.abs(values), 1e-9)

    top = axes.secondary_xaxis("top", functions=(invert, invert))
    low_x, high_x = axes.get_xlim()
    visible, last = [], math.inf
    for speedup in SPEEDUP_TICKS:  # slowest first; skip ticks that would crowd the previous one
        position = baseline / speedup
        if low_x <= position <= high_x and last - position >= 0.05 * (high_x - low_x):
            visible.append(speedup)
            last = position
    top.set_xticks(visible, [f"{s:g}" for s in visible])
    # Exact for every point: its latency is the reference over its own interleaved speedup.
    top.set_xlabel("speedup vs. dense (x)")
