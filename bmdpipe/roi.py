"""Clinical ROI: the regions DXA measures, and DXA-like areal BMD from calibrated CT.

Spine (SIMULATOR.md §2.2, §3.1), for each vertebra among the DXA sites
(config ``roi.sites``; L1–L4 clinically, T12–L3 in the chest-CT virtual cohort):

- *DXA region*: the vertebra's label dilated by one voxel (the label is
  tighter than the blurred cortex; the dilation recovers the rim mineral),
  voxels already given to a more cranial site excluded;
- *vertebral body*: the largest component of {distance inside the label >
  5 mm}, grown back by 5.5 mm inside the label;
- *trabecular core* (QCT ROI): body ∩ {distance inside the label ≥ 3 mm};
- *ROI box*: the body's lateral × superior–inferior extent (DXA places its
  box between the disc spaces, endplate to endplate).

Areal BMD: the calibrated density (mg/cm³ HA) of the DXA region is projected
along the patient's AP axis into areal mass m (g/cm²); bone area A is the
pixels of the box with m above the DXA edge threshold (0.05 g/cm²); BMC is
the mass in them and aBMD = BMC/A. DXA's AP projection includes the
posterior elements, and so does this. The density is relative to water (the
calibration's 0 mg/cm³), unclipped: marrow and the soft tissue in the rim add
their small water-relative density, and voxel noise averages out instead of
being rectified.

Hip (seed 004: the proximal-femur region of Uemura et al. 2022, defined by
landmarks on the femoral head, neck and lesser trochanter), per femur found
in the label map: femoral-head centre and radius (sphere fit), neck axis,
shaft axis and lesser-trochanter apex are derived from the femur label; the
region is the femur label (dilated by one voxel) below the head–neck plane
(perpendicular to the neck axis, one head radius from the head centre) and
above a plane perpendicular to the shaft ``hip_distal_margin_mm`` distal to
the lesser trochanter apex.

Arrays are ``(z, y, x)`` as SimpleITK gives them; spacing is ``(x, y, z)``
mm as SimpleITK gives it unless a name says ``_zyx``.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from bmdpipe.errors import InputError
from bmdpipe.segment import BONE_LABELS, VERTEBRAE

#: Bump when a change to this stage changes its outputs (the rule re-runs).
STAGE_VERSION = "3"

#: Vertebral compartments, mm (SIMULATOR.md §2.2): body = largest component of {EDT > 5 mm} grown
#: back by 5.5 mm inside the label; trabecular QCT core = body ∩ {EDT ≥ 3 mm}.
BODY_CORE_MM = 5.0
BODY_REGROW_MM = 5.5
TRABECULAR_CORE_MM = 3.0
#: Endplate to endplate: the body spans the contiguous slices around its largest axial section whose
#: section is at least this fraction of that largest one, plus one tapering slice at each end. A label
#: that joins a posterior process to the body (a network's smooth labels fill the narrowing at the
#: pedicles) otherwise carries the body down past the endplate (benchmarks/ct_side.py).
BODY_MIN_SECTION = 0.3
#: Body to pedicles: walking from the body's anterior face towards the back, the body ends at the
#: first narrowing (the pedicles) whose coronal section is at most this fraction of the largest one
#: before it and of one behind it (the posterior arch). Crisp labels mostly keep the pedicles thinner
#: than twice the core depth, so the arch stays out of the body's core; a network's smoother labels
#: thicken them, and the arch then joined L2's body, which widened its box by 2.3 cm² over 30
#: held-out patients (benchmarks/ct_side.py --labels).
BODY_NECK_RATIO = 0.75
#: DXA bone-edge threshold on the areal mass, g/cm² (SIMULATOR.md §3.1: the result is insensitive to it
#: between 0.02 and 0.1 [measured]).
DXA_EDGE_G_CM2 = 0.05
#: Largest angle between an image axis and the patient axis it stands for (the AP projection runs
#: along an image axis; an oblique CT must be resampled first), degrees.
MAX_OBLIQUITY_DEG = 25.0


@dataclass(frozen=True)
class RoiSpec:
    """Settings of the ROI stage (config ``roi``).

    Attributes:
        sites: vertebrae DXA measures, e.g. ``("L1", "L2", "L3", "L4")``.
        dilation_voxels: dilation of each vertebra label (SIMULATOR.md §3.1: always dilate).
        body_core_mm, body_regrow_mm, trabecular_core_mm: compartments (SIMULATOR.md §2.2).
        body_min_section: the body's SI extent (:data:`BODY_MIN_SECTION`); 0 keeps every slice.
        body_neck_ratio: the body's posterior end at the pedicles (:data:`BODY_NECK_RATIO`); 0 never cuts.
        edge_g_cm2: DXA bone-edge threshold on the areal mass.
        min_sites: fewest measurable sites; fewer is a failure of the patient.
        hip: ``auto`` (the proximal femur of every femur labelled), ``off``, or ``required``.
        hip_distal_margin_mm: distal boundary of the hip region below the lesser-trochanter apex.
    """

    sites: tuple[str, ...] = ("L1", "L2", "L3", "L4")
    dilation_voxels: int = 1
    body_core_mm: float = BODY_CORE_MM
    body_regrow_mm: float = BODY_REGROW_MM
    trabecular_core_mm: float = TRABECULAR_CORE_MM
    body_min_section: float = BODY_MIN_SECTION
    body_neck_ratio: float = BODY_NECK_RATIO
    edge_g_cm2: float = DXA_EDGE_G_CM2
    min_sites: int = 1
    hip: str = "auto"
    hip_distal_margin_mm: float = 10.0

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "RoiSpec":
        cfg = dict(cfg)
        if "sites" in cfg:
            cfg["sites"] = tuple(str(v) for v in cfg["sites"])
        spec = cls(**cfg)
        unknown = [v for v in spec.sites if v not in VERTEBRAE]
        if unknown:
            raise InputError(f"roi.sites: {unknown} are not vertebra names ({VERTEBRAE[0]} … {VERTEBRAE[-1]})")
        if spec.hip not in ("auto", "off", "required"):
            raise InputError(f"roi.hip must be 'auto', 'off' or 'required', got {spec.hip!r}")
        return spec


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class PatientFrame:
    """How the array axes of a ``(z, y, x)`` volume map to the patient (LPS).

    Attributes:
        si, ap, lr: array axis (0, 1, 2) along superior–inferior, anterior–posterior, left–right.
        superior_up: True when a larger index along ``si`` is more superior.
        posterior_up: True when a larger index along ``ap`` is more posterior.
        spacing_zyx: voxel size along the array axes, mm.
    """

    si: int
    ap: int
    lr: int
    superior_up: bool
    posterior_up: bool
    spacing_zyx: tuple[float, float, float]

    @classmethod
    def of(cls, img: sitk.Image) -> "PatientFrame":
        """Frame of an image from its direction cosines.

        Raises:
            InputError: the image axes are more than :data:`MAX_OBLIQUITY_DEG` off the patient axes.
        """
        d = np.array(img.GetDirection(), dtype=np.float64).reshape(3, 3)  # columns: image axes i, j, k in LPS
        img_axis = [int(np.argmax(np.abs(d[row]))) for row in range(3)]  # LPS x, y, z → image axis
        cos_min = math.cos(math.radians(MAX_OBLIQUITY_DEG))
        if len(set(img_axis)) != 3 or min(abs(d[row, img_axis[row]]) for row in range(3)) < cos_min:
            raise InputError(f"the CT is oblique (direction {np.round(d, 3).tolist()}); the DXA projection needs "
                             f"image axes within {MAX_OBLIQUITY_DEG:g}° of the patient axes: resample it first")
        to_array = {0: 2, 1: 1, 2: 0}  # SimpleITK image axis → numpy axis
        sx, sy, sz = img.GetSpacing()
        return cls(si=to_array[img_axis[2]], ap=to_array[img_axis[1]], lr=to_array[img_axis[0]],
                   superior_up=bool(d[2, img_axis[2]] > 0), posterior_up=bool(d[1, img_axis[1]] > 0),
                   spacing_zyx=(float(sz), float(sy), float(sx)))

    def project_ap(self, volume: np.ndarray) -> np.ndarray:
        """Sum along AP, as a ``(si, lr)`` image (rows along the SI array axis, in array order)."""
        out = volume.sum(axis=self.ap)
        # the remaining axes keep their order; put SI first
        remaining = [a for a in range(3) if a != self.ap]
        return out if remaining[0] == self.si else out.T

    @property
    def ap_cm(self) -> float:
        return self.spacing_zyx[self.ap] / 10.0

    @property
    def pixel_cm2(self) -> float:
        """Area of one pixel of the AP projection, cm²."""
        return self.spacing_zyx[self.si] / 10.0 * self.spacing_zyx[self.lr] / 10.0


def _bbox(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Bounding box of a non-empty mask grown by ``margin`` voxels, clipped to the array."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def vertebral_body(mask: np.ndarray, frame: PatientFrame, spec: RoiSpec = RoiSpec()) -> tuple[np.ndarray, np.ndarray]:
    """Vertebral body of a vertebra label (SIMULATOR.md §2.2), cut to its endplates
    (``spec.body_min_section``) and at its pedicles (``spec.body_neck_ratio``).

    Args:
        mask: ``(z, y, x)`` bool, one vertebra's label, on ``frame``'s grid.
        frame: the CT's patient frame (voxel size, which axes are SI and AP).
        spec: the compartment settings (``body_core_mm``, ``body_regrow_mm``, the two cuts).

    Returns:
        ``(body, edt)``: the body (bool, same shape) and the distance inside the label (mm).
        The body is empty when no part of the label is thicker than ``2·body_core_mm``.
    """
    edt = ndimage.distance_transform_edt(mask, sampling=frame.spacing_zyx)
    core = edt > spec.body_core_mm
    lab, n = ndimage.label(core)
    if n == 0:
        return np.zeros_like(mask), edt
    sizes = ndimage.sum_labels(core, lab, index=np.arange(1, n + 1))
    core = lab == 1 + int(np.argmax(sizes))
    body = (ndimage.distance_transform_edt(~core, sampling=frame.spacing_zyx) <= spec.body_regrow_mm) & mask
    if spec.body_min_section > 0:
        body = _endplate_to_endplate(body, frame.si, spec.body_min_section)
    if spec.body_neck_ratio > 0:
        body = _cut_at_neck(body, frame.ap, frame.posterior_up, spec.body_neck_ratio)
    return body, edt


def _sections(mask: np.ndarray, axis: int) -> np.ndarray:
    """Voxel count of each slice of ``mask`` across ``axis``, ``(mask.shape[axis],)`` float64."""
    return mask.sum(axis=tuple(a for a in range(mask.ndim) if a != axis)).astype(np.float64)


def _cut_at_neck(body: np.ndarray, axis: int, posterior_up: bool, ratio: float) -> np.ndarray:
    """``body`` (not empty) cut at its first narrowing going back from its anterior face along ``axis`` (AP).

    The narrowing is the slice of least section behind the largest one so far, once it is ≤ ``ratio`` ×
    that largest and ≤ ``ratio`` × a section behind it. The body keeps the slices down to the first one
    whose section is half-way from the largest to the narrowing's (the pedicles' roots, wider than the
    body's posterior wall, lie in the slope below) and loses the rest."""
    area = _sections(body, axis)
    if not posterior_up:
        area = area[::-1]
    filled = np.flatnonzero(area)
    peak = low = int(filled[0])
    end = area.size
    for i in range(peak + 1, int(filled[-1]) + 1):
        if area[i] > area[peak]:
            peak = low = i
        elif area[i] < area[low]:
            low = i
        elif area[low] <= ratio * area[peak] and area[low] <= ratio * area[i]:
            # the pedicles' roots widen the slices down into the narrowing: stop half-way down
            half = 0.5 * (area[peak] + area[low])
            end = peak + int(np.argmax(area[peak:low + 1] <= half)) + 1
            break
    return _keep_along(body, axis, slice(0, end) if posterior_up else slice(area.size - end, area.size))


def _endplate_to_endplate(body: np.ndarray, si_axis: int, min_section: float) -> np.ndarray:
    """``body`` cut along ``si_axis`` to the contiguous run of slices around its largest section whose
    section is ≥ ``min_section`` × the largest, plus one (tapering) slice at each end."""
    area = _sections(body, si_axis)
    peak = int(np.argmax(area))
    keep = area >= min_section * area[peak]
    lo = hi = peak
    while lo > 0 and keep[lo - 1]:
        lo -= 1
    while hi < area.size - 1 and keep[hi + 1]:
        hi += 1
    lo, hi = max(lo - 1, 0), min(hi + 1, area.size - 1)
    return _keep_along(body, si_axis, slice(lo, hi + 1))


def _keep_along(mask: np.ndarray, axis: int, keep: slice) -> np.ndarray:
    """``mask`` with everything outside ``keep`` along ``axis`` cleared (a copy)."""
    index = [slice(None)] * mask.ndim
    index[axis] = keep
    out = np.zeros_like(mask)
    out[tuple(index)] = mask[tuple(index)]
    return out


# --------------------------------------------------------------------------- spine


@dataclass
class VertebraROI:
    """One DXA site on the CT grid.

    Attributes:
        name: e.g. ``"L1"``.
        region: ``(z, y, x)`` bool, the dilated vertebra (what DXA projects).
        body, core: ``(z, y, x)`` bool, vertebral body and its trabecular core (QCT ROI).
        box: ROI box in the AP projection, ``(si0, si1, lr0, lr1)`` array indices (half-open).
    """

    name: str
    region: np.ndarray
    body: np.ndarray
    core: np.ndarray
    box: tuple[int, int, int, int]


def spine_roi(labels: np.ndarray, frame: PatientFrame, spec: RoiSpec = RoiSpec()
              ) -> tuple[list[VertebraROI], dict[str, str]]:
    """The DXA regions of the sites present in a bmdpipe label map.

    Sites are processed cranial to caudal; a voxel of two dilated vertebrae
    belongs to the more cranial one.

    Args:
        labels: ``(z, y, x)`` label map in :data:`bmdpipe.segment.BONE_LABELS`.
        frame: the CT's patient frame (:meth:`PatientFrame.of`).

    Returns:
        ``(rois, problems)``: the measurable sites, and per site that is not
        measurable the reason (absent from the labels, no vertebral body).
    """
    order = sorted(spec.sites, key=VERTEBRAE.index)
    taken = np.zeros(labels.shape, bool)
    rois: list[VertebraROI] = []
    problems: dict[str, str] = {}
    margin = spec.dilation_voxels + 1
    for name in order:
        value = BONE_LABELS[f"vertebra_{name}"]
        mask_full = labels == value
        if not mask_full.any():
            problems[name] = f"vertebra {name} is not in the label map (empty ROI)"
            continue
        box = _bbox(mask_full, margin)
        mask = mask_full[box]
        region = ndimage.binary_dilation(mask, iterations=spec.dilation_voxels) if spec.dilation_voxels else mask
        region &= ~taken[box]
        body, edt = vertebral_body(mask, frame, spec)
        if not body.any():
            problems[name] = (f"vertebra {name}: no vertebral body thicker than {2 * spec.body_core_mm:g} mm in its "
                              f"label ({int(mask.sum())} voxels); is the label complete?")
            continue
        core = body & (edt >= spec.trabecular_core_mm)

        def full(part: np.ndarray) -> np.ndarray:
            out = np.zeros(labels.shape, bool)
            out[box] = part
            return out

        region_f, body_f, core_f = full(region), full(body), full(core)
        taken |= region_f
        proj_body = frame.project_ap(body_f)
        rows = np.flatnonzero(proj_body.any(axis=1))
        cols = np.flatnonzero(proj_body.any(axis=0))
        rois.append(VertebraROI(name, region_f, body_f, core_f,
                                (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)))
    return rois, problems


def areal_bmd(density_mg_cm3: np.ndarray, region: np.ndarray, frame: PatientFrame,
              box: tuple[int, int, int, int] | None = None, *, edge_g_cm2: float = DXA_EDGE_G_CM2
              ) -> dict[str, Any]:
    """DXA-like areal BMD of a region (SIMULATOR.md §3.1).

    Args:
        density_mg_cm3: ``(z, y, x)`` calibrated density, mg/cm³ HA.
        region: ``(z, y, x)`` bool, what is projected.
        frame: the CT's patient frame.
        box: ``(si0, si1, lr0, lr1)`` in the projection; None = the whole projection.

    Returns:
        ``area_cm2``, ``bmc_g``, ``abmd_g_cm2`` and ``areal_mass_g_cm2`` (the box's ``(si, lr)``
        float32 image). Area 0 (nothing above the edge) gives aBMD NaN.
    """
    # mg/cm³ × cm = mg/cm²; /1000 → g/cm²
    m = frame.project_ap(np.where(region, density_mg_cm3, np.float32(0)).astype(np.float64)) * (frame.ap_cm / 1000.0)
    if box is not None:
        m = m[box[0]:box[1], box[2]:box[3]]
    sel = m > edge_g_cm2
    area = float(sel.sum()) * frame.pixel_cm2
    bmc = float(m[sel].sum()) * frame.pixel_cm2
    return {"area_cm2": area, "bmc_g": bmc, "abmd_g_cm2": bmc / area if area > 0 else float("nan"),
            "areal_mass_g_cm2": m.astype(np.float32)}


def _touches_scan_end(region: np.ndarray, frame: PatientFrame) -> bool:
    """True when a region reaches the first or last slice along SI (the scan cuts it)."""
    other = tuple(a for a in range(3) if a != frame.si)
    along = region.any(axis=other)
    return bool(along[0] or along[-1])


def measure_spine(density_mg_cm3: np.ndarray, labels: np.ndarray, frame: PatientFrame, spec: RoiSpec = RoiSpec()
                  ) -> tuple[dict[str, dict[str, Any]], list[VertebraROI]]:
    """aBMD, BMC, area and trabecular vBMD of each DXA site.

    Args:
        density_mg_cm3: ``(z, y, x)`` calibrated density, mg/cm³ HA.
        labels: ``(z, y, x)`` bmdpipe label map on the same grid.

    Returns:
        ``(per_site, rois)``: per site in ``spec.sites`` a JSON-ready dict with
        ``status`` (``ok`` or ``failed`` + ``reason``), ``area_cm2``, ``bmc_g``,
        ``abmd_g_cm2``, ``vbmd_core_mg_cm3``, ``core_voxels``, ``truncated`` and the
        ROI ``box``; and the ROIs measured.
    """
    rois, problems = spine_roi(labels, frame, spec)
    out: dict[str, dict[str, Any]] = {}
    for roi in rois:
        a = areal_bmd(density_mg_cm3, roi.region, frame, roi.box, edge_g_cm2=spec.edge_g_cm2)
        entry: dict[str, Any] = {"status": "ok", "area_cm2": a["area_cm2"], "bmc_g": a["bmc_g"],
                                 "abmd_g_cm2": a["abmd_g_cm2"],
                                 "vbmd_core_mg_cm3": float(density_mg_cm3[roi.core].mean()) if roi.core.any() else None,
                                 "core_voxels": int(roi.core.sum()), "region_voxels": int(roi.region.sum()),
                                 "box_si_lr": list(roi.box), "truncated": _touches_scan_end(roi.body, frame)}
        if a["area_cm2"] == 0:
            entry.update(status="failed", abmd_g_cm2=None,
                         reason=f"vertebra {roi.name}: no pixel of the ROI box above the bone edge "
                         f"({spec.edge_g_cm2} g/cm²); is the density calibrated?")
        out[roi.name] = entry
    for name, reason in problems.items():
        out[name] = {"status": "failed", "reason": reason}
    return {v: out[v] for v in spec.sites}, rois


def total_abmd(per_site: dict[str, dict[str, Any]], *, include_truncated: bool = False) -> dict[str, Any]:
    """DXA's total over the measured sites: ΣBMC/ΣA (a vertebra cut by the scan is left out unless asked)."""
    used = [v for v, e in per_site.items() if e["status"] == "ok" and (include_truncated or not e.get("truncated"))]
    area = sum(per_site[v]["area_cm2"] for v in used)
    bmc = sum(per_site[v]["bmc_g"] for v in used)
    return {"sites": used, "area_cm2": area, "bmc_g": bmc, "abmd_g_cm2": bmc / area if area > 0 else None}


# --------------------------------------------------------------------------- hip


def _fit_sphere(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares sphere through ``(n, 3)`` points: (centre, radius)."""
    a = np.c_[2 * points, np.ones(len(points))]
    rhs = (points**2).sum(axis=1)
    sol, *_ = np.linalg.lstsq(a, rhs, rcond=None)
    centre = sol[:3]
    return centre, float(math.sqrt(max(sol[3] + centre @ centre, 0.0)))


def _fit_line(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Principal line of ``(n, 3)`` points: (point on it, unit direction)."""
    centre = points.mean(axis=0)
    _, _, vt = np.linalg.svd(points - centre, full_matrices=False)
    return centre, vt[0]


def femur_landmarks(mask: np.ndarray, spacing_zyx: Sequence[float], *, slab_mm: float = 2.0) -> dict[str, Any]:
    """Landmarks of a proximal femur from its label (seed 004's proximal-femur ROI, Uemura et al. 2022).

    Coordinates are mm along the array axes (index × spacing), ``(z, y, x)``.

    1. femoral head: the deepest point of the label (maximum distance to its
       surface) starts a sphere fit to the surface voxels around it, refitted
       on the inliers (|d − r| < 15 % r), which drops the neck;
    2. shaft axis: principal line of the cross-section centroids of the distal
       part of the label (below two head diameters from the head), oriented
       towards the head;
    3. neck axis: from the head centre through the centroid of the narrowest
       cross-section of the bone between 1 and 2.5 head radii along the
       direction of the label's shell at 1.2–1.6 head radii;
    4. lesser trochanter: the apex of the first bump of the medial profile
       (largest medial distance from the shaft axis per 2 mm slab) above
       ``shaft radius + max(4 mm, 25 %)``, going up the shaft from its distal end.

    Args:
        mask: ``(z, y, x)`` bool, one femur.
        spacing_zyx: voxel size, mm.

    Returns:
        ``head_centre_mm``, ``head_radius_mm``, ``neck_axis`` (unit, head → shaft),
        ``neck_centre_mm``, ``shaft_point_mm``, ``shaft_axis`` (unit, towards the head),
        ``shaft_radius_mm``, ``lesser_trochanter_mm``, ``neck_shaft_angle_deg``.

    Raises:
        InputError: no femoral head, no shaft below it, or no lesser trochanter found.
    """
    sp = np.asarray(spacing_zyx, dtype=np.float64)
    if mask.sum() < 100:
        raise InputError(f"femur label too small ({int(mask.sum())} voxels) for landmarks")
    edt = ndimage.distance_transform_edt(mask, sampling=sp)
    c0 = np.array(np.unravel_index(int(np.argmax(edt)), mask.shape), dtype=np.float64) * sp
    r0 = float(edt.max())
    surface = mask & ~ndimage.binary_erosion(mask)
    spts = np.argwhere(surface) * sp
    d = np.linalg.norm(spts - c0, axis=1)
    pts = spts[(d > 0.6 * r0) & (d < 1.6 * r0)]
    if len(pts) < 20:
        raise InputError("femur: no femoral head found (no round part at the deepest point of the label)")
    centre, radius = _fit_sphere(pts)
    for _ in range(4):
        dd = np.linalg.norm(spts - centre, axis=1)
        inl = spts[np.abs(dd - radius) < 0.15 * radius]
        if len(inl) < 20:
            break
        centre, radius = _fit_sphere(inl)

    allpts = np.argwhere(mask) * sp
    # neck direction: the bone in a shell just outside the head is the neck
    dist = np.linalg.norm(allpts - centre, axis=1)
    shell = allpts[(dist > 1.2 * radius) & (dist < 1.6 * radius)]
    if len(shell) == 0:
        raise InputError("femur: nothing attached to the femoral head (no neck)")
    n = shell.mean(axis=0) - centre
    n /= np.linalg.norm(n)
    # shaft: cross-section centroids of the part far from the head, along the principal axis
    far = allpts[dist > 4.0 * radius]
    if len(far) < 50:
        raise InputError(f"femur: the label ends within {4 * radius:.0f} mm of the femoral head; no shaft to measure "
                         "the lesser trochanter against (scan range too short?)")
    p0, u = _fit_line(far)
    if (centre - p0) @ u < 0:
        u = -u
    for _ in range(3):
        t = (far - p0) @ u
        bins = np.floor((t - t.min()) / slab_mm).astype(int)
        counts = np.bincount(bins)
        # whole cross-sections only: the ends of the far part are cut obliquely (by the sphere around the head)
        full = np.flatnonzero(counts >= 0.8 * np.median(counts[counts > 0]))[1:-1]
        if len(full) < 3:
            break
        cents = np.array([far[bins == b].mean(axis=0) for b in full])
        p0, u_new = _fit_line(cents)
        u = u_new if u_new @ u > 0 else -u_new
    # neck axis through the narrowest section between 1 and 2.5 radii
    s = (allpts - centre) @ n
    radial_n = np.linalg.norm((allpts - centre) - np.outer(s, n), axis=1)
    best = (np.inf, None)
    for s_k in np.arange(radius, 2.5 * radius, slab_mm / 2):
        sel = (np.abs(s - s_k) < slab_mm / 2) & (radial_n < 1.5 * radius)
        if sel.sum() >= 5 and sel.sum() < best[0]:
            best = (int(sel.sum()), allpts[sel].mean(axis=0))
    if best[1] is not None:
        n = best[1] - centre
        n /= np.linalg.norm(n)
    neck_centre = best[1] if best[1] is not None else centre + 1.5 * radius * n

    # lesser trochanter: medial profile along the shaft
    rel = allpts - p0
    t = rel @ u
    radial = rel - np.outer(t, u)
    medial = (centre - p0) - ((centre - p0) @ u) * u
    medial /= np.linalg.norm(medial)
    m = radial @ medial
    # below the neck: levels under the neck's lowest point in the shaft frame
    t_head = float((centre - p0) @ u)
    sel = (m > 0) & (t < t_head - radius)
    if not sel.any():
        raise InputError("femur: no bone below the femoral neck")
    tb = np.floor((t[sel] - t[sel].min()) / slab_mm).astype(int)
    prof = np.zeros(tb.max() + 1)
    np.maximum.at(prof, tb, np.linalg.norm(radial[sel], axis=1))
    # shaft radius: the distal third of the profile
    shaft_r = float(np.median(prof[: max(3, len(prof) // 3)]))
    thresh = shaft_r + max(4.0, 0.25 * shaft_r)
    above = np.flatnonzero(prof > thresh)
    if above.size == 0 or above[0] == 0:
        raise InputError(f"femur: no lesser trochanter found (medial profile never rises above {thresh:.1f} mm, or "
                         "the label starts inside it: scan range too short?)")
    start = int(above[0])
    stop = start + 1
    while stop < len(prof) and prof[stop] >= prof[stop - 1] - 0.5:  # climb to the apex of this bump
        stop += 1
    k = start + int(np.argmax(prof[start:stop]))
    in_slab = sel.copy()
    in_slab[sel] = tb == k
    radial_len = np.where(in_slab, np.linalg.norm(radial, axis=1), -1.0)
    lt = allpts[int(np.argmax(radial_len))]
    angle = math.degrees(math.acos(float(np.clip(n @ u, -1.0, 1.0))))  # neck (head → shaft) vs shaft (→ head)
    return {"head_centre_mm": centre.tolist(), "head_radius_mm": radius, "neck_axis": n.tolist(),
            "neck_centre_mm": np.asarray(neck_centre).tolist(), "shaft_point_mm": p0.tolist(),
            "shaft_axis": u.tolist(), "shaft_radius_mm": shaft_r, "lesser_trochanter_mm": lt.tolist(),
            "neck_shaft_angle_deg": angle}


def proximal_femur_roi(mask: np.ndarray, spacing_zyx: Sequence[float], *, distal_margin_mm: float = 10.0,
                       dilation_voxels: int = 1) -> tuple[np.ndarray, dict[str, Any]]:
    """The proximal-femur region (seed 004's PF region) of one femur label.

    The femur label, dilated by ``dilation_voxels``, between the head–neck plane
    (perpendicular to the neck axis, one head radius from the head centre: the
    head is left out, as in DXA's total hip) and the plane perpendicular to the
    shaft ``distal_margin_mm`` below the lesser-trochanter apex.

    Returns:
        ``(region (z, y, x) bool, landmarks)`` (:func:`femur_landmarks`).
    """
    lm = femur_landmarks(mask, spacing_zyx)
    sp = np.asarray(spacing_zyx, dtype=np.float64)
    region = ndimage.binary_dilation(mask, iterations=dilation_voxels) if dilation_voxels else mask.copy()
    idx = np.argwhere(region)
    pts = idx * sp
    c, n = np.array(lm["head_centre_mm"]), np.array(lm["neck_axis"])
    p0, u = np.array(lm["shaft_point_mm"]), np.array(lm["shaft_axis"])
    t_cut = (np.array(lm["lesser_trochanter_mm"]) - p0) @ u - distal_margin_mm
    keep = ((pts - c) @ n >= lm["head_radius_mm"]) & ((pts - p0) @ u >= t_cut)
    out = np.zeros(mask.shape, bool)
    out[tuple(idx[keep].T)] = True
    lm["distal_plane_t_mm"] = float(t_cut)
    return out, lm


def measure_hips(density_mg_cm3: np.ndarray | None, labels: np.ndarray, img: sitk.Image, frame: PatientFrame,
                 spec: RoiSpec = RoiSpec()) -> tuple[dict[str, dict[str, Any]], np.ndarray]:
    """Proximal-femur ROI and aBMD of each femur in the label map.

    Femurs are the connected components (≥ 20 ml) of the ``femur`` label; the
    side is anatomical: the head lies medial to the shaft (patient left = +x in LPS).

    Returns:
        ``(per_side, region)``: per side (``left``/``right``) a JSON-ready dict
        (status, area, BMC, aBMD, landmarks in LPS mm), and the union of the regions.
    """
    femur = labels == BONE_LABELS["femur"]
    region_all = np.zeros(labels.shape, bool)
    out: dict[str, dict[str, Any]] = {}
    if not femur.any():
        return out, region_all
    comp, n = ndimage.label(femur)
    voxel_ml = float(np.prod(frame.spacing_zyx)) / 1000.0
    sizes = ndimage.sum_labels(femur, comp, index=np.arange(1, n + 1)) * voxel_ml
    d = np.array(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    for k in np.flatnonzero(sizes >= 20.0):
        mask = comp == k + 1
        box = _bbox(mask, 2)
        offset = np.array([s.start for s in box], dtype=np.float64)
        try:
            region, lm = proximal_femur_roi(mask[box], frame.spacing_zyx, distal_margin_mm=spec.hip_distal_margin_mm,
                                            dilation_voxels=spec.dilation_voxels)
        except InputError as exc:
            side = f"femur{k + 1}"
            out[side] = {"status": "failed", "reason": str(exc)}
            continue

        def lps(p_mm: Sequence[float]) -> list[float]:
            ijk = (np.asarray(p_mm) / np.asarray(frame.spacing_zyx) + offset)[::-1]
            return [float(v) for v in img.TransformContinuousIndexToPhysicalPoint([float(v) for v in ijk])]

        def lps_dir(v_mm: Sequence[float]) -> list[float]:
            v = d @ np.asarray(v_mm, dtype=np.float64)[::-1]  # array mm (z, y, x) → image axes (x, y, z) → LPS
            return (v / np.linalg.norm(v)).tolist()

        head, p0, u = (np.array(lm[k]) for k in ("head_centre_mm", "shaft_point_mm", "shaft_axis"))
        medial_lps = lps_dir(head - (p0 + ((head - p0) @ u) * u))  # shaft axis → head, perpendicular to the shaft
        side = "left" if medial_lps[0] < 0 else "right"  # a left femur's head points to −x (patient right)
        full = np.zeros(labels.shape, bool)
        full[box] = region
        region_all |= full
        entry: dict[str, Any] = {"status": "ok", "region_voxels": int(full.sum()),
                                 "landmarks_lps_mm": {
                                     "head_centre": lps(lm["head_centre_mm"]), "neck_centre": lps(lm["neck_centre_mm"]),
                                     "lesser_trochanter": lps(lm["lesser_trochanter_mm"])},
                                 "head_radius_mm": lm["head_radius_mm"], "shaft_radius_mm": lm["shaft_radius_mm"],
                                 "neck_axis_lps": lps_dir(lm["neck_axis"]), "shaft_axis_lps": lps_dir(lm["shaft_axis"]),
                                 "neck_shaft_angle_deg": lm["neck_shaft_angle_deg"],
                                 "truncated": _touches_scan_end(full, frame)}
        if density_mg_cm3 is not None:
            a = areal_bmd(density_mg_cm3, full, frame, edge_g_cm2=spec.edge_g_cm2)
            entry.update(area_cm2=a["area_cm2"], bmc_g=a["bmc_g"], abmd_g_cm2=a["abmd_g_cm2"])
        out[side if side not in out else f"{side}{k + 1}"] = entry
    return out, region_all


# --------------------------------------------------------------------------- stage


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-4)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-2)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4))


def qc_figure(density_mg_cm3: np.ndarray, labels: np.ndarray, frame: PatientFrame, summary: dict[str, Any],
              path: str | os.PathLike[str]) -> None:
    """PNG for the report: AP projection of the bone's density with each site's ROI box and aBMD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from bmdpipe.io.atomic import atomic_path

    bone = ndimage.binary_dilation(labels > 0)
    proj = frame.project_ap(np.where(bone, density_mg_cm3, np.float32(0))) * (frame.ap_cm / 1000.0)
    rows = proj.shape[0]
    flip = frame.superior_up  # show superior at the top
    image = proj[::-1] if flip else proj
    aspect = frame.spacing_zyx[frame.si] / frame.spacing_zyx[frame.lr]
    fig, ax = plt.subplots(figsize=(5, 6))
    ax.imshow(image, cmap="gray", vmin=0, vmax=max(float(np.percentile(proj, 99.5)), 0.1), aspect=aspect)
    for name, entry in summary.get("vertebrae", {}).items():
        if entry.get("status") != "ok":
            continue
        r0, r1, c0, c1 = entry["box_si_lr"]
        if flip:
            r0, r1 = rows - r1, rows - r0
        colour = "orange" if entry.get("truncated") else "lime"
        ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False, color=colour, lw=1))
        ax.text(c1 + 1, (r0 + r1) / 2, f"{name} {entry['abmd_g_cm2']:.3f}", color=colour, fontsize=7, va="center")
    if summary.get("hip_region") is not None:
        hip = frame.project_ap(summary["hip_region"]) > 0
        ax.contour(hip[::-1] if flip else hip, levels=[0.5], colors="cyan", linewidths=0.8)
    failed = [f"{k}: failed" for k, e in summary.get("vertebrae", {}).items() if e.get("status") != "ok"]
    ax.set_title("aBMD g/cm² (orange: cut by the scan)" + (f"\n{', '.join(failed)}" if failed else ""), fontsize=8)
    ax.set_axis_off()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def roi_ct(density_path: str | os.PathLike[str], labels_path: str | os.PathLike[str],
           out_dir: str | os.PathLike[str], *, spec: RoiSpec = RoiSpec(),
           tags: dict[str, Any] | None = None) -> dict[str, Any]:
    """The clinical ROI stage of one patient.

    Args:
        density_path: calibrated CT, mg/cm³ HA (``bmd.nii.gz`` of the calibrate stage).
        labels_path: bmdpipe label map on the same grid (``labels.nii.gz`` of the segment stage).
        out_dir: output folder.
        tags: extra summary fields (e.g. ``patient_id``).

    Outputs: ``roi.nii.gz`` (uint8 on the CT grid: each site's DXA region with its
    :data:`~bmdpipe.segment.BONE_LABELS` vertebra value, the proximal-femur regions
    with the ``femur`` value), ``core.nii.gz`` (the trabecular QCT cores, same
    values), ``abmd.json`` (per vertebra: status, area cm², BMC g, aBMD g/cm²,
    vBMD of the trabecular core mg/cm³, truncated; the total over the sites;
    per hip the same plus landmarks) and ``qc.png``.

    Raises:
        InputError: labels on another grid, or no site (and no hip) measurable:
            the message names each site and why.
    """
    from bmdpipe.io.atomic import atomic_path, write_json

    out = Path(out_dir)
    dens_img = sitk.ReadImage(str(density_path), sitk.sitkFloat32)
    lab_img = sitk.ReadImage(str(labels_path))
    if not _same_grid(dens_img, lab_img):
        raise InputError(f"{labels_path}: the label map is not on the CT grid of {density_path} "
                         f"(size {lab_img.GetSize()} vs {dens_img.GetSize()}, spacing {lab_img.GetSpacing()} vs "
                         f"{dens_img.GetSpacing()}); the segment stage writes labels on the CT grid")
    frame = PatientFrame.of(dens_img)
    density = sitk.GetArrayFromImage(dens_img)
    labels = sitk.GetArrayFromImage(lab_img).astype(np.uint8)
    per_site, rois = measure_spine(density, labels, frame, spec)
    hips: dict[str, dict[str, Any]] = {}
    hip_region = np.zeros(labels.shape, bool)
    if spec.hip != "off":
        hips, hip_region = measure_hips(density, labels, dens_img, frame, spec)
        if spec.hip == "required" and not any(h["status"] == "ok" for h in hips.values()):
            reasons = "; ".join(f"{k}: {h['reason']}" for k, h in hips.items()) or "no femur in the label map"
            raise InputError(f"hip ROI required (roi.hip) but none measurable: {reasons}")
    ok = [v for v, e in per_site.items() if e["status"] == "ok"]
    warnings = [f"vertebra {v} is cut by the scan range: its ROI box may be short" for v in ok
                if per_site[v].get("truncated")]
    if len(ok) < spec.min_sites and not any(h["status"] == "ok" for h in hips.values()):
        reasons = "; ".join(f"{v}: {e.get('reason', 'ok')}" for v, e in per_site.items())
        present = set(np.unique(labels).tolist()) - {0}
        hint = (" — the labels come from the threshold fallback, which cannot name vertebrae: supply label maps "
                "or use the U-Net" if present == {BONE_LABELS["bone"]} else "")
        raise InputError(f"fewer than {spec.min_sites} DXA site(s) measurable among {list(spec.sites)} "
                         f"({reasons}){hint}")

    roi_arr = np.zeros(labels.shape, np.uint8)
    core_arr = np.zeros(labels.shape, np.uint8)
    for roi in rois:
        value = BONE_LABELS[f"vertebra_{roi.name}"]
        roi_arr[roi.region] = value
        core_arr[roi.core] = value
    roi_arr[hip_region & (roi_arr == 0)] = BONE_LABELS["femur"]
    for name, arr in (("roi.nii.gz", roi_arr), ("core.nii.gz", core_arr)):
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(dens_img)
        with atomic_path(out / name) as tmp:
            sitk.WriteImage(img, str(tmp), useCompression=True)
    summary: dict[str, Any] = {"stage": "roi", "status": "ok", "code_version": STAGE_VERSION, **(tags or {}),
                               "sites": list(spec.sites), "vertebrae": per_site, "total": total_abmd(per_site),
                               "hips": hips, "edge_g_cm2": spec.edge_g_cm2, "warnings": warnings,
                               "spec": asdict(spec)}
    qc_figure(density, labels, frame, {**summary, "hip_region": hip_region if hip_region.any() else None},
              out / "qc.png")
    write_json(out / "abmd.json", summary)
    return summary
