"""The study folder `<out>/<study>/`: every file name of a study, and its Optuna storage.

The driver writes the folder; `report`, `export`, `sync` and the tracker only read it (the tracker through what
the driver hands it). A study exists once its storage holds a study of the folder's name; a folder with only a
`.lock` in it is a study being created by another process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dsm_tune.record import SPEC
from dsm_tune.errors import DSMTuneError

if TYPE_CHECKING:   # optuna is the tuner's: the CLI names study files without it (a runtime-only install)
    import optuna

STORAGE_FILE = "study.db"
PENDING_FILE = "mlflow_pending.jsonl"
HTML_NAME = "pareto.html"
PNG_NAME = "pareto.png"
BUNDLE_NAME = "plotly.min.js"    # what plotly's include_plotlyjs="directory" pages load from their own folder


class StudyError(DSMTuneError):
    """A study folder is missing, unreadable, not a dsm-tune study, or cannot go on."""


@dataclass(frozen=True)
class StudyFolder:
    out: Path
    name: str

    @classmethod
    def at(cls, study_dir: Path) -> "StudyFolder":
        study_dir = Path(study_dir)
        return cls(study_dir.parent, study_dir.name)

    @property
    def path(self) -> Path:
        return Path(self.out) / self.name

    # The files, one name each.
    @property
    def storage_file(self) -> Path:
        return self.path / STORAGE_FILE

    @property
    def spec_file(self) -> Path:
        return self.path / "spec.json"

    @property
    def space_copy(self) -> Path:
        return self.path / "space.yaml"

    @property
    def trials_csv(self) -> Path:
        return self.path / "trials.csv"

    @property
    def best_file(self) -> Path:
        return self.path / "best.json"

    @property
    def lock_file(self) -> Path:
        return self.path / ".lock"

    @property
    def pending_file(self) -> Path:
        """MLflow records not yet delivered (see `dsm_tune.search.tracking`)."""
        return self.path / PENDING_FILE

    @property
    def artifact_files(self) -> list[Path]:
        """What a tracker mirrors of the folder (the storage stays the record): plots, tables, the spec and space."""
        return [*self.plot_files, self.trials_csv, self.best_file, self.spec_file, self.space_copy]

    @property
    def plot_files(self) -> list[Path]:
        """The Pareto plots (`search/plots.py`); the plotting library beside them is not a study file."""
        return [self.path / HTML_NAME, self.path / PNG_NAME]

    @property
    def log_file(self) -> Path:
        """Library chatter (Ray, MLflow) of the runs of this study, kept off the user's terminal."""
        return self.path / "run.log"

    # The storage.
    @property
    def storage_url(self) -> str:
        return f"sqlite:///{self.path.resolve() / STORAGE_FILE}"

    def open_storage(self) -> optuna.storages.RDBStorage:
        """The storage for writing (the driver). SQLite in WAL mode with synchronous=NORMAL: a commit no longer
        waits for the disk (a trial writes a dozen attributes, each its own commit, which took ~40 ms apiece with
        the default journal), and a crash of the process still loses nothing committed; only a power cut can drop
        the last commits. WAL needs a local file system (not NFS) for the study folder."""
        import sqlite3

        path = str(self.storage_file.resolve())

        def connect() -> sqlite3.Connection:
            connection = sqlite3.connect(path, timeout=60, check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            return connection

        import optuna

        return optuna.storages.RDBStorage(self.storage_url, engine_kwargs={"creator": connect})

    def holds_study(self) -> bool:
        """Whether the storage holds this study (never creates an empty storage just by looking)."""
        if not self.storage_file.is_file():
            return False
        import optuna

        storage = optuna.storages.RDBStorage(self.storage_url)
        try:
            return self.name in {s.study_name for s in storage.get_all_studies()}
        finally:
            storage.remove_session()

    def being_created(self) -> bool:
        """Another process holds the lock of a study its storage does not hold yet: it is being started."""
        if not self.lock_file.exists() or self.holds_study():
            return False
        from filelock import FileLock, Timeout

        probe = FileLock(str(self.lock_file))
        try:
            probe.acquire(timeout=0)
        except Timeout:
            return True
        probe.release()
        return False

    def missing_error(self, hint: str) -> StudyError:
        """The one error for a study that is not (yet) there; `hint` says what to do instead."""
        if self.being_created():
            return StudyError(f"study {self.name!r} in {self.out} is busy: another dsm-tune process is starting it "
                              f"({self.lock_file} is locked); try again when it has started")
        return StudyError(f"no study at {self.path}: {self.storage_file} does not exist ({hint})")

    def load(self) -> optuna.Study:
        """The existing dsm-tune study, read-mostly."""
        if not self.storage_file.is_file():
            raise self.missing_error("run `dsm-tune run` first, or check --out")
        import optuna

        try:
            study = optuna.load_study(study_name=self.name, storage=self.storage_url)
        except KeyError:
            if self.being_created():
                raise self.missing_error("") from None
            raise StudyError(f"{self.storage_file} holds no study named {self.name!r}: the folder name must be the "
                             f"study name") from None
        except Exception as exc:  # sqlite/SQLAlchemy errors of a corrupt or foreign file
            raise StudyError(f"cannot read the study storage {self.storage_file}: {type(exc).__name__}: {exc}") \
                from None
        if SPEC not in study.user_attrs:
            raise StudyError(f"{self.storage_file} is an Optuna study but not a dsm-tune study (no 'spec' user "
                             f"attribute)")
        return study
