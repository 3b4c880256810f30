"""What the parent run mirrors of a study folder: its files as artifacts, and the front as a table and an image."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from dsm_tune.search.folder import PNG_NAME, StudyFolder
from dsm_tune.search.tracking.runs import FRONT_IMAGE_KEY, FRONT_TABLE, LOGGED_ARTIFACTS_TAG, front_table


class StudyArtifacts:
    def __init__(self, client: Any, parent_run_id: str | None, study_dir: Path):
        self.client = client
        self.parent_run_id = parent_run_id
        self.study_dir = Path(study_dir)

    def upload(self, study_dir: Path) -> None:
        """The study folder's plots, trials.csv, best.json, spec and space (`StudyFolder.artifact_files`)."""
        if self.parent_run_id is None:
            return
        for path in StudyFolder.at(study_dir).artifact_files:
            if path.is_file():
                self.client.log_artifact(self.parent_run_id, str(path))

    def log_front(self, pareto_numbers: list[int], records: list[Mapping[str, Any]], limit: float | None,
                  step: int) -> None:
        """The front as a table the artifact view renders (`pareto_front.json`) and pareto.png as a logged image
        of the parent (its charts show it), beside the pareto.png artifact."""
        table = pd.DataFrame(front_table(records, pareto_numbers, limit))
        # MLflow's own log_table appends to an existing table: a resumed study's front would hold old rows too.
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / FRONT_TABLE
            table.to_json(path, orient="split", index=False)
            self.client.log_artifact(self.parent_run_id, str(path))
        logged = json.loads(self.client.get_run(self.parent_run_id).data.tags.get(LOGGED_ARTIFACTS_TAG) or "[]")
        entry = {"path": FRONT_TABLE, "type": "table"}
        if entry not in logged:
            self.client.set_tag(self.parent_run_id, LOGGED_ARTIFACTS_TAG, json.dumps([*logged, entry]))
        self._log_front_image(step)

    def _log_front_image(self, step: int) -> None:
        png = self.study_dir / PNG_NAME
        if not png.is_file():
            return
        # One image per step (trials logged): a second end_study of the same study (`sync`) adds none.
        marker = f"{FRONT_IMAGE_KEY}+step+{step}+"
        if any(a.path.split("/")[-1].startswith(marker) for a in self.client.list_artifacts(self.parent_run_id,
                                                                                              "images")):
            return
        from PIL import Image

        with Image.open(png) as image:
            self.client.log_image(self.parent_run_id, image.convert("RGB"), key=FRONT_IMAGE_KEY, step=step)
