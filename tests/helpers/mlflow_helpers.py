"""MLflow fixtures for the tracking and UI tests: a migrated empty store to copy, a loopback server to run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SERVER_START_TIMEOUT_S = 120


def free_port() -> int:
    """A loopback port nothing listens on (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_empty_store(folder: Path) -> Path:
    """A migrated, empty MLflow sqlite store (creating one runs every migration: seconds; copying is instant)."""
    from mlflow import MlflowClient

    folder.mkdir(parents=True, exist_ok=True)
    database = folder / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{database}").search_experiments()
    return database


def copy_store(template: Path, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, out / "mlflow.db")
    return f"sqlite:///{(out / 'mlflow.db').resolve()}"


def rest(port: int, endpoint: str, payload: dict | None = None, timeout: float = 10) -> dict:
    """One call to the server's REST API (POST with a JSON body, or GET)."""
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/{endpoint}"
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                     method="POST" if data is not None else "GET")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@contextmanager
def running_server(command: list[str], port: int, log_path: Path) -> Iterator[subprocess.Popen]:
    """Start `command` (an mlflow server on 127.0.0.1:port) in its own process group, wait until its REST API
    answers (bounded), and stop that group afterwards."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + SERVER_START_TIMEOUT_S
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"mlflow server exited with {process.returncode}:\n"
                                       + log_path.read_text()[-3000:])
                try:
                    rest(port, "experiments/search", {"max_results": 1}, timeout=2)
                    break
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"mlflow server did not answer within {SERVER_START_TIMEOUT_S} s:\n"
                                           + log_path.read_text()[-3000:])
                    time.sleep(0.5)
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=10)
