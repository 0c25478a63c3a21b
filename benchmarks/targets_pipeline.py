"""Training targets of a finished workflow run against the virtual cohort's truth.

    python benchmarks/targets_pipeline.py [--results results] [--cohort resources/virtual_cohort]

Reads what the workflow wrote (``results/targets/{patient}/{view}.npz``: the
stage-1 bone projection in g/cm² computed through phantom calibration →
segmentation (supplied label map or the U-Net) → registration → projection)
and the simulator's true bone projection of the same radiograph in its true
pose (``truth/{patient}.npz``), brought to the target's frame (the same crop
box and size). Prints the PCC of ROI means over the simulator's ROI boxes
(each vertebral body in the field), all patients and split by segmentation
method, the mean ratio target/truth, and the views left out (failed
registrations) with their reasons. Unlike benchmarks/registration.py (truth
labels as segmentation), every number here comes from the pipeline's own
outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from bmdpipe.targets import crop_resize  # noqa: E402


def roi_pairs(target: dict, truth_view: dict, truth_drr: np.ndarray) -> list[tuple[str, float, float]]:
    """``(roi name, target mean, truth mean)`` for each simulator ROI box inside the target's field (g/cm²)."""
    box = [int(v) for v in target["crop_box_rows_cols"]]
    size = target["bone"].shape
    frame = crop_resize(truth_drr, box, size)
    sr, sc = size[0] / (box[1] - box[0]), size[1] / (box[3] - box[2])
    out = []
    for name, (r0, r1, c0, c1) in truth_view["stats"]["roi_boxes"].items():
        if r0 < box[0] or r1 > box[1] or c0 < box[2] or c1 > box[3] or r1 <= r0 or c1 <= c0:
            continue  # outside the field
        rr = slice(int(round((r0 - box[0]) * sr)), int(round((r1 - box[0]) * sr)))
        cc = slice(int(round((c0 - box[2]) * sc)), int(round((c1 - box[2]) * sc)))
        out.append((name, float(target["bone"][rr, cc].mean()), float(frame[rr, cc].mean())))
    return out


def pcc(a: list[float], b: list[float]) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="the workflow's results folder")
    parser.add_argument("--cohort", default="resources/virtual_cohort", help="the simulated cohort (truth/)")
    args = parser.parse_args()
    results, cohort = Path(args.results), Path(args.cohort)
    pairs: dict[str, list[tuple[str, float, float]]] = {}
    left_out: dict[str, str] = {}
    for tdir in sorted((results / "targets").iterdir()):
        pid = tdir.name
        summary = json.loads((tdir / "targets.json").read_text())
        if summary.get("status") != "ok":
            left_out[pid] = summary.get("reason", "")
            continue
        for view, reason in summary.get("excluded", {}).items():
            left_out[f"{pid} {view}"] = reason
        method = json.loads((results / "segment" / pid / "segment.json").read_text()).get("method", "?")
        truth = json.loads((cohort / "truth" / f"{pid}.json").read_text())
        true_npz = np.load(cohort / "truth" / f"{pid}.npz")
        for view in summary["views"]:
            t = np.load(tdir / f"{view}.npz")
            pairs.setdefault(method, []).extend(roi_pairs(t, truth["views"][view], true_npz[f"bone_drr_{view}"]))
    everything = [p for v in pairs.values() for p in v]
    print(f"machine: {machine()}")
    print(f"targets of {len(list((results / 'targets').iterdir()))} patients in {results}")

    def line(label: str, rows: list[tuple[str, float, float]]) -> None:
        a, b = [r[1] for r in rows], [r[2] for r in rows]
        l1 = [r for r in rows if r[0] == "L1"]
        ratio = np.mean(np.array(a) / np.array(b)) if rows else float("nan")
        print(f"{label:>10}: PCC of ROI means {pcc(a, b):.4f} (n={len(rows)}); L1 {pcc([r[1] for r in l1], [r[2] for r in l1]):.4f} "
              f"(n={len(l1)}); mean ratio target/truth {ratio:.3f}")

    line("all", everything)
    for method, rows in sorted(pairs.items()):
        line(method, rows)
    print(f"left out: {len(left_out)}")
    for k, v in left_out.items():
        print(f"  {k}: {v[:160]}")


if __name__ == "__main__":
    main()
