"""The study folder's readable outputs: trials.csv after every trial, the Pareto plots (and the tracker's copy
of them) at most every `interval_s` while trials come in, and at the end best.json and the front table.

All of them are derived from the storage, so while trials come in a write that finds the disk full is only
warned about, once, and the study goes on as long as its storage still writes; the end of the run writes them
all again (as `dsm-tune report` does), and there a full disk ends the run (`DiskFullError`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

import optuna
import pandas as pd

from dsm_tune.errors import DiskFullError
from dsm_tune.search.diskspace import write_atomically
from dsm_tune.search.folder import StudyFolder
from dsm_tune.search.plots import write_pareto_plots
from dsm_tune.search.progress import Progress
from dsm_tune.search.render import (
    default_winner, format_trials, latency_model_summary, pareto_front, trial_table,
)
from dsm_tune.search.results import TrialsTable, pareto_numbers, trials_frame

ARTIFACT_INTERVAL_S = 120.0


def write_trials_table(study: optuna.Study, path: Path) -> pd.DataFrame:
    """trials.csv, whole or not at all (a full disk keeps the last good one); returns the frame."""
    frame = trials_frame(study)
    write_frame_csv(frame, path)
    return frame


def write_frame_csv(frame: pd.DataFrame, path: Path) -> None:
    write_atomically(path, lambda temporary: frame.to_csv(temporary, index=False), Path(path).name)


class DerivedWrites:
    """Runs writes the study can do without (they are redone at the end): a full disk is said once, then quiet."""

    def __init__(self, warn: Callable[[str], None] | None = None):
        self.warn = warn
        self.failed: DiskFullError | None = None

    def attempt(self, write: Callable[[], Any]) -> bool:
        try:
            write()
            return True
        except DiskFullError as exc:
            if self.failed is None and self.warn is not None:
                self.warn(f"dsm-tune: warning: {exc.headline()}; the study goes on while its storage still writes, "
                          f"and writes its tables and plots again at the end (or `dsm-tune report` does)")
            self.failed = exc
            return False


class LiveOutputs:
    """trials.csv after every trial (the trials told so far, kept by `results.TrialsTable`); plots redrawn and the tracker's artifacts refreshed at most every
    `interval_s` (None: only at the end), so an overnight study shows its front while it runs."""

    def __init__(self, folder: StudyFolder, max_drop: float, tracker: Any,
                 interval_s: float | None = ARTIFACT_INTERVAL_S, derived: DerivedWrites | None = None):
        self.folder, self.max_drop, self.tracker, self.interval_s = folder, max_drop, tracker, interval_s
        self.derived = derived or DerivedWrites()
        self._last_drawn = time.monotonic()
        # The storage is read once, at the first tell: after that each trial costs its own row, not the study's.
        self.table: TrialsTable | None = None

    def trial_told(self, study: optuna.Study, frozen: optuna.trial.FrozenTrial | None = None) -> None:
        """After each tell: `frozen` is the trial as told (None: whatever the storage holds now is read again)."""
        if self.table is None or frozen is None:
            self.table = TrialsTable(self.interval_s if self.interval_s is not None else ARTIFACT_INTERVAL_S)
            self.table.load(study)
        else:
            self.table.told(frozen)
        table, path = self.table, self.folder.trials_csv
        self.derived.attempt(lambda: table.write(path, lambda p, fill: write_atomically(p, fill, p.name)))
        if self.interval_s is not None and time.monotonic() - self._last_drawn >= self.interval_s:
            self._last_drawn = time.monotonic()
            frame = trials_frame(study)   # every trial, those still running too, as the final plots see them
            if self.derived.attempt(lambda: write_pareto_plots(frame, self.folder.path, self.max_drop)):
                self.derived.attempt(lambda: self.tracker.refresh_artifacts(self.folder.path))


@dataclass
class FinalOutputs:
    frame: pd.DataFrame
    front: list[int]                    # feasible Pareto front (trial numbers), fastest first
    best_trial: int | None
    best_path: Path | None
    files: list[Path] = field(default_factory=list)


def write_final_outputs(study: optuna.Study, folder: StudyFolder, max_drop: float,
                        progress: Progress) -> FinalOutputs:
    """trials.csv, best.json (fastest trial within the drop limit) and the Pareto plots."""
    from dsm_tune.search.select import NoWinnerError, Rule, freeze_trial, pick_winner, selection_record

    frame = write_trials_table(study, folder.trials_csv)
    files = [folder.storage_file, folder.trials_csv]
    best_number: int | None = None
    best_path: Path | None = None
    try:
        best_number = pick_winner(frame, Rule(), max_drop)
    except NoWinnerError as exc:
        progress.message(f"dsm-tune: no best.json: {exc}")
    if best_number is not None:
        best_path = folder.best_file
        frozen = freeze_trial(study, best_number, selection_record(frame, Rule(), max_drop))
        write_atomically(best_path, lambda temporary: frozen.to_json(temporary), best_path.name)
        files.append(best_path)
    files += list(write_pareto_plots(frame, folder.path, max_drop))
    return FinalOutputs(frame, pareto_numbers(frame, max_drop), best_number, best_path,
                        [p for p in files if p.exists()])


def print_front(frame: pd.DataFrame, max_drop: float, stream: TextIO) -> None:
    """The feasible Pareto front as `report` shows it (a duplicate is the same measurement as the trial it
    copies: shown once)."""
    table = trial_table(frame)
    table = table[table["duplicate_of"].isna()]
    front = pareto_front(table, max_drop)
    if front.empty:
        stream.write(f"No measured trial is within the accuracy-drop limit of {max_drop:g} points.\n")
        return
    stream.write(f"Pareto front (accuracy drop <= {max_drop:g}), fastest first:\n")
    stream.write(format_trials(front, max_drop, default_winner(frame, max_drop)) + "\n")
    stream.write("* = best.json (what `dsm-tune export` picks by default)\n")
    summary = latency_model_summary(frame)
    if summary:
        stream.write(summary + "\n")
