"""A full disk mid-study: one line and exit 2, nothing stored lost, and the same command resumes to
exactly the budget once there is space.

The always-run tests inject the fault at the write calls: `FullDisk` makes SQLite's writes fail as SQLite does
(`sqlite3.OperationalError: database or disk is full`, which SQLAlchemy and Optuna wrap again) and file opens for
writing under the study's `--out` fail with ENOSPC, from a chosen moment. `test_real_small_filesystem` runs the
study on a real 16 MiB tmpfs filled mid-run (a mount namespace of its own via `unshare`, or plain `mount` as
root) and is skipped where mounting is not permitted.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

import dsm_tune.search.study.session as session_module
from dsm_tune.cli import main as cli_main
from dsm_tune.errors import DiskFullError, disk_full_code
from dsm_tune.merging import ModelFingerprint
from dsm_tune.search.diskspace import MIN_FREE_ENV, check_free_space, write_atomically, write_text_atomically
from dsm_tune.search.folder import StudyFolder
from dsm_tune.search.folder import BUNDLE_NAME, HTML_NAME
from dsm_tune.search.space import SPACES_DIR
from dsm_tune.search.study import factory as factory_module
from dsm_tune.search.study.session import StudySession
from dsm_tune.search.testing import StandInFactory

DEMO = ModelFingerprint("dsm_tune_demo_vit", 6, (16, 16), 1, (32, 32), 64)
SAMPLED_DEMO = SPACES_DIR / "sampled" / "demo.yaml"
TRIALS = 7
STUDY = "demo-cpu"
REPO = Path(__file__).resolve().parents[3]


# --- the injected fault ------------------------------------------------------------------------------------------
class FullDisk:
    """From `fill()` on, every write under `root` fails as it does on a full disk: SQLite statements that write
    raise SQLite's own error, opening a file for writing raises ENOSPC. `files_only` leaves SQLite writing (a disk
    whose storage still has room in its pages while new files get none)."""

    WRITES = ("INSERT", "UPDATE", "DELETE", "CREATE", "REPLACE", "ALTER", "DROP")

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self.root = str(Path(root).resolve())
        self.full = False
        self.files_only = False
        self.refused: list[str] = []
        disk = self

        def check(sql: str) -> None:
            if disk.full and not disk.files_only and sql.lstrip().upper().startswith(disk.WRITES):
                disk.refused.append(sql.split()[0])
                raise sqlite3.OperationalError("database or disk is full")

        class Cursor(sqlite3.Cursor):
            def execute(self, sql, *args):
                check(sql)
                return super().execute(sql, *args)

            def executemany(self, sql, *args):
                check(sql)
                return super().executemany(sql, *args)

        class Connection(sqlite3.Connection):
            def cursor(self, factory=Cursor):
                return super().cursor(factory)

            def execute(self, sql, *args):
                check(sql)
                return super().execute(sql, *args)

        real_connect, real_open = sqlite3.connect, builtins.open

        def connect(database, *args, **kwargs):
            if str(database).replace("file:", "").startswith(self.root) and "factory" not in kwargs:
                kwargs["factory"] = Connection
            return real_connect(database, *args, **kwargs)

        def open_(file, mode="r", *args, **kwargs):
            if disk.full and isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") \
                    and os.path.abspath(os.fspath(file)).startswith(disk.root):
                disk.refused.append(os.path.basename(os.fspath(file)))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(file))
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(sqlite3, "connect", connect)
        monkeypatch.setattr(sqlite3.dbapi2, "connect", connect)
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)

    def fill(self, files_only: bool = False) -> None:
        self.full, self.files_only = True, files_only

    def free(self) -> None:
        self.full = False


@pytest.fixture(scope="module")
def ray_session():
    from dsm_tune.search.workers import start_ray, stop_ray

    started = start_ray(None, num_cpus=2)
    import ray

    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    yield
    stop_ray(started)


@pytest.fixture
def stand_in(monkeypatch):
    """`dsm-tune run` as typed, with the stand-in evaluator behind it (no model, no data: the orchestration)."""
    monkeypatch.setattr(factory_module.DefaultEvaluatorFactory, "from_spec",
                        classmethod(lambda cls, spec: StandInFactory(DEMO, cost_s=0.02)))
    monkeypatch.setenv(MIN_FREE_ENV, "0")


def _run(out: Path, capsys, ray: bool = False) -> tuple[int, list[str], str]:
    """`--no-ray` unless `ray`: the evaluator in this process saves a worker's start per run (the disk is the
    driver's either way); the between-trials case runs on Ray, as studies do by default."""
    rc = cli_main(["run", "--model", "demo", "--device", "cpu", "--out", str(out), "--trials", str(TRIALS),
                   "--space", str(SAMPLED_DEMO), "--no-mlflow", *(["--workers", "1"] if ray else ["--no-ray"])])
    captured = capsys.readouterr()
    return rc, [line for line in captured.err.splitlines() if line.strip()], captured.out


def _settled(out: Path) -> list[int]:
    study = optuna.load_study(study_name=STUDY, storage=StudyFolder(out, STUDY).storage_url)
    return sorted(t.number for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED))


def _fill_when_told(monkeypatch, disk: FullDisk, after: int, **fill) -> list[list[int]]:
    """Fill the disk once `after` trials were told; returns the finished trials stored at that moment."""
    told, seen, stored = StudySession.trial_told, [0], []

    def hooked(self, frozen):
        seen[0] += 1
        if seen[0] == after:
            stored.append(sorted(t.number for t in self.study.get_trials(deepcopy=False)
                                 if t.state in (TrialState.COMPLETE, TrialState.PRUNED)))
            disk.fill(**fill)
        return told(self, frozen)

    monkeypatch.setattr(StudySession, "trial_told", hooked)
    return stored


def _assert_one_line(err: list[str], what: str, safe: int | None, out: Path) -> None:
    assert len(err) == 1, err
    line = err[0]
    assert "Traceback" not in line
    assert line.startswith("dsm-tune: error: no space left on ") and f" while writing {what}" in line, line
    storage = StudyFolder(out, STUDY).storage_file.resolve()
    if safe is None:
        assert line.endswith("nothing was stored yet; free space and run the same command to start the study"), line
    else:
        assert f"; {safe} trial{'s are' if safe != 1 else ' is'} safe in {storage}; free space and run the same " \
               f"command to resume" in line, line


def _assert_unlocked(out: Path) -> None:
    from filelock import FileLock

    lock = StudyFolder(out, STUDY).lock_file
    if lock.exists():
        probe = FileLock(str(lock))
        probe.acquire(timeout=0)   # raises Timeout if the failed run kept it
        probe.release()


def _resume_completes_the_budget(out: Path, capsys, disk: FullDisk, ray: bool = False) -> None:
    disk.free()
    rc, err, stdout = _run(out, capsys, ray)
    assert rc == 0, (err, stdout)
    finished = _settled(out)
    assert len(finished) == TRIALS, finished          # exactly the budget: the missing ones, none twice
    folder = StudyFolder(out, STUDY)
    frame = pd.read_csv(folder.trials_csv)
    assert set(frame.loc[frame["state"].isin(["COMPLETE", "PRUNED"]), "number"]) == set(finished)
    assert (folder.path / HTML_NAME).is_file() and (folder.path / BUNDLE_NAME).is_file()
    assert [p.name for p in folder.path.iterdir() if p.name.startswith(".") and p.name != ".lock"] == [], \
        "no temporary file is left behind"


# --- the study on a full disk (fault injected) -------------------------------------------------------------------
@pytest.mark.slow
def test_full_before_the_first_trial(tmp_path, capsys, monkeypatch, stand_in):
    disk = FullDisk(tmp_path, monkeypatch)
    disk.fill()
    rc, err, _ = _run(tmp_path, capsys)
    assert rc == 2
    _assert_one_line(err, "the study storage study.db", None, tmp_path)
    assert disk.refused, "the storage was written (and refused)"
    assert not (tmp_path / STUDY).exists(), "a start that stored nothing leaves no folder (nor a .lock)"
    _resume_completes_the_budget(tmp_path, capsys, disk)


@pytest.mark.slow
def test_full_between_trials(tmp_path, capsys, monkeypatch, ray_session, stand_in):
    disk = FullDisk(tmp_path, monkeypatch)
    stored = _fill_when_told(monkeypatch, disk, after=3)
    rc, err, stdout = _run(tmp_path, capsys, ray=True)
    assert rc == 2, (err, stdout)
    before = stored[0]
    assert len(before) >= 3
    # trials.csv is the first write after the fill (the storage's comes with the next trial): warned in stdout.
    assert "dsm-tune: warning: no space left on" in stdout and "while writing trials.csv" in stdout
    _assert_one_line(err, "the study storage study.db", len(before), tmp_path)
    assert _settled(tmp_path) == before, "every trial stored before the disk filled is there, and only those"
    _assert_unlocked(tmp_path)
    # The last good trials.csv stays whole: it was never replaced by a half-written one.
    assert len(pd.read_csv(StudyFolder(tmp_path, STUDY).trials_csv)) >= len(before) - 1
    _resume_completes_the_budget(tmp_path, capsys, disk, ray=True)


@pytest.mark.slow
def test_full_during_the_final_outputs(tmp_path, capsys, monkeypatch, stand_in):
    disk = FullDisk(tmp_path, monkeypatch)
    write_final = session_module.write_final_outputs

    def full_at_the_end(*args, **kwargs):
        disk.fill()
        return write_final(*args, **kwargs)

    monkeypatch.setattr(session_module, "write_final_outputs", full_at_the_end)
    rc, err, _ = _run(tmp_path, capsys)
    assert rc == 2
    _assert_one_line(err, "trials.csv", TRIALS, tmp_path)
    assert len(_settled(tmp_path)) == TRIALS
    folder = StudyFolder(tmp_path, STUDY)
    before = pd.read_csv(folder.trials_csv)   # the live copy of the last trial, whole
    assert len(before[before["state"].isin(["COMPLETE", "PRUNED"])]) == TRIALS
    assert not folder.best_file.exists()
    monkeypatch.setattr(session_module, "write_final_outputs", write_final)
    # The same command again: the budget is spent, so it only writes the outputs the full disk held back.
    _resume_completes_the_budget(tmp_path, capsys, disk)
    assert folder.best_file.is_file() and json.loads(folder.best_file.read_text())["provenance"]


@pytest.mark.slow
def test_derived_outputs_failing_do_not_stop_a_study_whose_storage_writes(tmp_path, capsys, monkeypatch,
                                                                          stand_in):
    disk = FullDisk(tmp_path, monkeypatch)
    _fill_when_told(monkeypatch, disk, after=2, files_only=True)
    write_final = session_module.write_final_outputs

    def freed_at_the_end(*args, **kwargs):
        disk.free()
        return write_final(*args, **kwargs)

    monkeypatch.setattr(session_module, "write_final_outputs", freed_at_the_end)
    rc, err, stdout = _run(tmp_path, capsys)
    assert rc == 0, (err, stdout)
    assert stdout.count("dsm-tune: warning: no space left on") == 1, stdout   # once, not per trial
    assert any(name.startswith(".trials-") for name in disk.refused) and len(_settled(tmp_path)) == TRIALS
    frame = pd.read_csv(StudyFolder(tmp_path, STUDY).trials_csv)   # written again at the end, whole
    assert len(frame[frame["state"].isin(["COMPLETE", "PRUNED"])]) == TRIALS


@pytest.mark.slow
def test_a_worker_whose_cache_finds_the_disk_full_ends_the_run_in_one_line(tmp_path, capsys, monkeypatch,
                                                                           stand_in):
    cache = tmp_path / "cache" / "dense-0.pt"

    class FullCacheFactory:
        def __call__(self):
            raise DiskFullError(str(cache), "the dense-output cache", errno.ENOSPC)

    monkeypatch.setattr(factory_module.DefaultEvaluatorFactory, "from_spec",
                        classmethod(lambda cls, spec: FullCacheFactory()))
    rc, err, _ = _run(tmp_path, capsys)
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("dsm-tune: error: no space left on ")
    assert "while writing the dense-output cache" in err[0] and "nothing was stored yet" in err[0]
    assert not (tmp_path / STUDY).exists()


def test_too_little_free_space_refuses_to_start(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(MIN_FREE_ENV, str(10 ** 12))   # a floor no disk here has
    rc = cli_main(["run", "--model", "demo", "--device", "cpu", "--out", str(tmp_path / "out"), "--no-mlflow"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("dsm-tune: error: only ") and f"({MIN_FREE_ENV} sets the floor)" in err[0]
    assert not (tmp_path / "out").exists(), "nothing is created by a run that does not start"
    monkeypatch.setenv(MIN_FREE_ENV, "0.5")
    check_free_space(tmp_path)   # half a MiB is free here


# --- the pieces ---------------------------------------------------------------------------------------------------
def test_optuna_storage_error_is_traced_to_the_full_disk(tmp_path, monkeypatch):
    """Optuna says `StorageInternalError: ... e.g. exceeding max length`; the chain says the disk is full."""
    disk = FullDisk(tmp_path, monkeypatch)
    folder = StudyFolder(tmp_path, "s")
    folder.path.mkdir()
    study = optuna.create_study(storage=folder.open_storage(), study_name="s")
    disk.fill()
    with pytest.raises(optuna.exceptions.StorageInternalError) as caught:
        study.set_user_attr("x", 1)
    assert "exceeding max length" in str(caught.value)   # the wrong cause, as users saw it
    assert disk_full_code(caught.value) == errno.ENOSPC
    assert disk_full_code(RuntimeError("unrelated")) is None


def test_a_write_cut_short_keeps_the_good_file(tmp_path, monkeypatch):
    good = tmp_path / "trials.csv"
    good.write_text("number\n0\n1\n")
    good.chmod(0o644)

    def half_then_full(temporary: Path) -> None:
        with open(temporary, "w") as handle:
            handle.write("number\n0\n")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(temporary))

    with pytest.raises(DiskFullError) as caught:
        write_atomically(good, half_then_full, "trials.csv")
    assert good.read_text() == "number\n0\n1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trials.csv"], "no temporary is left"
    assert caught.value.what == "trials.csv" and str(caught.value).startswith("no space left on ")
    assert caught.value.device and "(" in caught.value.device   # mount point (device)
    write_text_atomically(good, "number\n0\n1\n2\n")
    assert good.read_text().endswith("2\n") and good.stat().st_mode & 0o777 == 0o644   # the mode is kept


def test_disk_full_error_crosses_a_process_boundary():
    import pickle

    error = DiskFullError("/x/cache/dense.pt", "the dense-output cache", errno.EDQUOT, "/x (/dev/sdb1)")
    copy = pickle.loads(pickle.dumps(error.for_study("/x/s/study.db", 4)))
    assert str(copy) == ("no space left on /x (/dev/sdb1) (disk quota exceeded) while writing the dense-output "
                         "cache; 4 trials are safe in /x/s/study.db; free space and run the same command to resume")
    readonly = DiskFullError("/ro/s/trials.csv", "trials.csv", errno.EROFS, "/ro (/dev/sdc)")
    assert str(readonly) == ("cannot write to /ro (/dev/sdc): it is read-only while writing trials.csv; make it "
                             "writable and run the same command again")


def test_dense_cache_on_a_full_disk_raises_disk_full_and_leaves_nothing(tmp_path, monkeypatch):
    from dsm_tune.evaluation.data import load_data
    from dsm_tune.evaluation.metrics import AccuracyEvaluator
    from dsm_tune.evaluation.models import build_model

    model = build_model("demo")
    data = load_data("demo-fashion-mnist", model, limit=8)
    cache = tmp_path / "cache"
    disk = FullDisk(cache, monkeypatch)
    disk.fill()
    with pytest.raises(DiskFullError) as caught:
        AccuracyEvaluator(model, data, cache_dir=cache, batch_size=8)
    assert caught.value.what == "the dense-output cache" and caught.value.path.startswith(str(cache))
    assert list(cache.iterdir()) == [], "neither a cache file nor a temporary is left"


def test_pareto_html_is_small_and_loads_the_library_written_once(tmp_path):
    from dsm_tune.search.plots import write_pareto_plots
    from dsm_tune.search.results import trials_frame
    from tests.helpers.synthetic_study import create_study, populate

    study, study_dir = create_study(tmp_path, "plotted")
    populate(study)
    html, _ = write_pareto_plots(trials_frame(study), study_dir, max_drop=1.0)
    bundle = study_dir / BUNDLE_NAME
    assert html.stat().st_size < 200_000 < bundle.stat().st_size
    assert '<script charset="utf-8" src="plotly.min.js"></script>' in html.read_text()
    first = bundle.stat().st_mtime_ns, bundle.stat().st_ino
    write_pareto_plots(trials_frame(study), study_dir, max_drop=1.0)
    assert (bundle.stat().st_mtime_ns, bundle.stat().st_ino) == first, "the library is written once per folder"
    bundle.write_text("cut short")
    write_pareto_plots(trials_frame(study), study_dir, max_drop=1.0)
    assert bundle.stat().st_size > 1_000_000, "a bundle cut short by a full disk is written again"
    assert bundle not in StudyFolder.at(study_dir).artifact_files   # MLflow does not get a copy at every refresh


# --- a real small file system ------------------------------------------------------------------------------------
def _mount_command(mount_point: Path) -> list[str] | None:
    """How this machine lets a test mount a tmpfs: in a private mount namespace (`unshare -rm`: no root needed
    where user namespaces are allowed; the mount ends with the process), else plainly as root ([]), else None."""
    if shutil.which("unshare") is not None:
        probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mount_point}"],
                               capture_output=True, text=True)
        if probe.returncode == 0:
            return ["unshare", "-rm"]
    if os.geteuid() == 0 and shutil.which("mount") is not None:
        probe = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                               capture_output=True, text=True)
        if probe.returncode == 0:
            subprocess.run(["umount", str(mount_point)], check=True)
            return []
    return None


REAL_DISK_SCRIPT = r"""
import contextlib, errno, io, json, sys
from pathlib import Path
from optuna.trial import TrialState
import optuna
sys.path.insert(0, {repo!r})
from dsm_tune.cli import main
from dsm_tune.merging import ModelFingerprint
from dsm_tune.search.study import factory as factory_module
from dsm_tune.search.study.session import StudySession
from dsm_tune.search.testing import StandInFactory

root = Path({root!r})
factory_module.DefaultEvaluatorFactory.from_spec = classmethod(
    lambda cls, spec: StandInFactory(ModelFingerprint("dsm_tune_demo_vit", 6, (16, 16), 1, (32, 32), 64), cost_s=0.02))
filler, told, seen, stored = root / "filler", StudySession.trial_told, [0], []

def fill():
    with open(filler, "ab") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC

def hooked(self, frozen):
    seen[0] += 1
    if seen[0] == 3:
        stored.append(sorted(t.number for t in self.study.get_trials(deepcopy=False)
                             if t.state in (TrialState.COMPLETE, TrialState.PRUNED)))
        fill()
    return told(self, frozen)

StudySession.trial_told = hooked
argv = ["run", "--model", "demo", "--device", "cpu", "--out", str(root / "runs"), "--trials", "{trials}",
        "--no-ray", "--space", {space!r}, "--no-mlflow"]

def run():
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, err.getvalue(), out.getvalue()

def settled():
    study = optuna.load_study(study_name="demo-cpu", storage=f"sqlite:///{{root}}/runs/demo-cpu/study.db")
    return sorted(t.number for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED))

first = run()
after_full = settled()
leftovers = sorted(p.name for p in (root / "runs" / "demo-cpu").iterdir())
filler.unlink()
second = run()
print(json.dumps({{"first": first, "second": second, "stored": stored, "after_full": after_full,
                  "final": settled(), "leftovers": leftovers}}))
"""


@pytest.mark.slow
def test_real_small_filesystem(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    prefix = _mount_command(mount_point)
    if prefix is None:
        pytest.skip("mounting a tmpfs is not permitted here (no user namespaces for `unshare -rm`); the "
                    "fault-injection tests above cover the same paths")
    script = tmp_path / "run.py"
    script.write_text(REAL_DISK_SCRIPT.format(repo=str(REPO), root=str(mount_point), trials=TRIALS,
                                              space=str(SAMPLED_DEMO)))
    env = {**os.environ, MIN_FREE_ENV: "0"}
    try:
        done = subprocess.run([*prefix, "sh", "-c", f"mount -t tmpfs -o size=16m tmpfs {mount_point} && "
                                                    f"exec {sys.executable} {script}"],
                              capture_output=True, text=True, env=env, timeout=600)
    finally:
        if not prefix:   # mounted in this machine's namespace: take it down whatever happened
            subprocess.run(["umount", str(mount_point)], capture_output=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rc, err, _ = result["first"]
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, err
    before = result["stored"][0]
    assert lines[0].startswith(f"dsm-tune: error: no space left on {mount_point} (tmpfs) while writing ")
    assert f"; {len(before)} trials are safe in {mount_point}/runs/demo-cpu/study.db; free space and run the " \
           f"same command to resume" in lines[0], lines[0]
    assert result["after_full"] == before
    assert not [name for name in result["leftovers"] if name.startswith(".") and name != ".lock"], \
        f"temporaries left on the full disk: {result['leftovers']}"
    rc, err, out = result["second"]
    assert rc == 0, err + out
    assert len(result["final"]) == TRIALS


def test_mlflow_left_queued_by_a_full_disk_ends_the_run_as_a_full_disk(tmp_path):
    """The tracker swallows MLflow's failures (an outage only queues); one that leaves trials queued because the
    MLflow store's disk is full is said as a full disk at the end of the run."""
    from types import SimpleNamespace

    folder = StudyFolder(tmp_path, STUDY)
    folder.path.mkdir()
    store = tmp_path / "mlflow.db"
    full = sqlite3.OperationalError("database or disk is full")
    tracker = SimpleNamespace(uri=f"sqlite:///{store}", last_error=RuntimeError("wrapped"))
    tracker.last_error.__cause__ = full
    session = SimpleNamespace(tracker=tracker, folder=folder)
    StudySession._check_tracker_space(session)   # nothing queued: MLflow took everything in the end
    folder.pending_file.write_text('{"number": 0}\n')
    with pytest.raises(DiskFullError) as caught:
        StudySession._check_tracker_space(session)
    assert caught.value.what == f"the MLflow store sqlite:///{store}" and caught.value.path == str(store)
    tracker.last_error = ConnectionError("server down")   # an outage stays a warning
    StudySession._check_tracker_space(session)
