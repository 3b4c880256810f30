"""The one base class for errors that are the user's to fix (bad input, missing files, unfit configs), and the
full-disk error every writer of a study raises.

The CLI prints these as a single line; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import sqlite3

# A write that cannot land for want of room (or of a writable file system): the user's to fix, never a bug.
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
# SQLite reports SQLITE_FULL as this text only (sqlite3 exceptions carry no errno before Python 3.11's
# `sqlite_errorcode`, and SQLAlchemy and Optuna wrap them again).
SQLITE_FULL_TEXT = "database or disk is full"
SQLITE_READONLY_TEXT = "attempt to write a readonly database"


class DSMTuneError(Exception):
    """A problem with the user's input or environment, described in one line."""


class DiskFullError(DSMTuneError):
    """A write of `what` to `path` found no space (ENOSPC, EDQUOT) or a read-only file system (EROFS).

    The driver adds where the finished trials are safe (`storage`, `trials_safe`) before it reaches the user. Only
    plain fields, so it crosses a process boundary (a Ray worker's dense-output cache) intact.
    """

    def __init__(self, path: str, what: str, code: int = errno.ENOSPC, device: str | None = None,
                 storage: str | None = None, trials_safe: int | None = None):
        super().__init__(str(path), what, code, device, storage, trials_safe)
        self.path, self.what, self.code = str(path), what, code
        self.device, self.storage, self.trials_safe = device, storage, trials_safe

    def __reduce__(self):
        return (type(self), self.args)

    def headline(self) -> str:
        """What failed, without what to do (for a warning about a write the study can do without)."""
        return str(DiskFullError(self.path, self.what, self.code, self.device)).split("; ")[0]

    def for_study(self, storage: str, trials_safe: int | None) -> "DiskFullError":
        return DiskFullError(self.path, self.what, self.code, self.device, storage, trials_safe)

    def __str__(self) -> str:
        where = self.device or self.path
        if self.code == errno.EROFS:
            head, fix = f"cannot write to {where}: it is read-only", "make it writable"
        elif self.code == errno.EDQUOT:
            head, fix = f"no space left on {where} (disk quota exceeded)", "free space"
        else:
            head, fix = f"no space left on {where}", "free space"
        head += f" while writing {self.what}"
        if self.storage is None:
            return f"{head}; {fix} and run the same command again"
        if self.trials_safe is None:   # the storage holds no study yet: nothing to resume, only to start again
            return f"{head}; nothing was stored yet; {fix} and run the same command to start the study"
        if self.trials_safe < 0:       # the storage could not be read back just now
            return f"{head}; the finished trials are safe in {self.storage}; {fix} and run the same command to resume"
        return (f"{head}; {self.trials_safe} trial{'' if self.trials_safe == 1 else 's'} "
                f"{'is' if self.trials_safe == 1 else 'are'} safe in {self.storage}; {fix} and run the same command "
                f"to resume")


def disk_full_code(exc: BaseException | None) -> int | None:
    """ENOSPC / EDQUOT / EROFS when `exc` or anything in its chain (`__cause__`, `__context__`, SQLAlchemy's
    `orig`) is a write that found no room; None otherwise.

    Optuna turns SQLite's `database or disk is full` into `StorageInternalError("... e.g. exceeding max
    length")`, so the cause is only found by walking the chain."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, DiskFullError):
            return current.code
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return current.errno
        if isinstance(current, sqlite3.Error):
            text = str(current).lower()
            if SQLITE_FULL_TEXT in text:
                return errno.ENOSPC
            if SQLITE_READONLY_TEXT in text:
                return errno.EROFS
        stack += [current.__cause__, current.__context__, getattr(current, "orig", None)]
    return None
