"""A small synthetic cohort of training targets, in the targets stage's file format, for the training tests.

Each view has three vertebra-like blobs (sites L1, L2, L3) whose areal density
(g/cm²) is the patient's BMD; the radiograph shows them, ribs, two lung fields of
fixed contrast (the reference that survives per-image standardisation, as soft
tissue and lungs do in a real radiograph) and smooth soft-tissue texture with
noise, so a generator must learn to separate the vertebrae from the rest.

    python tests/synthetic_targets.py OUT_DIR [--patients N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

SITES = ("L1", "L2", "L3")


def make_view(rng: np.random.Generator, density: np.ndarray, size: int = 64) -> dict[str, np.ndarray]:
    """One view: ``xray`` (display-like values), ``bone`` and ``roi_sites`` ``(3, size, size)`` in g/cm²."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    cx = size / 2 + rng.uniform(-3, 3)
    sites = []
    for k, d in enumerate(density):
        cy = size * (0.25 + 0.25 * k) + rng.uniform(-2, 2)
        blob = ((yy - cy) / (size * 0.09)) ** 2 + ((xx - cx) / (size * 0.16)) ** 2 < 1
        sites.append(ndimage.gaussian_filter(blob.astype(np.float32), 0.7) * d)
    roi = np.stack(sites).astype(np.float32)
    rib = (np.abs(np.sin(yy / 5 + rng.uniform(0, 6))) > 0.93) * 0.3
    bone = (roi.sum(0) + rib).astype(np.float32)
    lung = (np.abs(xx - cx) > size * 0.22) & (yy < size * (0.6 + rng.uniform(-0.1, 0.1)))  # fixed-contrast reference
    soft = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 6) * 6
    xray = 100 + 40 * bone - 40 * lung + soft + rng.normal(0, 1.5, (size, size))
    return {"xray": xray.astype(np.float32), "bone": bone, "roi": roi.sum(0).astype(np.float32),
            "roi_sites": roi, "roi_site_names": np.array(SITES)}


def write_cohort(root: str | Path, n_patients: int = 9, views: tuple[str, ...] = ("pa", "rot"), seed: int = 0,
                 size: int = 64) -> Path:
    """``root/targets/{patient}/{view}.npz`` + ``targets.json``, and ``root/samples.tsv``; returns root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        patient = f"s{i:02d}"
        density = np.clip(rng.normal(0.9, 0.15) + rng.normal(0, 0.04, 3), 0.5, 1.4)
        folder = root / "targets" / patient
        folder.mkdir(parents=True, exist_ok=True)
        for view in views:
            np.savez(folder / f"{view}.npz", **make_view(rng, density, size))
            rows.append({"patient_id": patient, "view": view, "xray": f"{patient}_{view}.dcm", "ct": f"ct/{patient}",
                         **{f"dxa_{s}": round(float(d), 4) for s, d in zip(SITES, density)},
                         "qct_L1": round(float(density[0] * 130), 2)})
        (folder / "targets.json").write_text(json.dumps({"status": "ok", "patient_id": patient, "views": list(views),
                                                         "roi_sites": list(SITES)}))
    pd.DataFrame(rows).to_csv(root / "samples.tsv", sep="\t", index=False)
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--patients", type=int, default=9)
    args = parser.parse_args()
    write_cohort(args.out, args.patients)
