"""A full disk mid-study: one line, nothing lost, and the study resumes once there is space.

Every file a study writes goes through `write_atomically` (a temporary file in the same folder, flushed to the
disk, then renamed over the old one), so a write cut short by a full disk leaves the previous good file and no
temporary behind. Any write that finds no room raises `DiskFullError`; `stop_on_full_disk` wraps a whole run:
whatever the disk-full error looks like on the way up (Optuna's `StorageInternalError` around SQLAlchemy around
`sqlite3.OperationalError: database or disk is full`, a plain `OSError`, a worker's cache), it leaves as one
`DiskFullError` that names the file system, what was being written and how many trials the storage holds, after a
WAL checkpoint where the disk allows one. `check_free_space` refuses to start a run on an `--out` with less than
`min_free_bytes()` free.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from dsm_tune.errors import DISK_FULL_ERRNOS, DiskFullError, DSMTuneError, disk_full_code

# The floor of free space a run needs on --out before it starts (MiB), and the variable that overrides it.
# Measured: a finished 24-trial demo study with MLflow takes 10.3 MiB of --out: plotly.min.js 4.6 MiB (once per
# study folder), the study's WAL 3.9 MiB (SQLite checkpoints it at ~4 MiB, so it stays there), mlflow.db 1.2 MiB,
# study.db 0.15 MiB, plots, tables and MLflow artifacts 0.4 MiB. A 300-trial study grows study.db and mlflow.db
# to ~2 and ~5 MiB, and a real model's dense-output cache is images x classes x 4 bytes (20 MiB for 5000 ImageNet
# images): ~36 MiB. 64 MiB covers that with room to spare and is nothing on a disk worth running a study on.
MIN_FREE_ENV = "DSM_TUNE_MIN_FREE_MB"
DEFAULT_MIN_FREE_MB = 64.0
MIB = 1024 * 1024


class LowSpaceError(DSMTuneError):
    """--out has less free space than a run needs to start."""


def device_of(path: Path | str) -> str:
    """`<mount point> (<device or file system>)` holding `path`, for the message; the path itself when the mount
    table cannot be read (not Linux)."""
    target = _existing(Path(path))
    best: tuple[str, str] | None = None
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return str(target)
    for line in lines:
        fields = line.split(" ")
        if "-" not in fields:
            continue
        dash = fields.index("-")
        mount = _unescape(fields[4])
        source = fields[dash + 2] if len(fields) > dash + 2 else fields[dash + 1]
        inside = str(target) == mount or str(target).startswith(mount.rstrip("/") + "/")
        if inside and (best is None or len(mount) >= len(best[0])):   # the last of equal mounts is the visible one
            best = (mount, source)
    return f"{best[0]} ({best[1]})" if best else str(target)


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path.resolve()


def disk_full_error(exc: BaseException, path: Path | str, what: str) -> DiskFullError | None:
    """The `DiskFullError` for `exc` when it (or its chain) is a write that found no room, else None."""
    if isinstance(exc, DiskFullError):
        return exc
    code = disk_full_code(exc)
    if code is None:
        return None
    return DiskFullError(str(path), what, code, device_of(path))


def write_atomically(path: Path | str, write: Callable[[Path], None], what: str | None = None) -> Path:
    """`write(temporary)` then rename it over `path`: a reader sees the old file or the whole new one, never half,
    and a full disk leaves the old file and no temporary. The temporary keeps `path`'s suffix (matplotlib picks
    the format from it) and is hidden (no artifact glob picks it up)."""
    path = Path(path)
    what = what or path.name
    try:
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    except OSError as exc:
        _raise_disk_full(exc, path, what)
        raise
    os.close(handle)
    temporary = Path(name)
    try:
        # mkstemp makes the file private (0600); the file keeps the mode an ordinary open would give it.
        os.chmod(temporary, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        write(temporary)
        # Some file systems (NFS, delayed allocation) only report ENOSPC when the data reaches the disk.
        descriptor = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        _raise_disk_full(exc, path, what)
        raise
    return path


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def write_text_atomically(path: Path | str, text: str, what: str | None = None) -> Path:
    return write_atomically(path, lambda temporary: temporary.write_text(text), what)


def _raise_disk_full(exc: BaseException, path: Path, what: str) -> None:
    error = disk_full_error(exc, path, what)
    if error is not None and error is not exc:
        raise error from exc


# --- the free-space floor ---------------------------------------------------------------------------------------
def min_free_bytes() -> int:
    raw = os.environ.get(MIN_FREE_ENV)
    if raw is None or not raw.strip():
        return int(DEFAULT_MIN_FREE_MB * MIB)
    try:
        value = float(raw)
    except ValueError:
        raise LowSpaceError(f"{MIN_FREE_ENV}={raw!r} is not a number of MiB") from None
    return max(0, int(value * MIB))


def free_bytes(path: Path | str) -> int:
    """Space an unprivileged writer may still use on the file system holding `path` (or its nearest existing
    parent)."""
    stats = os.statvfs(_existing(Path(path)))
    return stats.f_bavail * stats.f_frsize


def check_free_space(path: Path | str) -> None:
    """LowSpaceError (one line) when `path`'s file system has less free space than the floor."""
    floor = min_free_bytes()
    if floor <= 0:
        return
    free = free_bytes(path)
    if free < floor:
        raise LowSpaceError(f"only {_mib(free)} free on {device_of(path)}, where the study writes; a run needs at "
                            f"least {_mib(floor)} to start ({MIN_FREE_ENV} sets the floor): free space and run the "
                            f"same command again")


def _mib(size: int) -> str:
    return f"{size / MIB:.1f} MiB"


# --- the storage on the way out ---------------------------------------------------------------------------------
def stored_trials(storage_file: Path, study_name: str) -> int | None:
    """Finished trials (COMPLETE + PRUNED, what --trials counts) the storage holds, read without writing; None
    when it positively holds no study of that name. Raises sqlite3.Error when the file cannot be read."""
    if not storage_file.is_file():
        return None
    connection = sqlite3.connect(f"{storage_file.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"studies", "trials"} <= tables:
            return None
        row = connection.execute("SELECT study_id FROM studies WHERE study_name = ?", (study_name,)).fetchone()
        if row is None:
            return None
        (count,) = connection.execute("SELECT COUNT(*) FROM trials WHERE study_id = ? AND state IN "
                                      "('COMPLETE', 'PRUNED')", (row[0],)).fetchone()
        return int(count)
    finally:
        connection.close()


def holds_no_study(storage_file: Path, study_name: str) -> bool:
    """True only when the storage is known to hold no such study (a failed start may remove its folder); any doubt
    keeps the folder."""
    try:
        return stored_trials(storage_file, study_name) is None
    except sqlite3.Error:
        return False


def checkpoint(storage_file: Path) -> bool:
    """Fold the WAL into study.db, so the file alone holds every commit (a user freeing space may copy or delete
    what looks like scratch). Where the disk allows it: a checkpoint that fails leaves the WAL whole, and SQLite
    replays it on the next open, so nothing is lost either way."""
    if not storage_file.is_file():
        return False
    try:
        connection = sqlite3.connect(str(storage_file), timeout=2)
        try:
            busy, _, _ = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            return not busy
        finally:
            connection.close()
    except sqlite3.Error:
        return False


@contextlib.contextmanager
def stop_on_full_disk(storage_file: Path, study_name: str) -> Iterator[None]:
    """Let a disk-full error of any form leave as one `DiskFullError` that says how many trials are safe."""
    try:
        yield
    except Exception as exc:
        error = disk_full_error(exc, *_what_failed(exc, storage_file))
        if error is None:
            raise
        if error.device is None:   # raised where the mount table was not at hand (a worker's cache)
            error = DiskFullError(error.path, error.what, error.code, device_of(error.path))
        checkpoint(storage_file)
        try:
            safe = stored_trials(storage_file, study_name)
        except sqlite3.Error:
            safe = -1
        raise error.for_study(str(storage_file), safe) from exc


def any_disk_full_error(exc: BaseException) -> DiskFullError | None:
    """For the CLI's last resort: a disk-full error of any command, named by the file it was writing."""
    return disk_full_error(exc, *_what_failed(exc, None))


def _what_failed(exc: BaseException, storage_file: Path | None) -> tuple[Path, str]:
    """The file a bare disk-full error was writing: an OSError names it; anything else on the way up from the
    study's SQLite (Optuna, SQLAlchemy) is the storage."""
    stack, seen = [exc], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS \
                and current.filename:
            path = Path(os.fsdecode(current.filename))
            return path, path.name
        stack += [current.__cause__, current.__context__]
    if storage_file is None:
        return Path.cwd(), "its output"
    return storage_file, f"the study storage {storage_file.name}"
