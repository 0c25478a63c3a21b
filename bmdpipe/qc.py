"""The QC table: one row per patient, stage and view, from the stages' JSON summaries."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

QC_COLUMNS = ["patient_id", "view", "stage", "status", "reason"]


def read_summaries(paths: list[str | os.PathLike[str]]) -> pd.DataFrame:
    """Collect every ``*.json`` summary in ``paths`` (files or folders) into the QC table.

    Returns:
        A frame with :data:`QC_COLUMNS`, sorted by patient, stage and view.
    """
    rows = []
    for path in paths:
        p = Path(path)
        files = sorted(p.glob("*.json")) if p.is_dir() else [p]
        for f in files:
            summary = json.loads(f.read_text())
            rows.append(
                {
                    "patient_id": summary.get("patient_id", ""),
                    "view": summary.get("view", ""),
                    "stage": summary.get("stage", ""),
                    "status": summary.get("status", "unknown"),
                    "reason": summary.get("reason", ""),
                }
            )
    df = pd.DataFrame(rows, columns=QC_COLUMNS)
    return df.sort_values(["patient_id", "stage", "view"], kind="stable").reset_index(drop=True)
