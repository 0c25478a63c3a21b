"""CT side on the virtual cohort: calibration (phantom, phantomless) and DXA-like aBMD against the simulator's truth.

    python benchmarks/ct_side.py --cohort /tmp/vc40            # an existing simulated cohort
    python benchmarks/ct_side.py --patients 30 --seed 7         # simulate one first (into a temp folder)
    python benchmarks/ct_side.py --cohort DIR --labels results/segment   # the segment stage's label maps
                                                          # (the patients that have one)

Per patient, the pipeline's own steps on the DICOM files: read the CT series
(ingest), phantom calibration (bmdpipe.calibrate.fit_phantom) and phantomless
calibration (calibrate_phantomless, default settings), then the ROI stage
(bmdpipe.roi.roi_ct on the phantom-calibrated density) with the supplied
truth label map (translated by bmdpipe.segment.labels_from_map, as the segment
stage does) or the label maps a segment run wrote (``--labels DIR``:
``DIR/{pid}/labels.nii.gz``). The truth is read only to score.

Prints:
- phantom slope error against the scanner's true slope b(E_s), %;
- L1 vBMD error before the marrow-fat term (the simulator's QCT ROI, its
  fat-free mean HU from truth/), phantom calibration, mg/cm³;
- phantomless: slope error, and its L1 vBMD minus the phantom's (same ROI), mg/cm³;
- per vertebra: PCC, bias and SD of the pipeline's aBMD against the true aBMD
  (phantom calibration; also phantomless), the area error, and the trabecular-core
  vBMD against the true vBMD (the ROI definitions differ, see the note printed);
- seconds per patient of each step (median) and the machine.
``--fit-reference`` also fits the phantomless tissue reference on the cohort's
phantom scans (bmdpipe.calibrate.fit_tissue_reference) and prints it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from bmdpipe.calibrate import (  # noqa: E402
    apply_calibration,
    calibrate_phantomless,
    fit_phantom,
    fit_tissue_reference,
)
from bmdpipe.io.ct import read_ct  # noqa: E402
from bmdpipe.roi import PatientFrame, RoiSpec, measure_spine, roi_ct  # noqa: E402
from bmdpipe.segment import labels_from_map, read_label_table  # noqa: E402
from bmdpipe.simulate import truth_labels as simulated_truth_labels  # noqa: E402


def truth_labels(root: Path, truth: dict, ct: sitk.Image) -> sitk.Image:
    """The patient's truth label map on its CT grid (bmdpipe scheme), as the segment stage would supply it."""
    out, _ = labels_from_map(simulated_truth_labels(root, truth["record"]["patient_id"]),
                             read_label_table(root / "labels" / "structures.csv"), ct)
    return out


def run(root: Path, labels_dir: Path | None, sites: tuple[str, ...], limit: int | None) -> list[dict]:
    rows = []
    truths = sorted((root / "truth").glob("sim*.json"))
    if labels_dir is not None:  # the patients a segment run labelled
        truths = [t for t in truths if (labels_dir / t.stem / "labels.nii.gz").exists()]
    truths = truths[:limit]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for truth_file in truths:
            truth = json.loads(truth_file.read_text())
            pid = truth_file.stem
            t = {}
            start = time.perf_counter()
            hu, _ = read_ct(root / "ct" / pid)
            t["read"] = time.perf_counter() - start
            start = time.perf_counter()
            phantom = fit_phantom(hu)
            t["phantom"] = time.perf_counter() - start
            start = time.perf_counter()
            internal = calibrate_phantomless(hu)
            t["phantomless"] = time.perf_counter() - start
            if labels_dir is None:
                lab = truth_labels(root, truth, hu)
            else:
                lab = sitk.ReadImage(str(labels_dir / pid / "labels.nii.gz"))
            sitk.WriteImage(apply_calibration(hu, phantom), str(work / "bmd.nii.gz"))
            sitk.WriteImage(lab, str(work / "labels.nii.gz"))
            start = time.perf_counter()
            summary = roi_ct(work / "bmd.nii.gz", work / "labels.nii.gz", work / pid, spec=RoiSpec(sites=sites))
            t["roi"] = time.perf_counter() - start
            # the same ROIs on the phantomless density
            frame = PatientFrame.of(hu)
            dens_internal = sitk.GetArrayFromImage(apply_calibration(hu, internal))
            per_internal, _ = measure_spine(dens_internal, sitk.GetArrayFromImage(lab), frame, RoiSpec(sites=sites))
            q = truth["qct"]
            hu_nofat = q["intercept_hu"] + q["slope_hu_per_mg_cm3"] * q["vbmd_l1_nofat_mg_cm3"]  # L1 ROI mean, no fat
            vbmd_phantom = (hu_nofat - phantom.intercept_hu) / phantom.slope_hu_per_mg_cm3
            vbmd_internal = (hu_nofat - internal.intercept_hu) / internal.slope_hu_per_mg_cm3
            verts = {}
            for v in sites:
                e, tv = summary["vertebrae"][v], truth["vertebrae"].get(v)
                if tv is None or e["status"] != "ok":
                    continue
                verts[v] = {"abmd": e["abmd_g_cm2"], "abmd_internal": per_internal[v]["abmd_g_cm2"],
                            "true": tv["abmd_true_g_cm2"], "area": e["area_cm2"], "area_true": tv["area_cm2"],
                            "vbmd_core": e["vbmd_core_mg_cm3"], "vbmd_true": tv["vbmd_true_mg_cm3"],
                            "truncated": e["truncated"]}
            rows.append({
                "pid": pid,
                "slope_err_pct": 100 * (phantom.slope_hu_per_mg_cm3 / q["slope_true_hu_per_mg_cm3"] - 1),
                "vbmd_err": vbmd_phantom - truth["vertebrae"]["L1"]["vbmd_true_mg_cm3"],
                "internal_slope_err_pct": 100 * (internal.slope_hu_per_mg_cm3 / q["slope_true_hu_per_mg_cm3"] - 1),
                "internal_vs_phantom": vbmd_internal - vbmd_phantom,
                "tissues": internal.reference_hu, "phantom_slope": phantom.slope_hu_per_mg_cm3,
                "vertebrae": verts, "seconds": t, "failed": {v: e["reason"] for v, e in summary["vertebrae"].items()
                                                             if e["status"] != "ok"},
            })
            print(f"{pid}: " + ", ".join(f"{v} {d['abmd']:.3f}/{d['true']:.3f}" for v, d in verts.items())
                  + f"; phantomless slope {rows[-1]['internal_slope_err_pct']:+.1f} %", flush=True)
    return rows


def report(rows: list[dict], sites: tuple[str, ...]) -> None:
    def stats(values, unit: str) -> str:
        v = np.asarray(values, dtype=np.float64)
        return f"mean {v.mean():+.2f} {unit}, SD {v.std(ddof=1):.2f}, max |.| {np.abs(v).max():.2f} (n = {v.size})"

    print(f"phantom slope error vs scanner truth:          {stats([r['slope_err_pct'] for r in rows], '%')}")
    print(f"phantom L1 vBMD error, before marrow fat:      {stats([r['vbmd_err'] for r in rows], 'mg/cm3')}")
    print(f"phantomless slope error vs scanner truth:      {stats([r['internal_slope_err_pct'] for r in rows], '%')}")
    print(f"phantomless L1 vBMD minus phantom L1 vBMD:     {stats([r['internal_vs_phantom'] for r in rows], 'mg/cm3')}")
    print("DXA-like aBMD vs the simulator's true aBMD (g/cm2), per vertebra:")
    for v in sites:
        d = [r["vertebrae"][v] for r in rows if v in r["vertebrae"]]
        if len(d) < 3:
            print(f"  {v}: measured in {len(d)} patients")
            continue
        true = np.array([x["true"] for x in d])
        cut = sum(x["truncated"] for x in d)
        line = f"  {v}: n {len(d)}{f' ({cut} cut by the scan range)' if cut else ''}"
        for key, name in (("abmd", "phantom"), ("abmd_internal", "phantomless")):
            est = np.array([x[key] for x in d])
            line += (f"; {name} PCC {np.corrcoef(est, true)[0, 1]:.4f}, bias {np.mean(est - true):+.4f}, "
                     f"SD {np.std(est - true, ddof=1):.4f}")
        area = np.array([x["area"] - x["area_true"] for x in d])
        line += f"; area error {area.mean():+.2f} ± {area.std(ddof=1):.2f} cm2"
        print(line)
    print("trabecular-core vBMD (the ROI stage's, phantom) vs true vBMD (mg/cm3) — the simulator defines its QCT ROI")
    print("  on the unscaled base anatomy, the stage in the patient's mm, so with body scale k != 1 they cover")
    print("  different shells of a vertebra whose density falls towards its centre:")
    for v in sites:
        d = [r["vertebrae"][v] for r in rows if v in r["vertebrae"]]
        if len(d) >= 3:
            est = np.array([x["vbmd_core"] for x in d])
            true = np.array([x["vbmd_true"] for x in d])
            print(f"  {v}: PCC {np.corrcoef(est, true)[0, 1]:.3f}, error {stats(est - true, 'mg/cm3')}")
    failed = sorted({f"{v}: {reason}" for r in rows for v, reason in r["failed"].items()})
    if failed:
        print("sites not measured: " + "; ".join(failed))
    for step in ("read", "phantom", "phantomless", "roi"):
        print(f"seconds per patient, {step}: {statistics.median(r['seconds'][step] for r in rows):.2f} (median)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", type=Path, help="an existing simulated cohort (ct/, truth/, labels/)")
    parser.add_argument("--patients", type=int, default=30, help="without --cohort: simulate this many")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--labels", type=Path, help="folder of {pid}/labels.nii.gz from a segment run; default truth")
    parser.add_argument("--sites", default="T12,L1,L2,L3")
    parser.add_argument("--limit", type=int, help="only the first N patients")
    parser.add_argument("--fit-reference", action="store_true", help="also fit the phantomless tissue reference")
    args = parser.parse_args()
    sites = tuple(args.sites.split(","))
    print(f"machine: {machine()}")
    if args.cohort is None:
        from bmdpipe.simulate import simulate_cohort

        with tempfile.TemporaryDirectory() as tmp:
            simulate_cohort(Path(tmp), {"n_patients": args.patients, "seed": args.seed})
            rows = run(Path(tmp), args.labels, sites, args.limit)
    else:
        rows = run(args.cohort, args.labels, sites, args.limit)
    print(f"cohort: {args.cohort or f'simulated, seed {args.seed}'}; labels: {args.labels or 'truth label maps'}")
    report(rows, sites)
    if args.fit_reference:
        fit = fit_tissue_reference([r["tissues"] for r in rows], [r["phantom_slope"] for r in rows])
        print(f"phantomless tissue reference fitted on these phantom scans: {json.dumps(fit)}")


if __name__ == "__main__":
    main()
