"""`--ray-address HOST:PORT` against a cluster started with `ray start --head` and token authentication on
(Ray 2.60's default on a machine that holds a token)."""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from dsm_tune.search import ray_session
from dsm_tune.search.ray_session import (
    AUTH_MODE_ENV, RAY_LOOPBACK_ENV, TOKEN_ENV, TOKEN_PATH_ENV, connection_hint, is_loopback_address,
    prepare_connection, token_source,
)

HEAD_START_TIMEOUT_S = 120
STUDY_TIMEOUT_S = 600


@pytest.fixture
def clean_ray_env(monkeypatch, tmp_path):
    """No token anywhere Ray looks (an empty home) and no mode set; Ray itself not imported by the code under
    test's checks."""
    for name in (AUTH_MODE_ENV, TOKEN_ENV, TOKEN_PATH_ENV, RAY_LOOPBACK_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delitem(sys.modules, "ray", raising=False)   # so prepare_connection does not refresh a live Ray
    return tmp_path


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1:6379", True), ("localhost:6379", True), ("[::1]:6379", True), ("ray://127.0.0.1:10001", True),
    ("10.0.0.5:6379", False), ("head.cluster:6379", False), ("ray://head:10001", False),
])
def test_loopback_addresses(address, loopback):
    assert is_loopback_address(address) is loopback


def test_token_sources_in_rays_order(clean_ray_env, monkeypatch):
    home_token = clean_ray_env / "home" / ".ray" / "auth_token"
    assert token_source() is None
    home_token.parent.mkdir(parents=True)
    home_token.write_text("abc")
    assert token_source() == str(home_token)
    monkeypatch.setenv(TOKEN_PATH_ENV, str(clean_ray_env / "missing"))
    assert token_source() is None          # an explicit path replaces the default one
    monkeypatch.setenv(TOKEN_ENV, "abc")
    assert token_source() == f"${TOKEN_ENV}"


def test_explicit_address_with_a_token_joins_in_token_mode(clean_ray_env, monkeypatch):
    token = clean_ray_env / "token"
    token.write_text("abc")
    monkeypatch.setenv(TOKEN_PATH_ENV, str(token))
    assert prepare_connection("127.0.0.1:6379") == str(token)
    assert os.environ[AUTH_MODE_ENV] == "token" and os.environ[RAY_LOOPBACK_ENV] == "0"
    assert connection_hint("127.0.0.1:6379") == ""


@pytest.mark.parametrize("address", [None, "auto", "local"])
def test_addresses_ray_resolves_itself_are_left_to_ray(clean_ray_env, monkeypatch, address):
    monkeypatch.setenv(TOKEN_ENV, "abc")
    assert prepare_connection(address) is None
    assert AUTH_MODE_ENV not in os.environ and connection_hint(address) == ""


def test_an_explicit_mode_is_respected(clean_ray_env, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "abc")
    monkeypatch.setenv(AUTH_MODE_ENV, "disabled")
    assert prepare_connection("10.0.0.5:6379") is None
    assert os.environ[AUTH_MODE_ENV] == "disabled"
    assert RAY_LOOPBACK_ENV not in os.environ   # a remote address is not forced to loopback


def test_without_a_token_the_failure_says_where_it_goes(clean_ray_env):
    assert prepare_connection("10.0.0.5:6379") is None
    assert AUTH_MODE_ENV not in os.environ
    hint = connection_hint("10.0.0.5:6379")
    assert str(ray_session.default_token_path()) in hint and TOKEN_PATH_ENV in hint and TOKEN_ENV in hint


# A real head --------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in (AUTH_MODE_ENV, TOKEN_ENV, TOKEN_PATH_ENV, "RAY_ADDRESS")}
    env.update(RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


@contextlib.contextmanager
def ray_head(token: Path) -> Iterator[str]:
    """`ray start --head` bound to 127.0.0.1 with token authentication, in the foreground (`--block`), so stopping
    that one process stops exactly this head's processes (`ray stop` would stop every Ray of the machine)."""
    port = _free_port()
    # Ray's socket paths must stay short: a private folder directly under the temp dir.
    temp_dir = Path(tempfile.mkdtemp(prefix="dsm-ray-"))
    ray_cli = Path(sys.executable).with_name("ray")
    command = [str(ray_cli), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
               "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp_dir}"]
    env = _ray_env(**{RAY_LOOPBACK_ENV: "0", AUTH_MODE_ENV: "token", TOKEN_PATH_ENV: str(token),
                      "RAY_worker_niceness": "0"})
    log_path = temp_dir / "head.log"
    with log_path.open("wb") as log:
        head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while "Ray runtime started" not in log_path.read_text(errors="replace"):
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ray start --head failed:\n" + log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)   # --block: the head drains and stops its own processes
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _dsm_tune(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    # A fresh process, as a user's: Ray reads its loopback setting once, when it is first imported.
    return subprocess.run([sys.executable, "-m", "dsm_tune.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=STUDY_TIMEOUT_S)


@pytest.mark.slow
def test_study_joins_a_token_authenticated_head_by_address(tmp_path):
    token = tmp_path / "auth_token"
    token.write_text("dsm-tune-test-" + os.urandom(16).hex())
    with ray_head(token) as address:
        # No token for this driver: one line saying where it goes (after Ray's own retries).
        no_token = _dsm_tune(["run", "--model", "demo", "--device", "cpu", "--trials", "2", "--workers", "1",
                              "--limit", "64", "--no-mlflow", "--out", str(tmp_path / "runs"), "--study", "refused",
                              "--ray-address", address],
                             _ray_env(HOME=str(tmp_path / "home")), tmp_path)
        assert no_token.returncode == 2, no_token.stderr[-3000:]
        error = [line for line in no_token.stderr.splitlines() if line.startswith("dsm-tune: error:")]
        assert len(error) == 1 and f"Ray cluster at {address}" in error[0] and TOKEN_PATH_ENV in error[0]

        # The token where Ray looks for it and RAY_AUTH_MODE unset: the documented form works.
        joined = _dsm_tune(["run", "--model", "demo", "--device", "cpu", "--trials", "2", "--workers", "1",
                            "--limit", "64", "--no-mlflow", "--out", str(tmp_path / "runs"), "--study", "joined",
                            "--ray-address", address],
                           _ray_env(**{TOKEN_PATH_ENV: str(token)}), tmp_path)
        assert joined.returncode == 0, (joined.stdout + joined.stderr)[-3000:]
    with (tmp_path / "runs" / "joined" / "trials.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and {row["state"] for row in rows} <= {"COMPLETE", "PRUNED"}
    measured = [row for row in rows if row["state"] == "COMPLETE"]
    assert measured and all(float(row["latency_ms"]) > 0 and row["worker"] for row in measured)
