"""Clinical ROI: DXA-like aBMD on analytic phantoms and simulated patients, hip landmarks on a synthetic femur."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from bmdpipe.errors import InputError
from bmdpipe.roi import (
    PatientFrame,
    RoiSpec,
    areal_bmd,
    measure_hips,
    measure_spine,
    proximal_femur_roi,
    roi_ct,
)
from bmdpipe.segment import BONE_LABELS


def image(arr: np.ndarray, spacing=(1.0, 1.0, 2.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetDirection([float(v) for v in direction])
    return img


def box_spine(shape=(60, 80, 80), spacing_zyx=(2.0, 1.0, 1.0), names=("L1", "L2"), density=150.0):
    """Box 'vertebrae' stacked along z (index grows superior), 30 × 30 mm in-plane, 20 mm tall, 4 mm discs;
    uniform density inside the labels, 0 elsewhere. Returns (density, labels, truth per name)."""
    dens = np.zeros(shape, np.float32)
    lab = np.zeros(shape, np.uint8)
    truth = {}
    z0 = 4
    for name in names:
        nz = int(20 / spacing_zyx[0])
        sl = (slice(z0, z0 + nz), slice(25, 55), slice(25, 55))
        lab[sl] = BONE_LABELS[f"vertebra_{name}"]
        dens[sl] = density
        truth[name] = {"abmd": density * 30 * spacing_zyx[1] / 10 / 1000,  # mg/cm³ × cm → g/cm²
                       "area": 20 * 30 / 100.0}
        z0 += nz + int(4 / spacing_zyx[0])
    return dens, lab, truth


def test_abmd_of_box_vertebrae_is_density_times_thickness():
    dens, lab, truth = box_spine()
    img = image(dens, spacing=(1.0, 1.0, 2.0))
    frame = PatientFrame.of(img)
    assert (frame.si, frame.ap, frame.lr) == (0, 1, 2) and frame.superior_up
    per_site, rois = measure_spine(dens, lab, frame, RoiSpec(sites=("L1", "L2", "L3")))
    for name in ("L1", "L2"):
        e = per_site[name]
        assert e["status"] == "ok" and not e["truncated"]
        # the box is the body: 30 mm lateral, 20 mm SI (the regrown core rounds the corners by < 1 voxel)
        r0, r1, c0, c1 = e["box_si_lr"]
        assert (r1 - r0) * 2.0 == pytest.approx(20.0, abs=2.0) and (c1 - c0) == pytest.approx(30, abs=1)
        assert e["abmd_g_cm2"] == pytest.approx(truth[name]["abmd"], rel=0.01)  # 0.45 g/cm²
        assert e["area_cm2"] == pytest.approx(truth[name]["area"], rel=0.1)
        assert e["bmc_g"] == pytest.approx(e["abmd_g_cm2"] * e["area_cm2"], rel=1e-6)
        assert e["vbmd_core_mg_cm3"] == pytest.approx(150.0)
    assert per_site["L3"] == {"status": "failed", "reason": "vertebra L3 is not in the label map (empty ROI)"}
    # the dilated regions do not overlap and keep the more cranial vertebra's voxels
    l1, l2 = (r.region for r in rois)
    assert not (l1 & l2).any()
    # doubling the density doubles aBMD; halving the AP thickness halves it
    assert areal_bmd(2 * dens, l1, frame, rois[0].box)["abmd_g_cm2"] == pytest.approx(2 * per_site["L1"]["abmd_g_cm2"])
    thin = dens.copy()
    thin[:, 40:] = 0
    assert areal_bmd(thin, l1, frame, rois[0].box)["abmd_g_cm2"] == pytest.approx(per_site["L1"]["abmd_g_cm2"] / 2,
                                                                                   rel=0.01)


def test_body_stops_at_the_endplate_when_a_process_hangs_below():
    """A segmentation network's smooth label can make a posterior process thick enough to join the body's
    core; the body (and so the DXA box) still ends at the inferior endplate, and the site is not cut."""
    dens, lab, truth = box_spine(names=("L1",))
    value = BONE_LABELS["vertebra_L1"]
    # a 16 × 16 mm process behind the body (AP 55-71), from the body's mid-height down 14 mm past
    # its inferior endplate (z 4-13 is the lower half of the 20 mm body; 2 mm slices)
    proc = (slice(0, 14), slice(55, 71), slice(32, 48))
    lab[proc] = value
    dens[proc] = 150.0
    frame = PatientFrame.of(image(dens, spacing=(1.0, 1.0, 2.0)))
    per_site, rois = measure_spine(dens, lab, frame, RoiSpec(sites=("L1",), body_min_section=0.0))
    assert per_site["L1"]["truncated"]  # the old behaviour: the body runs down the process to the scan end
    per_site, rois = measure_spine(dens, lab, frame, RoiSpec(sites=("L1",)))
    e = per_site["L1"]
    assert e["status"] == "ok" and not e["truncated"]
    r0, r1, c0, c1 = e["box_si_lr"]
    # the body is rows 4-13; the rule keeps one tapering slice past each end (here the process's)
    assert r0 in (3, 4) and r1 == 14 and (c1 - c0) == pytest.approx(30, abs=1)
    assert e["area_cm2"] == pytest.approx(truth["L1"]["area"], rel=0.1)


def test_body_ends_at_the_pedicles_when_they_join_the_arch_to_it():
    """Smooth labels thicken the pedicles until the posterior arch joins the body's core; the body, and
    so the DXA box, still ends at the pedicles instead of taking in the arch."""
    dens, lab, truth = box_spine(names=("L1",))
    value = BONE_LABELS["vertebra_L1"]
    # behind the body (AP 25-55, LPS: larger y is posterior): two 11 mm pedicles 16 mm tall (2 mm slices),
    # then an arch 40 mm wide, 14 mm deep, 14 mm tall; the pedicles are thicker than twice the 5 mm core
    for part in ((slice(5, 13), slice(55, 63), slice(25, 36)), (slice(5, 13), slice(55, 63), slice(44, 55)),
                 (slice(6, 13), slice(63, 77), slice(20, 60))):
        lab[part] = value
        dens[part] = 150.0
    frame = PatientFrame.of(image(dens, spacing=(1.0, 1.0, 2.0)))
    per_site, rois = measure_spine(dens, lab, frame, RoiSpec(sites=("L1",), body_neck_ratio=0.0))
    c0, c1 = per_site["L1"]["box_si_lr"][2:]
    assert c1 - c0 == pytest.approx(40, abs=1)  # the old behaviour: the arch's width
    assert rois[0].body[:, 63:].any()
    per_site, rois = measure_spine(dens, lab, frame, RoiSpec(sites=("L1",)))
    e = per_site["L1"]
    c0, c1 = e["box_si_lr"][2:]
    assert e["status"] == "ok" and (c1 - c0) == pytest.approx(30, abs=1)
    assert not rois[0].body[:, 63:].any()  # no arch; the body keeps its own 30 mm (AP 25-55)
    assert rois[0].body[:, 25:55].sum() >= 0.9 * (lab[:, 25:55] > 0).sum()  # corners rounded by the regrown core
    assert e["area_cm2"] == pytest.approx(truth["L1"]["area"], rel=0.1)
    # stored with AP reversed (a larger index is more anterior): the same body
    flip = image(dens[:, ::-1].copy(), spacing=(1.0, 1.0, 2.0), direction=(1, 0, 0, 0, -1, 0, 0, 0, 1))
    frame = PatientFrame.of(flip)
    assert not frame.posterior_up
    per_flip, _ = measure_spine(dens[:, ::-1].copy(), lab[:, ::-1].copy(), frame, RoiSpec(sites=("L1",)))
    assert per_flip["L1"]["box_si_lr"] == e["box_si_lr"]
    assert per_flip["L1"]["abmd_g_cm2"] == pytest.approx(e["abmd_g_cm2"])


def test_projection_follows_the_patient_axes():
    """A volume stored with AP along the first array axis (direction cosines permuted) gives the same aBMD."""
    dens, lab, truth = box_spine(shape=(30, 80, 80), spacing_zyx=(1.0, 1.0, 1.0), names=("L1",))
    # store as (y, z, x): array axis 0 is AP. Image axes (i, j, k) = (x, z, y) in LPS.
    perm_d, perm_l = np.ascontiguousarray(dens.transpose(1, 0, 2)), np.ascontiguousarray(lab.transpose(1, 0, 2))
    img = image(perm_d, spacing=(1.0, 1.0, 1.0), direction=(1, 0, 0, 0, 0, 1, 0, 1, 0))
    frame = PatientFrame.of(img)
    assert (frame.si, frame.ap, frame.lr) == (1, 0, 2)
    per_site, _ = measure_spine(perm_d, perm_l, frame, RoiSpec(sites=("L1",)))
    assert per_site["L1"]["abmd_g_cm2"] == pytest.approx(truth["L1"]["abmd"], rel=0.01)
    c, s = math.cos(math.radians(40)), math.sin(math.radians(40))
    with pytest.raises(InputError, match="oblique"):
        PatientFrame.of(image(dens, direction=(c, -s, 0, s, c, 0, 0, 0, 1)))


def test_roi_stage_outputs_and_bad_input(tmp_path, capsys):
    from bmdpipe.cli import main as cli

    dens, lab, truth = box_spine()
    sitk.WriteImage(image(dens), str(tmp_path / "bmd.nii.gz"))
    sitk.WriteImage(image(lab), str(tmp_path / "labels.nii.gz"))
    args = [str(tmp_path / "bmd.nii.gz"), str(tmp_path / "labels.nii.gz")]
    assert cli(["roi", *args, "--out", str(tmp_path / "roi")]) == 0
    summary = json.loads((tmp_path / "roi" / "abmd.json").read_text())
    assert summary["status"] == "ok" and summary["stage"] == "roi"
    assert summary["vertebrae"]["L1"]["abmd_g_cm2"] == pytest.approx(truth["L1"]["abmd"], rel=0.01)
    assert [summary["vertebrae"][v]["status"] for v in ("L3", "L4")] == ["failed", "failed"]
    assert summary["total"]["sites"] == ["L1", "L2"]
    roi = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "roi" / "roi.nii.gz")))
    assert set(np.unique(roi)) == {0, BONE_LABELS["vertebra_L1"], BONE_LABELS["vertebra_L2"]}
    assert (tmp_path / "roi" / "qc.png").stat().st_size > 1000
    # no DXA site in the labels: a clear error naming each site
    with pytest.raises(InputError, match=r"fewer than 1 DXA site.*T12: vertebra T12 is not in the label map"):
        roi_ct(tmp_path / "bmd.nii.gz", tmp_path / "labels.nii.gz", tmp_path / "none", spec=RoiSpec(sites=("T12",)))
    # labels on another grid
    sitk.WriteImage(image(lab, spacing=(1.0, 1.0, 2.5)), str(tmp_path / "other.nii.gz"))
    assert cli(["roi", str(tmp_path / "bmd.nii.gz"), str(tmp_path / "other.nii.gz"), "--out", str(tmp_path / "x")]) == 2
    assert "not on the CT grid" in capsys.readouterr().err
    with pytest.raises(InputError, match="not vertebra names"):
        RoiSpec.from_config({"sites": ["L6"]})


# --------------------------------------------------------------------------- hip


def femur_phantom(spacing_zyx=(2.0, 1.2, 1.2), tilt_deg=8.0, side="left", neck_shaft_deg=130.0, anteversion_deg=12.0):
    """A proximal femur from primitives, in a patient (LPS) frame with the array axes (z, y, x) = (S, P, L).

    Local frame (mm): x medial → lateral, y posterior → anterior... of the bone; z distal → proximal.
    Shaft r 13 mm (z 0–115), greater trochanter (ellipsoid, lateral), neck r 14 mm from the shaft axis at
    z 100 at the neck–shaft angle with anteversion, head r 22 mm 55 mm along the neck, lesser trochanter
    (ellipsoid, posteromedial, centre at z 72). A right femur is the mirror image (lateral = patient right).

    Returns:
        ``(mask (z, y, x) bool, truth)``; truth positions in array mm ``(z, y, x)``.
    """
    a = math.radians(180.0 - neck_shaft_deg)
    av = math.radians(anteversion_deg)
    n = np.array([-math.sin(a) * math.cos(av), math.sin(a) * math.sin(av), math.cos(a)])
    junction, head_c, head_r = np.array([0.0, 0.0, 100.0]), None, 22.0
    head_c = junction + 55.0 * n
    lt_c, lt_ax = np.array([-13.0, -6.0, 72.0]), np.array([9.0, 9.0, 10.0])
    t = math.radians(tilt_deg)
    rot = np.array([[math.cos(t), 0, math.sin(t)], [0, 1, 0], [-math.sin(t), 0, math.cos(t)]])
    m = rot @ (np.diag([-1.0, 1.0, 1.0]) if side == "right" else np.eye(3))  # local → LPS-like world (x, y, z)
    sz, sy, sx = spacing_zyx
    shape = (int(200 / sz), int(110 / sy), int(170 / sx))
    origin = np.array([-85.0, -55.0, -20.0])
    zz, yy, xx = np.meshgrid(np.arange(shape[0], dtype=np.float32) * sz, np.arange(shape[1], dtype=np.float32) * sy,
                             np.arange(shape[2], dtype=np.float32) * sx, indexing="ij")
    loc = np.stack([xx + origin[0], yy + origin[1], zz + origin[2]], axis=-1) @ m.astype(np.float32)  # world → local
    x, y, z = loc[..., 0], loc[..., 1], loc[..., 2]
    rel = loc - junction
    s = rel @ n
    mask = ((np.hypot(x, y) <= 13.0) & (z >= 0) & (z <= 115)
            | (((x - 10) / 20) ** 2 + (y / 16) ** 2 + ((z - 112) / 26) ** 2 <= 1)
            | ((s >= 0) & (s <= 55) & (np.linalg.norm(rel - s[..., None] * n, axis=-1) <= 14.0))
            | (np.linalg.norm(loc - head_c, axis=-1) <= head_r)
            | ((((loc - lt_c) / lt_ax) ** 2).sum(-1) <= 1))
    lt_pts = loc[((((loc - lt_c) / lt_ax) ** 2).sum(-1) <= 1) & (np.hypot(x, y) > 13.0)]
    lt = lt_pts[np.argmax(np.hypot(lt_pts[:, 0], lt_pts[:, 1]))]

    def to_array_mm(p):
        w = m @ p - origin
        return w[::-1]

    truth = {"head": to_array_mm(head_c), "head_r": head_r, "neck": (m @ n)[::-1], "shaft": (m @ [0, 0, 1.0])[::-1],
             "lt": to_array_mm(lt), "lt_z_local": float(lt[2]), "z_local": z}
    return mask, truth


def _angle(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return math.degrees(math.acos(min(1.0, abs(a @ b) / np.linalg.norm(a) / np.linalg.norm(b))))


@pytest.mark.parametrize(("side", "tilt", "nsa"), [("left", 8.0, 130.0), ("right", -5.0, 125.0)])
def test_proximal_femur_landmarks_and_region(side, tilt, nsa):
    sp = (2.0, 1.2, 1.2)
    mask, truth = femur_phantom(sp, tilt_deg=tilt, side=side, neck_shaft_deg=nsa)
    region, lm = proximal_femur_roi(mask, sp, distal_margin_mm=10.0)
    assert np.linalg.norm(np.array(lm["head_centre_mm"]) - truth["head"]) < 1.5
    assert lm["head_radius_mm"] == pytest.approx(truth["head_r"], abs=1.0)
    assert _angle(lm["neck_axis"], truth["neck"]) < 3.0
    assert _angle(lm["shaft_axis"], truth["shaft"]) < 2.0
    assert lm["neck_shaft_angle_deg"] == pytest.approx(nsa, abs=3.0)
    assert np.linalg.norm(np.array(lm["lesser_trochanter_mm"]) - truth["lt"]) < 4.0
    # the region: no femoral head, the neck and both trochanters, down to 10 mm below the lesser trochanter
    pts = np.argwhere(region) * np.array(sp)
    assert not (np.linalg.norm(pts - truth["head"], axis=1) < 0.9 * truth["head_r"]).any()
    z = truth["z_local"][region]
    assert z.min() == pytest.approx(truth["lt_z_local"] - 10.0, abs=2.0)
    assert z.max() > 125  # greater trochanter top
    assert 0.3 < region[mask].mean() < 0.8 and region[~mask].sum() < 0.5 * region[mask].sum()  # + 1-voxel rim


def test_measure_hips_names_sides_and_fails_clearly():
    sp = (2.0, 1.2, 1.2)
    left, _ = femur_phantom(sp, side="left")
    right, _ = femur_phantom(sp, side="right", tilt_deg=-4.0)
    # patient left = +x (LPS): the left femur in the +x half of a wider volume
    both = np.concatenate([right, left], axis=2)
    labels = np.where(both, BONE_LABELS["femur"], 0).astype(np.uint8)
    img = image(labels, spacing=sp[::-1])
    frame = PatientFrame.of(img)
    density = np.where(both, np.float32(400.0), np.float32(0.0))
    hips, region = measure_hips(density, labels, img, frame)
    assert sorted(hips) == ["left", "right"]
    for h in hips.values():
        assert h["status"] == "ok" and h["abmd_g_cm2"] > 0.5 and h["area_cm2"] > 20
        assert h["neck_shaft_angle_deg"] == pytest.approx(130.0, abs=3.0)
    assert hips["left"]["landmarks_lps_mm"]["head_centre"][0] > hips["right"]["landmarks_lps_mm"]["head_centre"][0]
    # a femur cut just below the neck has no shaft to find the lesser trochanter on
    short = labels.copy()
    short[: int(95 / sp[0])] = 0
    hips, _ = measure_hips(density, short, img, frame)
    assert all(h["status"] == "failed" for h in hips.values())
    assert all("scan range too short" in h["reason"] or "no lesser trochanter" in h["reason"] for h in hips.values())


# --------------------------------------------------------------------------- simulated patients


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Path:
    import torch

    from bmdpipe.simulate import simulate_cohort

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("roi_cohort")
    simulate_cohort(out, {"n_patients": 6, "seed": 23, "views": ["pa"]})
    return out


def _truth_labels(root: Path, truth: dict, ct: sitk.Image) -> sitk.Image:
    """The patient's truth label map on its CT grid, translated to bmdpipe labels as the segment stage does."""
    from bmdpipe.segment import labels_from_map, read_label_table
    from bmdpipe.simulate import truth_labels

    table = read_label_table(root / "labels" / "structures.csv")
    return labels_from_map(truth_labels(root, truth["record"]["patient_id"]), table, ct)[0]


def test_abmd_from_calibrated_ct_matches_simulator_truth(simulated):
    """DICOM CT → phantom calibration → ROI stage: aBMD of T12, L1, L2 against the simulator's true aBMD.

    (L3 is cut by the scan range in this base CT and is flagged; benchmarks/ct_side.py has the 40-patient figures.)
    """
    from bmdpipe.calibrate import apply_calibration, fit_phantom
    from bmdpipe.io.ct import read_ct

    est, true = [], []
    for truth_file in sorted((simulated / "truth").glob("sim*.json")):
        truth = json.loads(truth_file.read_text())
        hu, _ = read_ct(simulated / "ct" / truth_file.stem)
        density = sitk.GetArrayFromImage(apply_calibration(hu, fit_phantom(hu)))
        labels = sitk.GetArrayFromImage(_truth_labels(simulated, truth, hu))
        per_site, _ = measure_spine(density, labels, PatientFrame.of(hu), RoiSpec(sites=("T12", "L1", "L2", "L3")))
        assert per_site["L3"]["truncated"] and not any(per_site[v]["truncated"] for v in ("T12", "L1", "L2"))
        for v in ("T12", "L1", "L2"):
            est.append(per_site[v]["abmd_g_cm2"])
            true.append(truth["vertebrae"][v]["abmd_true_g_cm2"])
    est, true = np.array(est), np.array(true)
    assert np.corrcoef(est, true)[0, 1] >= 0.98
    assert np.abs(est - true).max() < 0.06
    assert abs(np.mean(est - true)) < 0.03
