"""The study driver, `run_study` (`driver.py`): an Optuna multi-objective study (accuracy drop, latency) run by
ask/tell over Ray workers, or over one evaluator in the driver's own process.

Its parts, one concern each: `preflight` (the inputs resolved once), `session` (storage, setup attrs, tracker,
final outputs), `loop` (ask, dispatch, handle events), `dedup` (the plan cache), `tell` (outcomes and the latency
objective), `outputs` (trials.csv, plots, best.json), `factory` (the production evaluator). What to tune and for
how long is `search/spec.py`'s `StudySpec`; where configs come from is the strategy's (`search/strategies/`).
"""

from dsm_tune.search.folder import StudyError
from dsm_tune.search.study.driver import run_study, sync_tracking
from dsm_tune.search.study.preflight import study_space_text
from dsm_tune.search.study.session import StudyResult, Tracker
from dsm_tune.search.spec import DEFAULT_SAMPLER, SAMPLERS, StudySpec, resume_spec

__all__ = ["DEFAULT_SAMPLER", "SAMPLERS", "StudyError", "StudyResult", "StudySpec", "Tracker", "resume_spec",
           "run_study", "study_space_text", "sync_tracking"]
