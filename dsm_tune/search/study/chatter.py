"""Library notices that are not the user's business on every run (Ray's token-authentication notice, MLflow's
database migrations) go to the study's log file (`<study>/run.log`) instead of the terminal."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

CHATTY_LOGGERS = ("ray._private.authentication", "mlflow.store.db.utils", "alembic")


@contextlib.contextmanager
def chatter_to(log_file: Path) -> Iterator[None]:
    handler = logging.FileHandler(log_file, delay=True)   # no file until something is said
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = []
    for name in CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate, logger.level))
        logger.handlers, logger.propagate = [handler], False
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, handlers, propagate, level in saved:
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)
        handler.close()
