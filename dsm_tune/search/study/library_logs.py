"""Library notices that are not the user's business on every run (Ray's token-authentication notice, MLflow's
database migrations) go to the study's log file (`<study>/run.log`) instead of the terminal."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

CHATTY_LOGGERS = ("ray._private.authentication", "mlflow.store.db.utils", "alembic")


class _NoticeFile(logging.FileHandler):
    """A notice that cannot be written (a full disk) is dropped: logging would print a traceback instead, and the
    run says what filled the disk itself (search/diskspace.py)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            super().emit(record)
        except OSError:
            pass

    def handleError(self, record: logging.LogRecord) -> None:
        pass


@contextlib.contextmanager
def library_logs_to(log_file: Path) -> Iterator[None]:
    handler = _NoticeFile(log_file, delay=True)   # no file until something is said
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
