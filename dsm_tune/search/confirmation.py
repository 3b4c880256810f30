"""Confirming the front on images the search never saw.

A study picks its front as the best of many noisy estimates on the same images, so the front's drops are biased
low (the winner's curse). When the study ends, and again on `report`/`export`, the feasible front's fastest
candidates (at most `MAX_CANDIDATES`) are scored once on the held-out images; the exported config is then chosen on
those confirmed figures (`select.Rule`).

The scores live in one study user attr (`record.CONFIRM_ATTR`: Optuna freezes a finished trial's own
attrs), keyed by trial number, next to the fingerprint of the images they were scored on: a resumed study reuses
them, a study whose confirmation images changed scores again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import pandas as pd

from dsm_tune import record as schema
from dsm_tune.errors import DSMTuneError
from dsm_tune.record import CONFIRM_ATTR, DUPLICATE_OF, TOKENS_KEPT
from dsm_tune.merging import DSMConfig
from dsm_tune.search.results import pareto_numbers, trials_frame
from dsm_tune.search.text import is_finite_number, json_safe

# Candidates scored, fastest first: a bounded cost (each is one accuracy pass over the held-out images) that still
# leaves the selection a fallback when the fastest ones fail confirmation.
MAX_CANDIDATES = 6


class Scorer(Protocol):
    """Scores configs on the confirmation images (`trial.HeldOutScorer`, or a stand-in in tests)."""

    data_fingerprint: str
    num_images: int

    def score(self, cfg: Any) -> Any:
        """An AccuracyResult-like object: drop, ci_low, ci_high, num_images."""


def candidates(frame: pd.DataFrame, max_drop: float, limit: int = MAX_CANDIDATES) -> list[int]:
    """The feasible front's fastest trials (by search figures), fastest first; duplicates of a trial and configs
    that merge nothing left out."""
    if frame.empty:
        return []
    if DUPLICATE_OF in frame:
        frame = frame[frame[DUPLICATE_OF].isna()]
    if TOKENS_KEPT in frame:
        # A config that merges nothing is the dense model: its drop is 0 on any image, nothing to confirm.
        frame = frame[~(pd.to_numeric(frame[TOKENS_KEPT], errors="coerce") >= 1.0)]
    return pareto_numbers(frame, max_drop)[:limit]


def confirm_front(study: Any, frame: pd.DataFrame, max_drop: float, make_scorer: Callable[[], Scorer],
                  say: Callable[[str], None], limit: int = MAX_CANDIDATES) -> int:
    """Score the front's candidates that have no confirmed figures on these images yet; returns how many were
    scored. `make_scorer` is called only when there is something to score (it loads a model and data). Each
    score is stored as soon as it is known, so an interrupted confirmation keeps what it did."""
    wanted = candidates(frame, max_drop, limit)
    record = dict(study.user_attrs.get(CONFIRM_ATTR) or {})
    scores = {str(k): v for k, v in (record.get("scores") or {}).items()}
    if not wanted or all(str(n) in scores for n in wanted):
        return 0
    scorer = make_scorer()
    if record.get("data_fingerprint") != scorer.data_fingerprint:
        scores = {}   # other confirmation images: earlier figures do not describe these
    todo = [n for n in wanted if str(n) not in scores]
    if not todo:
        return 0
    fingerprint = study.user_attrs.get(schema.FINGERPRINT)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    say(f"dsm-tune: confirming {len(todo)} front candidate(s) on {scorer.num_images} held-out images"
        + (f" ({scorer.device_note})" if getattr(scorer, "device_note", None) else ""))
    for number in todo:
        document = {**trials[number].user_attrs[schema.CONFIG], "model": fingerprint}
        result = scorer.score(DSMConfig.from_dict(document, require_model=fingerprint is not None))
        figures = (result.drop, result.ci_low, result.ci_high, result.num_images)
        scores[str(number)] = json_safe(dict(zip(schema.CONFIRMED_FIELDS, figures)))
        study.set_user_attr(CONFIRM_ATTR, {"data_fingerprint": scorer.data_fingerprint, "scores": scores})
        search_drop = trials[number].user_attrs.get(schema.ACCURACY_DROP)
        say(f"dsm-tune:   trial {number}: search drop {_points(search_drop)}, confirmed {_points(result.drop)} "
            f"[{_points(result.ci_low)}, {_points(result.ci_high)}]")
    return len(todo)


def _points(value: Any) -> str:
    return f"{value:.3f}" if is_finite_number(value) else "?"


def scorer_factory_for(spec: Mapping[str, Any], cache_dir: str | None,
                       target: Any = None) -> Callable[[], Scorer]:
    """The production scorer of a stored study spec (built only when called); `target`: its resolved profile,
    when the caller has it."""
    def build() -> Scorer:
        import dataclasses

        from dsm_tune.evaluation.data import search_holdout
        from dsm_tune.evaluation.targets import check_device_present, load_target
        from dsm_tune.evaluation.trial import HeldOutScorer

        try:
            if target is None:
                profile: Any = load_target(str(spec["target"]), batch_size=spec.get("batch_size"),
                                           dtype=spec.get("dtype"), compile=False)
            else:
                check_device_present(target)
                profile = dataclasses.replace(target, compile=False)
        except Exception:   # noqa: BLE001 - the device is elsewhere: HeldOutScorer falls back to the CPU
            profile = str(spec["target"])
        confirm_data = spec.get("confirm_data")
        scorer = HeldOutScorer(spec["model"], profile, spec.get("data"), metric=spec.get("metric"),
                               limit=spec.get("limit"), checkpoint=spec.get("checkpoint"), cache_dir=cache_dir,
                               pretrained=bool(spec.get("pretrained")), order=spec.get("data_order") or "balanced",
                               seed=int(spec.get("data_seed") or 0),
                               holdout=search_holdout(spec.get("confirm"), confirm_data),
                               confirm_data=confirm_data)
        return scorer
    return build


def confirm_stored_study(folder: Any, say: Callable[[str], None]) -> None:
    """`report`/`export`: confirm what the study's end did not (an interrupted study, a changed limit), under the
    study's lock; a study that another process is running is left to it."""
    from filelock import FileLock, Timeout

    study = folder.load()
    spec = dict(study.user_attrs.get(schema.SPEC) or {})
    if not (spec.get("confirm_data") or float(spec.get("confirm") or 0.0) > 0):
        return
    lock = FileLock(str(folder.lock_file))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        say(f"dsm-tune: study {folder.name!r} is running: its front is confirmed when it ends")
        return
    try:
        cache = str((Path(folder.out) / "cache").resolve())
        confirm_front(study, trials_frame(study), float(spec.get("max_accuracy_drop") or 0.0),
                      scorer_factory_for(spec, cache), say)
    except DSMTuneError as exc:
        say(f"dsm-tune: the front was not confirmed: {exc}")
    finally:
        lock.release()
