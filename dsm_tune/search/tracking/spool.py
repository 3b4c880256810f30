"""The offline queue: MLflow payloads not yet delivered, one JSON line per trial in the study folder, so a
later run (or `dsm-tune sync`) delivers what an outage held back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsm_tune.search.diskspace import write_text_atomically


class Spool:
    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> dict[int, dict[str, Any]]:
        pending: dict[int, dict[str, Any]] = {}
        if not self.path.exists():
            return pending
        for line in self.path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                payload = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash mid-write; the storage backfill covers it
                continue
            pending[int(payload["number"])] = payload
        return pending

    def write(self, pending: dict[int, dict[str, Any]]) -> None:
        """Replace the queue with `pending` atomically (no file when nothing is pending)."""
        if not pending:
            self.path.unlink(missing_ok=True)
            return
        # Whole or not at all: a full disk keeps the last good queue and raises DiskFullError (the storage still
        # holds every trial, and end_study logs what MLflow lacks from it).
        write_text_atomically(self.path, "".join(json.dumps(pending[n]) + "\n" for n in sorted(pending)),
                              f"the MLflow queue {self.path.name}")
