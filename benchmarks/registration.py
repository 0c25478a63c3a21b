"""2D-3D registration and training targets on the virtual cohort, against its truth.

    python benchmarks/registration.py --cohort /tmp/vc40 [--patients 12] [--views pa,rot,tilt]
        [--naive 4] [--mismatched 4] [--threads 1] [--work /tmp/bmdpipe_bench_registration]

The cohort is a folder written by ``bmdpipe simulate`` (DICOM CT series,
DICOM radiographs, truth/). Each patient's files are ingested with
bmdpipe.io.ct / bmdpipe.io.xray (cached under ``--work``), then:

- every radiograph is registered to its CT with the config's settings
  (bmdpipe.register defaults): the mean projection distance (mPD: points of
  the target vertebrae T12–L3, projected with the estimated and the true
  pose, distance on the detector scaled to the isocentre plane), the 3-D
  mean target registration error with its depth component apart, the
  final similarity and whether the registration was flagged, seconds
  (the CT preparation shared by a patient's views is split among them) and
  DRR evaluations;
- a naive registration (one resolution, the whole image, CMA-ES from the
  same start, no grid search) on the first ``--naive`` radiographs, in the
  same run: its seconds, evaluations and mPD, and the time ratio;
- ``--mismatched`` radiographs registered to another patient's CT: how
  many are flagged;
- the targets through the pipeline (phantom calibration → the truth labels
  as the segmentation → the registered pose → projection,
  bmdpipe.targets): PCC of ROI means (the simulator's ROI boxes: L1 body,
  lungs, mediastinum, where inside the field) against the simulator's true
  bone projections (truth/{pid}.npz) brought to the same frame.

Prints the distributions and the machine (with the load average: the
machine is shared, timings under load are pessimistic).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, peak_rss_mb  # noqa: E402
from targets_pipeline import roi_pairs  # noqa: E402

from bmdpipe.calibrate import apply_calibration, calibrate  # noqa: E402
from bmdpipe.drr import Camera, Pose  # noqa: E402
from bmdpipe.io.ct import ingest_ct  # noqa: E402
from bmdpipe.io.xray import ingest_xray, load_xray  # noqa: E402
from bmdpipe.register import (  # noqa: E402
    Level,
    RegistrationSettings,
    initial_pose,
    mean_projection_distance,
    prepare_ct,
    register,
    target_registration_error,
)
from bmdpipe.segment import labels_from_map, read_label_table  # noqa: E402
from bmdpipe.simulate import truth_labels  # noqa: E402
from bmdpipe.targets import (  # noqa: E402
    TargetSettings,
    make_targets,
    vertebra_points,
)

TARGET_VERTEBRAE = ("T12", "L1", "L2", "L3")


def true_pose(truth: dict, view: str, isocenter: np.ndarray) -> Pose:
    """The simulator's camera of ``view`` as a pose about ``isocenter`` (RAS mm)."""
    from nanodrr.camera import invert_rt_inv

    m = torch.tensor(truth["views"][view]["geometry"]["camera_to_world_ras"], dtype=torch.float64)[None]
    rot, trans = invert_rt_inv(m, "PA", torch.as_tensor(isocenter, dtype=torch.float64))
    return Pose(tuple(rot[0].tolist()), tuple(trans[0].tolist()), "PA")


def ingest(cohort: Path, work: Path, pid: str, views: list[str]) -> None:
    """CT and radiographs of one patient through bmdpipe's ingestion (skipped when done before)."""
    ct_out = work / "ct" / pid / "ct.nii.gz"
    if not ct_out.exists():
        ingest_ct(cohort / "ct" / pid, ct_out, labels={"patient_id": pid})
    for v in views:
        out = work / "xray" / pid / f"{v}.nii.gz"
        if not out.exists():
            ingest_xray(cohort / "xray" / f"{pid}_{v}.dcm", out, labels={"patient_id": pid, "view": v})


def load_view(work: Path, pid: str, view: str) -> tuple[np.ndarray, dict]:
    image, _ = load_xray(work / "xray" / pid / f"{view}.nii.gz")
    summary = json.loads((work / "xray" / pid / f"{view}.json").read_text())
    return image, summary


def naive_settings(settings: RegistrationSettings, generations: int) -> RegistrationSettings:
    """One level at the radiograph's own resolution, the whole image, no grid search, same bounds and population;
    it runs all its generations (no early stop)."""
    first = settings.levels[0]
    return replace(
        settings,
        roi="full",
        search_shift_mm=0.0,
        patience=generations,
        levels=(Level(1.0, first.sigma_rot_deg, first.sigma_trans_mm, generations),),
    )


def pcc(a: list[float], b: list[float]) -> float:
    return float(np.corrcoef(np.asarray(a), np.asarray(b))[0, 1]) if len(a) > 2 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", default="/tmp/vc40", help="folder written by 'bmdpipe simulate'")
    parser.add_argument("--work", default="/tmp/bmdpipe_bench_registration", help="ingestion cache")
    parser.add_argument("--patients", type=int, default=12)
    parser.add_argument("--views", default="pa,rot,tilt")
    parser.add_argument("--naive", type=int, default=4, help="radiographs also registered the naive way")
    parser.add_argument("--naive-generations", type=int, default=30)
    parser.add_argument("--mismatched", type=int, default=4, help="radiographs registered to another patient's CT")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-targets", action="store_true", help="skip the target PCC")
    parser.add_argument("--config", help="config YAML whose 'register' and 'targets' blocks are used")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cohort, work = Path(args.cohort), Path(args.work)
    views = args.views.split(",")
    cfg = {}
    if args.config:
        import yaml

        cfg = yaml.safe_load(Path(args.config).read_text()) or {}
    settings = RegistrationSettings.from_config(cfg.get("register") or {})
    tsettings = TargetSettings.from_config(cfg.get("targets") or {})
    pids = sorted(p.stem for p in (cohort / "truth").glob("sim*.json"))[: args.patients]
    print(f"machine: {machine()}; torch threads {args.threads}; load average at start {os.getloadavg()[0]:.2f}")
    print(
        f"cohort {cohort}: {len(pids)} patients x {len(views)} views; similarity {settings.similarity}, roi {settings.roi}, "
        f"levels {[lv.detector_factor for lv in settings.levels]}, population {settings.population}"
    )
    label_table = read_label_table(cohort / "labels" / "structures.csv")

    rows, naive_rows, mism_rows, target_pairs = [], [], [], {"all": ([], []), "L1": ([], [])}
    labels_of: dict[str, sitk.Image] = {}
    loads = []
    for pid in pids:
        t0 = time.perf_counter()
        ingest(cohort, work, pid, views)
        t_ingest = time.perf_counter() - t0
        truth = json.loads((cohort / "truth" / f"{pid}.json").read_text())
        ct = sitk.ReadImage(str(work / "ct" / pid / "ct.nii.gz"))
        labels_truth = truth_labels(cohort, pid)
        bone_labels, _ = labels_from_map(labels_truth, label_table, ct, source=f"{pid} truth labels")
        labels_of[pid] = bone_labels
        t0 = time.perf_counter()
        prepared = prepare_ct(ct, settings, bone_labels)
        t_prep = time.perf_counter() - t0
        points = vertebra_points(bone_labels, TARGET_VERTEBRAE, step=20)
        iso = prepared.isocenter_ras_mm
        regs = {}
        for view in views:
            image, summary = load_view(work, pid, view)
            camera = Camera.from_xray_summary(summary)
            init = initial_pose(summary, settings, prepared)
            tp = true_pose(truth, view, iso)
            loads.append(os.getloadavg()[0])
            res = register(prepared, image, camera, init, settings)
            mpd = mean_projection_distance(points, camera, res.pose, tp, iso)
            tre = target_registration_error(
                points,
                np.array(res.camera_to_world_ras),
                np.array(truth["views"][view]["geometry"]["camera_to_world_ras"]),
            )
            row = {
                "pid": pid,
                "view": view,
                "reason": res.reason,
                "mpd0": mean_projection_distance(points, camera, init, tp, iso),
                "mpd": mpd,
                **tre,
                "depth_change_mm": float(np.linalg.norm(res.pose.translation_mm) - np.linalg.norm(init.translation_mm)),
                "similarity": res.similarity,
                "status": res.status,
                "evaluations": res.evaluations,
                "seconds": res.seconds + t_prep / len(views),
                "register_seconds": res.seconds,
            }
            rows.append(row)
            print(
                f"  {pid} {view:5s} mPD {row['mpd0']:5.1f} -> {mpd:5.2f} mm  mTRE {tre['mtre_mm']:5.1f} "
                f"(depth {tre['depth_mm']:5.1f}, in-plane {tre['inplane_mm']:4.2f}) sim {res.similarity:.3f} {res.status:6s} "
                f"{res.evaluations} DRRs {row['seconds']:5.1f} s (load {loads[-1]:.1f})",
                flush=True,
            )
            regs[view] = {
                "status": res.status,
                "reason": res.reason,
                "similarity": res.similarity,
                "pose": {
                    "rotation_deg": list(res.pose.rotation_deg),
                    "translation_mm": list(res.pose.translation_mm),
                    "orientation": res.pose.orientation,
                },
                "isocenter_ras_mm": res.isocenter_ras_mm,
                "camera_to_world_ras": res.camera_to_world_ras,
                "camera": {
                    "sdd_mm": camera.sdd_mm,
                    "pixel_spacing_mm": list(camera.pixel_spacing_mm),
                    "shape_rows_cols": list(camera.shape),
                },
            }
            if len(naive_rows) < args.naive:
                t0 = time.perf_counter()
                nres = register(prepared, image, camera, init, naive_settings(settings, args.naive_generations))
                naive_rows.append(
                    {
                        "mpd": mean_projection_distance(points, camera, nres.pose, tp, iso),
                        "seconds": time.perf_counter() - t0 + t_prep / len(views),
                        "evaluations": nres.evaluations,
                        "ours_seconds": row["seconds"],
                        "ours_evaluations": res.evaluations,
                    }
                )
                print(
                    f"    naive: mPD {naive_rows[-1]['mpd']:5.2f} mm, {nres.evaluations} DRRs, {naive_rows[-1]['seconds']:6.1f} s",
                    flush=True,
                )
        if not args.no_targets:
            cal = calibrate(ct, "phantom")
            density = apply_calibration(ct, cal)
            images = {v: load_view(work, pid, v)[0] for v in views}
            targets, excluded = make_targets(density, bone_labels, None, regs, images, tsettings)
            true_npz = np.load(cohort / "truth" / f"{pid}.npz")
            for view, t in targets.items():
                for name, a, b in roi_pairs(t, truth["views"][view], true_npz[f"bone_drr_{view}"]):
                    target_pairs["all"][0].append(a)
                    target_pairs["all"][1].append(b)
                    if name == "L1":
                        target_pairs["L1"][0].append(a)
                        target_pairs["L1"][1].append(b)
            if excluded:
                print(f"    targets left out: {excluded}")
        print(f"  {pid}: ingest {t_ingest:.1f} s, CT preparation {t_prep:.1f} s", flush=True)

    # mismatched pairs: radiograph of patient i+1 against the CT of patient i
    for k in range(min(args.mismatched, len(pids) - 1)):
        a, b = pids[k], pids[k + 1]
        ct = sitk.ReadImage(str(work / "ct" / a / "ct.nii.gz"))
        prepared = prepare_ct(ct, settings, labels_of[a])
        image, summary = load_view(work, b, views[k % len(views)])
        res = register(
            prepared, image, Camera.from_xray_summary(summary), initial_pose(summary, settings, prepared), settings
        )
        init = initial_pose(summary, settings, prepared)
        mism_rows.append(
            {
                "pair": f"CT {a} / radiograph {b} {views[k % len(views)]}",
                "similarity": res.similarity,
                "status": res.status,
                "reason": res.reason,
                "depth_change_mm": float(np.linalg.norm(res.pose.translation_mm) - np.linalg.norm(init.translation_mm)),
                "body_scale_ratio": json.loads((cohort / "truth" / f"{b}.json").read_text())["record"]["habitus"][
                    "body_scale"
                ]
                / json.loads((cohort / "truth" / f"{a}.json").read_text())["record"]["habitus"]["body_scale"],
            }
        )
        print(
            f"  mismatched {mism_rows[-1]['pair']}: sim {res.similarity:.3f} {res.status}, depth change "
            f"{mism_rows[-1]['depth_change_mm']:+.0f} mm, body-scale ratio {mism_rows[-1]['body_scale_ratio']:.3f} "
            f"{res.reason[:80]}",
            flush=True,
        )

    mpd = np.array([r["mpd"] for r in rows])
    flagged = np.array([r["status"] != "ok" for r in rows])
    bad = mpd > 1.0
    sims_ok = [r["similarity"] for r in rows if r["status"] == "ok"]
    print("\n== registration", f"({len(rows)} radiographs of {len(pids)} patients)")
    print(f"mPD start: median {np.median([r['mpd0'] for r in rows]):.1f} mm")
    print(
        f"mPD: median {np.median(mpd):.2f} mm, 95th percentile {np.percentile(mpd, 95):.2f} mm, max {mpd.max():.2f} mm, "
        f"fraction <= 1 mm {np.mean(mpd <= 1.0):.1%}"
    )
    print(
        f"flagged: {flagged.sum()}; mPD > 1 mm: {bad.sum()}, of them flagged {int((bad & flagged).sum())}, "
        f"unflagged {int((bad & ~flagged).sum())}; fraction <= 1 mm among unflagged {np.mean(mpd[~flagged] <= 1.0):.1%}"
    )
    for r in rows:
        if r["mpd"] > 1.0 or r["status"] != "ok":
            print(f"  {r['pid']} {r['view']}: mPD {r['mpd']:.2f} mm, similarity {r['similarity']:.3f}, {r['status']}")
    sims = np.array([r["similarity"] for r in rows])
    at_bound = np.array(["search bound" in r.get("reason", "") for r in rows])
    print("similarity bound → flagged, failures (> 1 mm) left unflagged, good ones flagged (other flags kept):")
    for bound in (0.68, 0.70, 0.72, 0.75, 0.78):
        fl = (sims < bound) | at_bound
        print(
            f"  {bound:.2f}: {fl.sum():2d} flagged, {int((bad & ~fl).sum())} unflagged failures, {int((~bad & fl).sum())} "
            f"good flagged; kept {np.mean(~fl):.1%}, of them <= 1 mm {np.mean(mpd[~fl] <= 1.0):.1%}"
        )
    for key, label in (
        ("mtre_mm", "3-D mTRE"),
        ("depth_mm", "  depth component |d|"),
        ("inplane_mm", "  in-plane component"),
    ):
        vals = np.array([r[key] for r in rows])
        print(
            f"{label}: median {np.median(vals):.2f} mm, mean {vals.mean():.2f} mm, 95th percentile {np.percentile(vals, 95):.2f} mm"
        )
    if sims_ok:
        print(
            f"final similarity of unflagged: min {min(sims_ok):.3f}, median {np.median(sims_ok):.3f} "
            f"(bound {settings.min_similarity})"
        )
    dchg = np.abs([r["depth_change_mm"] for r in rows])
    print(
        f"|depth change from the DICOM start|: median {np.median(dchg):.1f} mm, max {dchg.max():.1f} mm "
        f"(bound register.max_depth_mm {settings.max_depth_mm})"
    )
    secs = np.array([r["seconds"] for r in rows])
    evals = np.array([r["evaluations"] for r in rows])
    print(
        f"seconds per radiograph (incl. CT preparation share): median {np.median(secs):.1f}, mean {secs.mean():.1f}, "
        f"max {secs.max():.1f}; DRR evaluations median {np.median(evals):.0f}; load average during runs "
        f"median {np.median(loads):.1f}"
    )
    if naive_rows:
        ns = np.array([r["seconds"] for r in naive_rows])
        os_ = np.array([r["ours_seconds"] for r in naive_rows])
        print(
            f"naive single-resolution full-image CMA-ES on {len(naive_rows)} radiographs: median {np.median(ns):.1f} s, "
            f"{np.median([r['evaluations'] for r in naive_rows]):.0f} DRRs, mPD median "
            f"{np.median([r['mpd'] for r in naive_rows]):.2f} mm (max {max(r['mpd'] for r in naive_rows):.2f}); "
            f"ours on the same radiographs median {np.median(os_):.1f} s: time ratio naive/ours {np.median(ns / os_):.1f}"
        )
    if mism_rows:
        print(
            f"mismatched CT/radiograph pairs: {sum(r['status'] != 'ok' for r in mism_rows)} of {len(mism_rows)} flagged; "
            f"similarities {[round(r['similarity'], 3) for r in mism_rows]}"
        )
    if not args.no_targets:
        a, b = target_pairs["all"]
        la, lb = target_pairs["L1"]
        print("\n== targets (phantom calibration, truth labels as segmentation, registered pose)")
        print(
            f"PCC of ROI means vs the true bone projection: all ROIs {pcc(a, b):.4f} (n={len(a)}); "
            f"L1 only {pcc(la, lb):.4f} (n={len(la)}); L1 mean ratio target/truth {np.mean(np.array(la) / np.array(lb)):.3f}"
        )
    print(f"peak resident memory: {peak_rss_mb():.0f} MB; load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
