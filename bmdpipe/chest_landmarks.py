"""Seed 000's 16 chest landmarks from CT bone labels, and its 14 bone ROIs + the whole image on a radiograph.

Seed 000 (Wang et al., §III-B) detects 16 landmarks on a chest radiograph: 3 on each clavicle, 4 along
each side of the rib cage, one on C7 and one on T12, and crops 2, 2, 4, 4, 1, 1 regions from them (left
clavicle, right clavicle, left rib cage, right rib cage, cervical spine, T12) plus the whole image: 15
inputs. Its landmark detector learned from 1000 hand-labelled radiographs; here the labels come from the
CT instead: :func:`chest_landmarks` finds the 16 points in 3-D on the bone labels (bmdpipe's scheme,
:data:`bmdpipe.segment.BONE_LABELS`), and :func:`bmdpipe.drr.project_points` puts them on each radiograph
through its registered pose, so that a cohort with CT needs no manual landmarks.

Definitions (patient left/right from the spine's midline, superior = +z in RAS):

* clavicle, per side: the bone's principal axis; the mean of the voxels in slabs at 5 %, 50 % and 95 %
  of its length from the medial end (``medial``, ``middle``, ``lateral``);
* rib cage, per side: at 20, 40, 60 and 80 % of the ribs' height from the top, the mean of the rib voxels
  within 5 mm of the most lateral one (the rib cage's edge on a PA radiograph), ``1`` the most superior;
* ``C7``, ``T12``: the centroid of the vertebra.

A structure the labels lack gives NaN points (and is named in the summary), never a guess. No I/O here.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

#: The 16 landmarks in seed 000's order: clavicles, rib cages, C7, T12.
LANDMARKS: tuple[str, ...] = (
    *(f"clavicle_{side}_{p}" for side in ("left", "right") for p in ("medial", "middle", "lateral")),
    *(f"ribcage_{side}_{k}" for side in ("left", "right") for k in (1, 2, 3, 4)),
    "C7",
    "T12",
)
#: Seed 000's 14 local ROIs: name → the landmarks that place it (one ROI per entry).
ROIS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("clavicle_left_1", ("clavicle_left_medial", "clavicle_left_middle")),
    ("clavicle_left_2", ("clavicle_left_middle", "clavicle_left_lateral")),
    ("clavicle_right_1", ("clavicle_right_medial", "clavicle_right_middle")),
    ("clavicle_right_2", ("clavicle_right_middle", "clavicle_right_lateral")),
    *((f"ribcage_{side}_{k}", (f"ribcage_{side}_{k}",)) for side in ("left", "right") for k in (1, 2, 3, 4)),
    ("cervical", ("C7",)),
    ("T12", ("T12",)),
)
CLAVICLE_FRACTIONS = (0.05, 0.5, 0.95)
RIBCAGE_FRACTIONS = (0.2, 0.4, 0.6, 0.8)


def _ras(image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    """``(N, 3)`` RAS mm centres of the voxels where ``mask`` (z, y, x) is set."""
    from bmdpipe.register import _ras_points

    idx = np.argwhere(mask)
    return _ras_points(image, idx[:, ::-1]) if len(idx) else np.zeros((0, 3))


def _slab_mean(points: np.ndarray, coord: np.ndarray, centre: float, half_width: float) -> np.ndarray:
    near = np.abs(coord - centre) <= half_width
    return points[near].mean(axis=0) if near.any() else np.full(3, np.nan)


def chest_landmarks(labels: sitk.Image) -> tuple[np.ndarray, dict[str, Any]]:
    """The 16 landmarks of :data:`LANDMARKS` on a bone label map.

    Args:
        labels: bmdpipe bone labels (``clavicle``, ``rib``, ``vertebra_*``) on any grid.

    Returns:
        ``(points (16, 3) RAS mm, NaN where missing, summary)``; the summary holds the midline x (mm), the
        rib cage's top and bottom z (mm) and the structures that were missing.
    """
    from bmdpipe.segment import BONE_LABELS

    arr = sitk.GetArrayViewFromImage(labels)
    vertebrae = [v for k, v in BONE_LABELS.items() if k.startswith("vertebra_")]
    spine = _ras(labels, np.isin(arr, vertebrae))
    points = np.full((len(LANDMARKS), 3), np.nan)
    summary: dict[str, Any] = {"missing": []}
    if not len(spine):
        summary["missing"] = ["spine (no vertebra labelled: left and right are undefined)"]
        return points, summary
    midline = float(np.median(spine[:, 0]))
    summary["midline_x_mm"] = midline
    index = {name: i for i, name in enumerate(LANDMARKS)}
    clavicle, ribs = _ras(labels, arr == BONE_LABELS["clavicle"]), _ras(labels, arr == BONE_LABELS["rib"])
    for side, sign in (("left", -1.0), ("right", 1.0)):  # RAS: +x is the patient's right
        bone = clavicle[sign * (clavicle[:, 0] - midline) > 0]
        if len(bone) >= 10:
            centred = bone - bone.mean(axis=0)
            axis = np.linalg.svd(centred, full_matrices=False)[2][0]
            t = centred @ axis
            if abs(bone[np.argmin(t), 0] - midline) > abs(bone[np.argmax(t), 0] - midline):
                t = -t  # t grows from the medial end
            lo, hi = np.percentile(t, [1, 99])
            for name, f in zip(("medial", "middle", "lateral"), CLAVICLE_FRACTIONS):
                points[index[f"clavicle_{side}_{name}"]] = _slab_mean(bone, t, lo + f * (hi - lo), 0.05 * (hi - lo))
        else:
            summary["missing"].append(f"clavicle_{side}")
        cage = ribs[sign * (ribs[:, 0] - midline) > 0]
        if len(cage) >= 10:
            bottom, top = np.percentile(cage[:, 2], [1, 99])
            summary[f"ribcage_{side}_z_mm"] = [float(top), float(bottom)]
            half = max(3.0, 0.03 * (top - bottom))
            for k, f in enumerate(RIBCAGE_FRACTIONS, start=1):
                z = top - f * (top - bottom)
                slab = cage[np.abs(cage[:, 2] - z) <= half]
                if not len(slab):
                    continue
                edge = slab[np.argmax(sign * (slab[:, 0] - midline))]  # the most lateral voxel, and its
                near = slab[np.linalg.norm(slab - edge, axis=1) <= 5.0]  # neighbours on the same rib
                points[index[f"ribcage_{side}_{k}"]] = near.mean(axis=0)
        else:
            summary["missing"].append(f"ribcage_{side}")
    for name in ("C7", "T12"):
        voxels = _ras(labels, arr == BONE_LABELS[f"vertebra_{name}"])
        if len(voxels):
            points[index[name]] = voxels.mean(axis=0)
        else:
            summary["missing"].append(name)
    return points, summary


def roi_boxes(points_rows_cols: np.ndarray, image_shape: Sequence[int], *,
              size_fraction: float = 0.14) -> dict[str, tuple[int, int, int, int] | None]:
    """Seed 000's 14 square crops on a radiograph from its 16 landmarks (:data:`ROIS`).

    A ROI is centred on the mean of its landmarks; its side is ``size_fraction`` of the distance between
    the outermost rib-cage landmarks (the chest's width on this radiograph, so crops scale with the
    patient and the magnification), or of the image width when those are missing.

    Args:
        points_rows_cols: ``(16, 2)`` landmark ``(row, col)`` pixels, NaN where missing.
        image_shape: ``(rows, cols)``.

    Returns:
        ROI name → ``(r0, r1, c0, c1)`` (clipped to the image), None where a landmark is missing.
    """
    pts = np.asarray(points_rows_cols, dtype=np.float64)
    index = {name: i for i, name in enumerate(LANDMARKS)}
    cage = pts[[index[f"ribcage_{s}_{k}"] for s in ("left", "right") for k in (1, 2, 3, 4)], 1]
    width = np.nanmax(cage) - np.nanmin(cage) if np.isfinite(cage).sum() >= 2 else float(image_shape[1])
    side = max(8, int(round(size_fraction * width)))
    rows, cols = int(image_shape[0]), int(image_shape[1])
    out: dict[str, tuple[int, int, int, int] | None] = {}
    for name, marks in ROIS:
        centre = pts[[index[m] for m in marks]].mean(axis=0)
        if not np.isfinite(centre).all():
            out[name] = None
            continue
        r0 = int(np.clip(round(centre[0] - side / 2), 0, max(rows - side, 0)))
        c0 = int(np.clip(round(centre[1] - side / 2), 0, max(cols - side, 0)))
        out[name] = (r0, min(r0 + side, rows), c0, min(c0 + side, cols))
    return out
