"""2D-3D registration of a radiograph to its CT (seed 004 Fig. 3, after Otake et al. 2012).

Intensity-based: DRRs of the CT (:mod:`bmdpipe.drr`) are compared with the
radiograph by gradient correlation (Penney et al. 1998; or normalized
cross-correlation), and the six pose parameters are searched with CMA-ES
(the ``cmaes`` package), coarse to fine.

The steps:

1. :func:`prepare_ct` (once per CT, shared by its views): the patient's body
   is kept (the table and a calibration phantom under the patient are set to
   air: neither is in the radiograph), the volume is cropped to the body,
   and the region of interest of the similarity is placed: the target
   vertebrae when the bone labels are given (the region that matters for the
   training targets: a magnification or tilt error then barely moves them),
   else the spine column found by threshold. The poses rotate about its
   centre.
2. :func:`initial_pose`: the pose the DICOM geometry implies: the source
   ``DistanceSourceToPatient`` from the body centre, PA or AP from
   ``ViewPosition``.
3. :func:`register`: a coarse grid search of the in-plane shift on a small
   detector and a block-averaged CT, then CMA-ES at each finer level from
   the previous optimum and its search distribution, the similarity computed
   only on the detector rows/columns where the region of interest projects
   (rays outside are not rendered). Each CMA-ES generation is rendered as
   one batch of poses; a level stops early when its best similarity stops
   improving.

A registration whose final similarity is below ``min_similarity``, or whose
optimum lies on the search bound, is reported as failed; its pair must not
be used for training.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from cmaes import CMA

from bmdpipe.drr import (
    Camera,
    Pose,
    _rt_inv,
    project_points,
    render,
    render_slices,
    volume_from_sitk,
    world_ras_from_lps,
)
from bmdpipe.errors import InputError
from bmdpipe.similarity import gradient_correlation, ncc

log = logging.getLogger(__name__)

#: Bump when a change to this stage changes its outputs (the rule re-runs).
STAGE_VERSION = "2"

SIMILARITIES = {"gc": gradient_correlation, "ncc": ncc}
PARAMETER_NAMES = ("rot_z_deg", "rot_x_deg", "rot_y_deg", "shift_x_mm", "depth_mm", "shift_z_mm")


# --- settings and result ----------------------------------------------------------


@dataclass(frozen=True)
class Level:
    """One resolution level of the search.

    Attributes:
        detector_factor: detector coarsening factor (1 = the working detector: the
            radiograph's own pixels, or ``detector_pitch_mm`` when these are finer).
        sigma_rot_deg, sigma_trans_mm: CMA-ES initial step sizes of the
            rotations and the in-plane shifts; the depth (source distance) gets
            ``depth_scale`` × ``sigma_trans_mm``.
        generations: most CMA-ES generations at this level.
        roi_margin_mm: margin of the region of interest at this level (None:
            the settings' ``roi_margin_mm``); wide at coarse levels to catch
            the pose, tight at fine ones where it is least biased.
    """

    detector_factor: float
    sigma_rot_deg: float
    sigma_trans_mm: float
    generations: int
    roi_margin_mm: float | None = None


@dataclass(frozen=True)
class RegistrationSettings:
    """How to register (config ``register``).

    Attributes:
        similarity: ``"gc"`` (gradient correlation) or ``"ncc"``.
        roi: where the similarity is computed (rays elsewhere are not
            rendered): ``"vertebrae"``: the detector box where the
            ``roi_vertebrae`` project (needs the bone labels; without them,
            the spine column), plus ``roi_margin_mm``; ``"spine"``: the
            detector columns where the spine column (± ``roi_half_width_mm``,
            found in the CT by threshold) projects, plus ``roi_margin_mm``;
            ``"full"``: the whole radiograph. The poses rotate about the
            region's centre.
        roi_vertebrae: the target vertebrae of ``roi: vertebrae``.
        scan_end_margin_mm: the region of interest ends this far inside the
            CT's scanned range (past the scan's ends the radiograph shows
            anatomy the DRR lacks).
        levels: coarse to fine.
        population: CMA-ES population (poses rendered per batch).
        patience, tolerance: a level stops when its best similarity has not
            risen by ``tolerance`` in ``patience`` generations.
        carry_covariance: start each level's CMA-ES from the previous level's
            search distribution (its correlations, the spread widened ×2 and
            kept within 0.3–1 of the level's steps) instead of a round one.
        depth_scale: CMA-ES step of the depth (source distance) relative to
            the in-plane shift: the image is ~SID/extent times less
            sensitive to depth than to an in-plane shift.
        search_shift_mm: half-width of the coarse grid search of the in-plane
            shift (x and z), mm; 0 skips it.
        search_step_mm: step of that grid, mm.
        max_rot_deg, max_shift_mm, max_depth_mm: bounds of the pose change
            from the initial pose; an optimum on a bound is a failure. The
            depth bound also catches a CT and radiograph of different-sized
            patients, which the search can only match by magnification
            (benchmarks/registration.py: matched radiographs moved ≤ 41 mm).
        min_similarity: below this final similarity the registration fails.
        detector_pitch_mm: finest detector pixel the search uses, mm; a radiograph
            with finer pixels (a clinical CR: 0.1–0.2 mm) is area-averaged to it,
            which keeps the cost per radiograph that of the demo detector (2.4 mm)
            while the mean projection distance stays far below a pixel.
        renderer: ``"slices"``: :func:`bmdpipe.drr.render_slices` (one
            bilinear sample per CT slice along the ray; 2.5–6× faster on the
            CPU and closer to the exact integral); ``"nanodrr"``: nanodrr's
            ray marching (its fused kernel on CUDA) with ``ray_oversample``.
        ray_oversample: ray samples per smallest voxel size along the ray
            (1 = one sample per voxel; renderer nanodrr only).
        remove_outside_body: set everything outside the body (table, phantom) to air.
        default_object_detector_mm: used for the source-to-patient distance
            (SID = SDD − this) when the radiograph does not record
            DistanceSourceToPatient (0018,1111).
        seed: CMA-ES seed.
    """

    similarity: str = "gc"
    roi: str = "vertebrae"
    roi_vertebrae: tuple[str, ...] = ("T12", "L1", "L2", "L3")
    roi_half_width_mm: float = 60.0
    roi_margin_mm: float = 60.0
    scan_end_margin_mm: float = 15.0
    levels: tuple[Level, ...] = (
        Level(4.0, 2.0, 6.0, 25),
        Level(2.0, 1.0, 2.5, 25),
        Level(1.4, 0.6, 1.2, 20, roi_margin_mm=30.0),
        Level(1.0, 0.4, 0.8, 30, roi_margin_mm=15.0),
    )
    population: int = 12
    patience: int = 8
    tolerance: float = 1e-3
    carry_covariance: bool = True
    depth_scale: float = 2.0
    search_shift_mm: float = 40.0
    search_step_mm: float = 10.0
    max_rot_deg: float = 12.0
    max_shift_mm: float = 80.0
    max_depth_mm: float = 50.0
    min_similarity: float = 0.72
    detector_pitch_mm: float = 2.0
    renderer: str = "slices"
    ray_oversample: float = 1.0
    remove_outside_body: bool = True
    default_object_detector_mm: float = 150.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {sorted(SIMILARITIES)}, got {self.similarity!r}")
        if self.renderer not in ("slices", "nanodrr"):
            raise ValueError(f"renderer must be 'slices' or 'nanodrr', got {self.renderer!r}")
        if self.roi not in ("vertebrae", "spine", "full"):
            raise ValueError(f"roi must be 'vertebrae', 'spine' or 'full', got {self.roi!r}")
        if not self.levels:
            raise ValueError("at least one level is needed")

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "RegistrationSettings":
        cfg = dict(cfg)
        if "levels" in cfg:
            cfg["levels"] = tuple(Level(**lv) for lv in cfg["levels"])
        if "roi_vertebrae" in cfg:
            cfg["roi_vertebrae"] = tuple(cfg["roi_vertebrae"])
        return cls(**cfg)

    def bounds(self) -> np.ndarray:
        """``(6,)`` half-widths of the search box around the initial pose (deg, deg, deg, mm, mm, mm)."""
        return np.array([self.max_rot_deg] * 3 + [self.max_shift_mm, self.max_depth_mm, self.max_shift_mm])


@dataclass
class RegistrationResult:
    """Outcome of :func:`register`.

    Attributes:
        pose: the estimated pose (relative to ``isocenter_ras_mm``).
        isocenter_ras_mm: the centre the pose refers to (RAS world, mm).
        camera_to_world_ras: ``(4, 4)`` nanodrr camera-to-world matrix of the pose.
        similarity: final similarity at the finest level, in its region of interest.
        evaluations: DRRs rendered.
        seconds: wall time (excluding :func:`prepare_ct` when it was done before).
        status: ``"ok"`` or ``"failed"``; ``reason`` says why it failed.
        roi_rows_cols: ``[r0, r1, c0, c1]`` detector box of the finest level's similarity.
        history: per level: detector shape, best similarity, evaluations, generations.
        sharpness: mean drop of the final similarity for ±1 mm in-plane shifts
            (the weaker of the two directions).
    """

    pose: Pose
    isocenter_ras_mm: list[float]
    camera_to_world_ras: list[list[float]]
    similarity: float
    evaluations: int
    seconds: float
    status: str
    reason: str = ""
    roi_rows_cols: list[int] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    sharpness: float = float("nan")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["pose"] = asdict(self.pose)
        return out


# --- the CT -----------------------------------------------------------------------


@dataclass
class PreparedCT:
    """A CT made ready for registration by :func:`prepare_ct`.

    Attributes:
        image: HU, outside the body set to −1000 HU, cropped to the body (same world frame).
        isocenter_ras_mm: ``(3,)`` the centre of the poses (RAS world, mm): the
            centre of the region of interest (rotations about it barely move
            what the similarity sees, so rotation and shift are nearly
            independent for the optimizer), else the body centre.
        body_centre_ras_mm: ``(3,)`` the centre of the body's bounding box (RAS
            world, mm): where the DICOM source-to-patient distance is taken to end.
        roi_box_ras_mm: ``(2, 3)`` lower and upper corner of the region of
            interest (the target vertebrae or the spine column; RAS world,
            mm), or None: the whole radiograph.
        info: what was found (JSON-ready); ``roi`` says which region is used.
        scan_box_ras_mm: ``(2, 3)`` the scanned volume's box with its ends
            (along the slices) moved ``scan_end_margin_mm`` inwards; the region
            of interest stays inside its projection.
    """

    image: sitk.Image
    isocenter_ras_mm: np.ndarray
    body_centre_ras_mm: np.ndarray
    roi_box_ras_mm: np.ndarray | None
    info: dict[str, Any]
    scan_box_ras_mm: np.ndarray | None = None
    _subjects: dict[tuple[int, ...], Any] = field(default_factory=dict, repr=False)

    def subject(self, factors: tuple[int, ...], device: torch.device | str | None) -> Any:
        """nanodrr Subject of the CT block-averaged by ``factors`` (x, y, z), cached."""
        key = (*factors, str(device))
        if key not in self._subjects:
            image = self.image if all(f == 1 for f in factors) else sitk.BinShrink(self.image, list(factors))
            self._subjects[key] = volume_from_sitk(image, device=device, isocenter_mm=self.isocenter_ras_mm)
        return self._subjects[key]


def _ras_points(image: sitk.Image, ijk: np.ndarray) -> np.ndarray:
    """``(N, 3)`` continuous (x, y, z) indices → RAS world, mm."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    lps = (direction @ (np.asarray(ijk, dtype=np.float64) * np.array(image.GetSpacing())).T).T + np.array(
        image.GetOrigin()
    )
    return world_ras_from_lps(lps)


def _disk(radius_px: float) -> np.ndarray:
    """2-D disk structuring element of ``radius_px`` pixels (at least 1)."""
    r = max(1, int(round(radius_px)))
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    return (x**2 + y**2) <= r * r + 0.5


def prepare_ct(
    ct_hu: sitk.Image,
    settings: RegistrationSettings = RegistrationSettings(),
    labels: sitk.Image | None = None,
    *,
    bone_hu: float = 200.0,
) -> PreparedCT:
    """Body-only, body-cropped CT with its body centre and region of interest (see the module docstring).

    Args:
        ct_hu: CT in HU (any geometry).
        labels: bmdpipe bone labels on the CT grid (the segment stage), for ``roi: vertebrae``.
        bone_hu: HU above which a voxel counts as bone when locating the spine.

    Raises:
        InputError: the CT holds no body (nothing above −400 HU).
    """
    from scipy import ndimage

    img = sitk.Cast(ct_hu, sitk.sitkFloat32)
    hu = sitk.GetArrayFromImage(img)  # (z, y, x)
    info: dict[str, Any] = {}
    # the body on a 2× coarser in-plane grid (speed). In each slice: the region above −400 HU with its
    # holes (lungs, bowel gas) filled and opened with a 16 mm disk, which cuts off anything thinner than
    # 32 mm lying against the skin (a calibration-phantom slab, a table; in 3-D they touch the body
    # somewhere along the scan); its largest part is the body, plus the small pieces the opening shaved
    # off its outline (each under 10 cm²; the slab or table is one larger piece)
    coarse = hu[:, ::2, ::2]
    above = coarse > -400.0
    pitch = 2 * min(img.GetSpacing()[:2])
    big = _disk(16.0 / pitch)
    max_sliver = 1000.0 / pitch**2  # 10 cm², in coarse pixels
    body = np.zeros_like(above)
    for k in range(above.shape[0]):
        filled = ndimage.binary_fill_holes(above[k])
        lab, n = ndimage.label(ndimage.binary_opening(filled, structure=big))
        if not n:
            continue
        core = lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))
        rest, m = ndimage.label(filled & ~core)
        if m:
            sizes = np.bincount(rest.ravel())
            sizes[0] = 0
            core |= (sizes < max_sliver)[rest] & (rest > 0)
        body[k] = core
    if not body.any():
        raise InputError("the CT holds no body (no region thicker than 32 mm above -400 HU); is it a CT in HU?")
    # where the body presses on the slab a disk fits across the contact and a piece of the slab stays:
    # a phantom or table is the same in every slice, so what is outside the body in most slices (but
    # there in nearly all) is taken out of every slice
    fixed = (above.mean(axis=0) > 0.9) & (body.mean(axis=0) < 0.5)
    # grown by 6 mm so that the skin keeps the CT's own edge (outside it is air anyway)
    body = ndimage.binary_dilation(body, structure=_disk(6.0 / pitch)[None]) & ~fixed[None]
    full = np.repeat(np.repeat(body, 2, axis=1), 2, axis=2)[:, : hu.shape[1], : hu.shape[2]]
    if settings.remove_outside_body:
        hu = np.where(full, hu, -1000.0).astype(np.float32)
    info["body_fraction"] = float(full.mean())
    zz, yy, xx = np.nonzero(full)
    lo = np.array([xx.min(), yy.min(), zz.min()])
    hi = np.array([xx.max(), yy.max(), zz.max()]) + 1
    lo = np.maximum(lo - 2, 0)
    hi = np.minimum(hi + 2, np.array(img.GetSize()))
    cropped = sitk.GetImageFromArray(np.ascontiguousarray(hu[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]]))
    cropped.SetSpacing(img.GetSpacing())
    cropped.SetDirection(img.GetDirection())
    cropped.SetOrigin(img.TransformIndexToPhysicalPoint([int(v) for v in lo]))
    # the patient's mid-thickness, where the source-to-patient distance is taken to end: per slice the
    # centre of the body's extent along each in-plane axis, the median over slices (robust to a few
    # slices with arms or shoulders), and the middle of the scan along the slices
    per_slice = [
        ((np.flatnonzero(b.any(axis=0))[[0, -1]].mean()), np.flatnonzero(b.any(axis=1))[[0, -1]].mean())
        for b in full
        if b.any()
    ]
    centre_ijk = np.array(
        [np.median([p[0] for p in per_slice]), np.median([p[1] for p in per_slice]), (zz.min() + zz.max()) / 2.0]
    )
    iso = _ras_points(img, centre_ijk[None])[0]
    info["body_centre_ras_mm"] = [float(v) for v in iso]
    info["cropped_shape_xyz"] = [int(v) for v in cropped.GetSize()]

    # the spine column: bone near the body's left-right centre, in its posterior half
    bz, by, bx = np.nonzero((hu > bone_hu) & full)
    spine_box, spine_centre = None, iso
    if len(bx):
        ras = _ras_points(img, np.stack([bx, by, bz], axis=1)[:: max(1, len(bx) // 200000)])
        band = (np.abs(ras[:, 0] - iso[0]) < 60.0) & (ras[:, 1] < iso[1])
        if band.sum() >= 100:
            sx = float(np.median(ras[band, 0]))
            spine_centre = np.array([sx, float(np.median(ras[band, 1])), float(np.median(ras[band, 2]))])
            corners = _ras_points(img, np.array([[lo[0], lo[1], lo[2]], [hi[0] - 1, hi[1] - 1, hi[2] - 1]]))
            box_lo, box_hi = corners.min(axis=0), corners.max(axis=0)
            box_lo[0], box_hi[0] = sx - settings.roi_half_width_mm, sx + settings.roi_half_width_mm
            spine_box = np.stack([box_lo, box_hi])
            info["spine_x_ras_mm"] = sx
    box, centre, info["roi"] = spine_box, spine_centre, "spine"
    if spine_box is None:
        box, centre, info["roi"] = None, iso, "full"
        info["warnings"] = ["no spine column found (too little bone near the midline): the whole radiograph is used"]
    if settings.roi == "vertebrae":
        found = _vertebrae_box(labels, settings.roi_vertebrae) if labels is not None else None
        if found is not None:
            box, info["roi"], info["roi_vertebrae_found"] = found[0], "vertebrae", found[1]
            centre = box.mean(axis=0)
        else:
            info.setdefault("warnings", []).append(
                f"none of the vertebrae {', '.join(settings.roi_vertebrae)} is labelled"
                + ("" if labels is not None else " (no segmentation given)")
                + f": the {info['roi']} region is used"
            )
    elif settings.roi == "full":
        box, centre, info["roi"] = None, iso, "full"
    for w in info.get("warnings", []):
        log.warning(w)
    info["isocenter_ras_mm"] = [float(v) for v in centre]
    inset = settings.scan_end_margin_mm / cropped.GetSpacing()[2]
    size = np.array(cropped.GetSize(), dtype=np.float64)
    scan = _ras_points(
        cropped, np.array([[-0.5, -0.5, inset - 0.5], [size[0] - 0.5, size[1] - 0.5, size[2] - 0.5 - inset]])
    )
    scan_box = np.stack([scan.min(axis=0), scan.max(axis=0)]) if size[2] > 2 * inset + 2 else None
    return PreparedCT(cropped, np.asarray(centre, dtype=np.float64), iso, box, info, scan_box)


def _vertebrae_box(labels: sitk.Image, names: Sequence[str]) -> tuple[np.ndarray, list[str]] | None:
    """RAS box ``(2, 3)`` of the labelled voxels of the named vertebrae (bmdpipe labels) and the names found."""
    from bmdpipe.segment import BONE_LABELS

    arr = sitk.GetArrayViewFromImage(labels)
    values = {n: BONE_LABELS[f"vertebra_{n}"] for n in names if f"vertebra_{n}" in BONE_LABELS}
    found = [n for n, v in values.items() if (arr == v).any()]
    if not found:
        return None
    idx = np.argwhere(np.isin(arr, [values[n] for n in found]))
    corners = np.array(
        [[x, y, z] for x, y, z in itertools.product(*zip(idx.min(axis=0)[::-1] - 0.5, idx.max(axis=0)[::-1] + 0.5))]
    )
    ras = _ras_points(labels, corners)
    return np.stack([ras.min(axis=0), ras.max(axis=0)]), found


def initial_pose(
    xray_summary: dict[str, Any],
    settings: RegistrationSettings = RegistrationSettings(),
    prepared: PreparedCT | None = None,
) -> Pose:
    """The pose the radiograph's DICOM geometry implies.

    The source sits ``DistanceSourceToPatient`` (0018,1111) from the body
    centre, else SDD − ``default_object_detector_mm``; ``ViewPosition``
    (0018,5101) AP puts it anterior, anything else posterior (PA); the
    central ray passes through the body centre. The pose is about the body
    centre, or about ``prepared.isocenter_ras_mm`` when ``prepared`` is given
    (the same camera, expressed for :func:`register`).

    Raises:
        InputError: no source-to-detector distance, or a source-to-patient
            distance that is not shorter than it.
    """
    sdd = xray_summary.get("sdd_mm")
    if not sdd or not sdd > 0:
        raise InputError(
            "the radiograph records no source-to-detector distance (DistanceSourceToDetector "
            "(0018,1110)); give it in the samples sheet column 'sdd_mm' or ingest.xray.default_sdd_mm"
        )
    acq = xray_summary.get("acquisition", {})
    sid = acq.get("DistanceSourceToPatient")
    if sid is None or not float(sid) > 0:
        sid = float(sdd) - settings.default_object_detector_mm
    sid = float(sid)
    if not 0 < sid < float(sdd):
        raise InputError(
            f"source-to-patient distance {sid:.0f} mm is not between 0 and the source-to-detector "
            f"distance {float(sdd):.0f} mm; the radiograph's geometry is unusable"
        )
    view = str(acq.get("ViewPosition", "PA")).upper()
    pose = Pose.nominal(sid, "AP" if view == "AP" else "PA")
    if prepared is None:
        return pose
    return reexpress(pose, prepared.body_centre_ras_mm, prepared.isocenter_ras_mm)


def reexpress(pose: Pose, isocenter_from: Sequence[float], isocenter_to: Sequence[float]) -> Pose:
    """The same camera as ``pose`` (about ``isocenter_from``), as a pose about ``isocenter_to`` (RAS mm)."""
    from nanodrr.camera import invert_rt_inv

    c2w = _rt_inv([pose], torch.as_tensor(np.asarray(isocenter_from), dtype=torch.float64))
    rot, trans = invert_rt_inv(c2w, pose.orientation, torch.as_tensor(np.asarray(isocenter_to), dtype=torch.float64))
    return Pose(tuple(float(v) for v in rot[0]), tuple(float(v) for v in trans[0]), pose.orientation)


# --- the search -------------------------------------------------------------------


def _resize(image: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(image, size=shape, mode="area") if image.shape[-2:] != shape else image


def _translation_basis(translation_mm: Sequence[float]) -> np.ndarray:
    """``(3, 3)`` columns: in-plane x, depth, in-plane z, for moving a source at ``translation_mm`` from the isocentre.

    Depth runs along the line from the isocentre to the source, so a depth
    change scales the image about where the isocentre (the region of
    interest) projects instead of moving it; the in-plane directions are the
    pose's x and z made orthogonal to it.
    """
    t = np.asarray(translation_mm, dtype=np.float64)
    depth = t / np.linalg.norm(t)
    ex = np.array([1.0, 0.0, 0.0]) - depth[0] * depth
    ex /= np.linalg.norm(ex)
    ez = np.cross(ex, depth)
    ez *= np.sign(ez[2]) or 1.0
    return np.stack([ex, depth, ez], axis=1)


def _apply(base: Pose, delta: np.ndarray, basis: np.ndarray | None = None) -> Pose:
    """``base`` moved by ``delta`` (rotations deg, then x, depth, z mm in ``basis``; default the pose's own axes)."""
    v = base.as_vector().copy()
    v[:3] += delta[:3]
    v[3:] += delta[3:] if basis is None else basis @ delta[3:]
    return Pose.from_vector(v, base.orientation)


def _volume_factors(image: sitk.Image, camera: Camera, sid_mm: float) -> tuple[int, int, int]:
    """Block-averaging factors so that voxels match the detector pitch at the isocentre."""
    iso_pitch = min(camera.pixel_spacing_mm) * sid_mm / camera.sdd_mm
    return tuple(max(1, int(iso_pitch // s)) for s in image.GetSpacing())


def _max_chord_mm(subject: Any, camera: Camera, pose: Pose) -> float:
    """Longest path of the camera's rays through the subject's voxel box, mm (ray-box slab test)."""
    src, pix = _rays(camera, pose, subject.isocenter)
    w2v = subject.world_to_voxel.double().cpu().numpy()
    s = w2v[:3, :3] @ src + w2v[:3, 3]
    p = (w2v[:3, :3] @ pix.reshape(-1, 3).T).T + w2v[:3, 3]
    d = p - s
    size = np.array(subject.image.shape[-3:][::-1], dtype=np.float64)
    inv = 1.0 / np.where(np.abs(d) < 1e-12, 1e-12, d)
    ta, tb = (-0.5 - s) * inv, (size - 0.5 - s) * inv
    t0 = np.clip(np.minimum(ta, tb).max(axis=1), 0, 1)
    t1 = np.clip(np.maximum(ta, tb).min(axis=1), 0, 1)
    length = np.linalg.norm(pix.reshape(-1, 3) - src, axis=1)
    return float(np.max(np.maximum(t1 - t0, 0) * length))


def _rays(camera: Camera, pose: Pose, isocenter: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    from bmdpipe.drr import rays

    return rays(camera, pose, isocenter.double().cpu().numpy())


def _n_samples(subject: Any, camera: Camera, pose: Pose, oversample: float) -> int:
    spacing = float(subject.voxel_to_world[:3, :3].norm(dim=0).min())
    return max(8, int(math.ceil(_max_chord_mm(subject, camera, pose) / spacing * oversample)))


def _roi_box(
    prepared: PreparedCT, camera: Camera, pose: Pose, settings: RegistrationSettings, margin_mm: float | None = None
) -> tuple[int, int, int, int]:
    """Detector ``[r0, r1, c0, c1]`` where the region of interest projects under ``pose``, padded; the whole detector without one."""
    h, w = camera.shape
    if prepared.roi_box_ras_mm is None or settings.roi == "full":
        return 0, h, 0, w
    lo, hi = prepared.roi_box_ras_mm
    corners = np.array([[x, y, z] for x, y, z in itertools.product(*zip(lo, hi))])
    rc = project_points(corners, camera, pose, prepared.isocenter_ras_mm)
    sid = float(np.linalg.norm(pose.translation_mm))
    margin_mm = settings.roi_margin_mm if margin_mm is None else margin_mm
    margin = margin_mm * camera.sdd_mm / sid / np.array(camera.pixel_spacing_mm)
    lo_rc, hi_rc = rc.min(axis=0) - margin, rc.max(axis=0) + margin
    if prepared.scan_box_ras_mm is not None:
        # only rays that cross the whole scanned range: past its ends (the slice planes) the radiograph
        # shows anatomy the CT lacks. Each end plane projects to a band of rows; keep the rows between them.
        (x0, y0, z0), (x1, y1, z1) = prepared.scan_box_ras_mm
        ends = [
            project_points(
                np.array([[x, y, z] for x in (x0, x1) for y in (y0, y1)]), camera, pose, prepared.isocenter_ras_mm
            )[:, 0]
            for z in (z0, z1)
        ]
        first, second = sorted(ends, key=np.mean)
        lo_rc[0], hi_rc[0] = max(lo_rc[0], first.max()), min(hi_rc[0], second.min())
    r0 = int(np.clip(np.floor(lo_rc[0]), 0, h - 1))
    r1 = int(np.clip(np.ceil(hi_rc[0]) + 1, r0 + 1, h))
    c0 = int(np.clip(np.floor(lo_rc[1]), 0, w - 1))
    c1 = int(np.clip(np.ceil(hi_rc[1]) + 1, c0 + 1, w))
    if r1 - r0 < 8 or c1 - c0 < 8:  # the spine projects (almost) off the detector: use everything
        return 0, h, 0, w
    return r0, r1, c0, c1


def register(
    ct: sitk.Image | PreparedCT,
    radiograph: np.ndarray,
    camera: Camera,
    init: Pose,
    settings: RegistrationSettings = RegistrationSettings(),
    *,
    device: torch.device | str | None = None,
) -> RegistrationResult:
    """Find the pose of ``radiograph`` relative to the CT.

    Args:
        ct: CT in HU (SimpleITK, any geometry), or one made ready by
            :func:`prepare_ct` (share it between the views of a patient).
        radiograph: ``(rows, cols)`` MONOCHROME2 image (bright = attenuating),
            the size of ``camera.shape``.
        camera: the radiograph's detector geometry.
        init: starting pose relative to the prepared CT's isocentre (the body
            centre), e.g. :func:`initial_pose`.
        settings: search settings.
        device: torch device (default CUDA when present).

    Returns:
        The result; ``status == "failed"`` when the final similarity is below
        ``settings.min_similarity`` or the optimum lies on the search bound.
    """
    start = time.perf_counter()
    if radiograph.shape != tuple(camera.shape):
        raise ValueError(f"radiograph shape {radiograph.shape} differs from the camera {camera.shape}")
    prepared = ct if isinstance(ct, PreparedCT) else prepare_ct(ct, settings)
    device = (
        torch.device(device)
        if device is not None
        else (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    )
    sim_fn = SIMILARITIES[settings.similarity]
    fixed_full = torch.as_tensor(np.ascontiguousarray(radiograph), dtype=torch.float32)[None, None]
    sid = float(np.linalg.norm(init.translation_mm))
    basis = _translation_basis(init.translation_mm)
    bounds = settings.bounds()
    best = np.zeros(6)
    evaluations = 0
    history: list[dict[str, Any]] = []
    best_sim = -math.inf
    roi_full: tuple[int, int, int, int] = (0, camera.shape[0], 0, camera.shape[1])
    base = max(1.0, settings.detector_pitch_mm / min(camera.pixel_spacing_mm))  # radiograph pixels per working pixel
    carried: np.ndarray | None = None

    def evaluate(subject: Any, cam: Camera, fixed: torch.Tensor, n: int, deltas: Sequence[np.ndarray]) -> np.ndarray:
        nonlocal evaluations
        poses = [_apply(init, np.clip(d, -bounds, bounds), basis) for d in deltas]
        with torch.no_grad():
            if settings.renderer == "slices":
                drr = render_slices(subject, cam, poses)
            else:
                drr = render(subject, cam, poses, n_samples=n)
            values = sim_fn(drr, fixed).double().cpu().numpy()
        evaluations += len(poses)
        return np.nan_to_num(values, nan=-1.0)

    def level_setup(
        factor: float, roi: bool, margin_mm: float | None = None
    ) -> tuple[Any, Camera, torch.Tensor, int, tuple[int, int, int, int]]:
        cam = camera.scaled(factor)
        fixed = _resize(fixed_full, cam.shape).to(device)
        box = (
            _roi_box(prepared, cam, _apply(init, best, basis), settings, margin_mm)
            if roi
            else (0, cam.shape[0], 0, cam.shape[1])
        )
        r0, r1, c0, c1 = box
        cam_roi = cam.crop((r0, r1), (c0, c1))
        subject = prepared.subject(_volume_factors(prepared.image, cam, sid), device)
        n = _n_samples(subject, cam_roi, _apply(init, best, basis), settings.ray_oversample)
        return subject, cam_roi, fixed[..., r0:r1, c0:c1].contiguous(), n, box

    if settings.search_shift_mm > 0:
        subject, cam, fixed, n, _ = level_setup(base * settings.levels[0].detector_factor * 2, roi=False)
        steps = np.arange(-settings.search_shift_mm, settings.search_shift_mm + 1e-6, settings.search_step_mm)
        grid = [np.array([0, 0, 0, dx, 0, dz], dtype=np.float64) for dx, dz in itertools.product(steps, steps)]
        values = np.concatenate([evaluate(subject, cam, fixed, n, grid[k : k + 64]) for k in range(0, len(grid), 64)])
        best = grid[int(np.argmax(values))].copy()
        best_sim = float(values.max())
        history.append(
            {"level": "grid", "shape": list(cam.shape), "best_similarity": best_sim, "evaluations": len(grid)}
        )

    for i, level in enumerate(settings.levels):
        subject, cam, fixed, n, box = level_setup(base * level.detector_factor, roi=True, margin_mm=level.roi_margin_mm)
        scale = np.array(
            [level.sigma_rot_deg] * 3
            + [level.sigma_trans_mm, level.sigma_trans_mm * settings.depth_scale, level.sigma_trans_mm]
        )
        lo, hi = (-bounds - best) / scale, (bounds - best) / scale
        cov = None
        if carried is not None and settings.carry_covariance:
            # the previous level's search distribution (physical units) in this level's units: its
            # correlations (how depth, tilt and shift trade off) and its spread, widened ×2, kept
            # between 0.3 and 1 of this level's step
            std = np.sqrt(np.diag(carried))
            corr = carried / np.outer(std, std)
            std = np.clip(2.0 * std / scale, 0.3, 1.0)
            cov = corr * np.outer(std, std)
        opt = CMA(
            mean=np.zeros(6),
            sigma=1.0,
            bounds=np.stack([np.minimum(lo, -1e-3), np.maximum(hi, 1e-3)], axis=1),
            population_size=settings.population,
            seed=settings.seed + i,
            cov=cov,
        )
        level_best, level_x = float(evaluate(subject, cam, fixed, n, [best])[0]), np.zeros(6)
        used, generations, last_gain = 1, 0, 0
        for g in range(level.generations):
            xs = [opt.ask() for _ in range(opt.population_size)]
            values = evaluate(subject, cam, fixed, n, [best + x * scale for x in xs])
            used += len(xs)
            generations += 1
            opt.tell([(x, -v) for x, v in zip(xs, values)])
            k = int(np.argmax(values))
            if values[k] > level_best + settings.tolerance:
                last_gain = g
            if values[k] > level_best:
                level_best, level_x = float(values[k]), xs[k]
            if g - last_gain >= settings.patience or opt.should_stop():
                break
        best = best + level_x * scale
        best_sim = level_best
        carried = (opt._sigma**2) * opt._C * np.outer(scale, scale)  # covariance of the search, physical units
        r0, r1, c0, c1 = box
        f = base * level.detector_factor
        roi_full = (
            int(r0 * f),
            int(min(camera.shape[0], round(r1 * f))),
            int(c0 * f),
            int(min(camera.shape[1], round(c1 * f))),
        )
        history.append(
            {
                "level": i,
                "shape": list(cam.shape),
                "roi_rows_cols": list(box),
                "ray_samples": n,
                "best_similarity": best_sim,
                "evaluations": used,
                "generations": generations,
            }
        )

    # how sharply the similarity peaks (recorded for QC): its mean drop for ±1 mm in-plane shifts, the
    # weaker of x and z; a flat peak means the region holds little structure
    probes = [best + np.array([0, 0, 0, dx, 0, dz], dtype=np.float64) for dx, dz in ((1, 0), (-1, 0), (0, 1), (0, -1))]
    drops = best_sim - evaluate(subject, cam, fixed, n, probes)
    sharpness = float(min(drops[:2].mean(), drops[2:].mean()))
    pose = _apply(init, best, basis)
    status, reason = "ok", ""
    at_bound = np.abs(best) >= 0.98 * bounds
    if at_bound.any():
        status = "failed"
        names = [f"{n} {v:+.1f}" for n, v, b in zip(PARAMETER_NAMES, best, at_bound) if b]
        reason = (
            f"the optimum lies on the search bound ({', '.join(names)} from the initial pose): the pose is outside "
            "the search range (register.max_rot_deg / max_shift_mm / max_depth_mm), the registration diverged, "
            "or the radiograph and the CT do not match"
        )
    elif best_sim < settings.min_similarity:
        status = "failed"
        reason = (
            f"final {settings.similarity} similarity {best_sim:.3f} is below the bound {settings.min_similarity} "
            "(register.min_similarity): the radiograph and the CT may not match (another patient or body part), "
            "the region of interest shows too little structure, or the pose lies outside the search range "
            "(register.max_rot_deg / max_shift_mm / max_depth_mm from the DICOM geometry)"
        )
    iso_t = torch.as_tensor(prepared.isocenter_ras_mm, dtype=torch.float64)
    c2w = _rt_inv([pose], iso_t)[0].numpy().tolist()
    return RegistrationResult(
        pose,
        [float(v) for v in prepared.isocenter_ras_mm],
        c2w,
        float(best_sim),
        evaluations,
        time.perf_counter() - start,
        status,
        reason,
        list(roi_full),
        history,
        sharpness,
    )


# --- errors against a known pose ---------------------------------------------------


def mean_projection_distance(
    points_ras_mm: np.ndarray, camera: Camera, estimated: Pose, true: Pose, isocenter_mm: Sequence[float]
) -> float:
    """Mean distance between the detector projections of 3-D points under two poses, mm at the points' depth.

    Each point's detector displacement is scaled by (its distance from the
    true source along the viewing axis) / SDD: the distance in the plane
    through the point parallel to the detector (for points at the isocentre,
    the isocentre plane). Independent of which isocentre the poses use.

    Args:
        points_ras_mm: ``(N, 3)`` points (e.g. on the target vertebrae), RAS mm.
        isocenter_mm: the centre both poses refer to (RAS mm).
    """
    a = project_points(points_ras_mm, camera, estimated, isocenter_mm)
    b = project_points(points_ras_mm, camera, true, isocenter_mm)
    pitch = np.array(camera.pixel_spacing_mm)
    c2w = _rt_inv([true], torch.as_tensor(np.asarray(isocenter_mm), dtype=torch.float64))[0].numpy()
    depth = (np.asarray(points_ras_mm, dtype=np.float64) - c2w[:3, 3]) @ (c2w[:3, :3] @ np.array([0.0, 0.0, 1.0]))
    return float((np.linalg.norm((a - b) * pitch, axis=1) * depth / camera.sdd_mm).mean())


def target_registration_error(
    points_ras_mm: np.ndarray, estimated_c2w: np.ndarray, true_c2w: np.ndarray
) -> dict[str, float]:
    """3-D error of the registration at points: where the estimated pose puts them vs where they are.

    A point ``p`` seen through the estimated camera sits at camera
    coordinates ``E⁻¹p``; the true camera puts those coordinates at
    ``T E⁻¹ p``. The error vector is split into its component along the
    true viewing direction (depth: a single view constrains it poorly) and
    the rest (in-plane).

    Args:
        points_ras_mm: ``(N, 3)``.
        estimated_c2w, true_c2w: ``(4, 4)`` camera-to-world matrices (RAS mm).

    Returns:
        ``mtre_mm`` (mean 3-D norm), ``depth_mm`` (mean |depth component|),
        ``inplane_mm`` (mean norm of the in-plane part).
    """
    e, t = np.asarray(estimated_c2w, dtype=np.float64), np.asarray(true_c2w, dtype=np.float64)
    m = t @ np.linalg.inv(e)
    p = np.asarray(points_ras_mm, dtype=np.float64)
    err = (m[:3, :3] @ p.T).T + m[:3, 3] - p
    view = t[:3, :3] @ np.array([0.0, 0.0, 1.0])  # camera +z: source → detector
    depth = err @ view
    inplane = err - depth[:, None] * view
    return {
        "mtre_mm": float(np.linalg.norm(err, axis=1).mean()),
        "depth_mm": float(np.abs(depth).mean()),
        "inplane_mm": float(np.linalg.norm(inplane, axis=1).mean()),
    }


# --- the workflow stage -------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text())


def register_patient(
    xray_dir: str | os.PathLike[str],
    ct_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    settings: RegistrationSettings = RegistrationSettings(),
    *,
    segment_dir: str | os.PathLike[str] | None = None,
    patient: str = "",
    on_error: str = "skip",
    device: torch.device | str | None = None,
) -> dict[str, dict[str, Any]]:
    """Register every ingested radiograph of a patient to the patient's CT; write one JSON per view and ``qc.png``.

    Args:
        xray_dir: ``results/xray/{patient}`` (``{view}.nii.gz`` + ``{view}.json``).
        ct_dir: ``results/ct/{patient}`` (``ct.nii.gz`` + ``ct.json``).
        out_dir: the folder to fill (``{view}.json``: pose, isocentre,
            camera-to-world matrix, similarity, evaluations, seconds, status and
            reason; ``qc.png``).
        segment_dir: ``results/segment/{patient}`` (``labels.nii.gz``) for
            ``roi: vertebrae``; when missing or failed the spine column is used
            (recorded in each view's ``ct.warnings``).
        on_error: ``"skip"``: bad input becomes a failed view summary;
            ``"fail"``: it raises.

    Returns:
        The summary of each view.
    """
    from bmdpipe import __version__
    from bmdpipe.io.atomic import write_json
    from bmdpipe.io.xray import load_xray
    from bmdpipe.workflow import PatientStage, upstream_failure

    xray_dir, ct_dir, out = Path(xray_dir), Path(ct_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    views = sorted(p.stem for p in xray_dir.glob("*.json"))
    if not views:
        raise InputError(f"{xray_dir}: no ingested radiograph (no {{view}}.json)")
    stage = PatientStage("register", patient, on_error)
    summaries: dict[str, dict[str, Any]] = {}
    prepared: list[PreparedCT] = []
    ct_failure: list[str] = []

    def prepare() -> None:
        upstream_failure(ct_dir / "ct.json")
        ct = sitk.ReadImage(str(ct_dir / "ct.nii.gz"))
        labels = None
        if segment_dir is not None and settings.roi == "vertebrae":
            path = Path(segment_dir) / "labels.nii.gz"
            if path.exists():
                labels = sitk.ReadImage(str(path))
                if labels.GetSize() != ct.GetSize():
                    log.warning("%s: not on the CT grid (%s vs %s); not used", path, labels.GetSize(), ct.GetSize())
                    labels = None
        prepared.append(prepare_ct(ct, settings, labels))

    try:
        prepare()
    except InputError as exc:
        if on_error == "fail":
            raise
        ct_failure.append(str(exc))

    for view in views:
        path = out / f"{view}.json"

        def run(view: str = view, path: Path = path) -> None:
            if ct_failure:
                raise InputError(f"the CT cannot be used: {ct_failure[0]}")
            upstream_failure(xray_dir / f"{view}.json")
            summary = _read_json(xray_dir / f"{view}.json")
            init = initial_pose(summary, settings, prepared[0])  # raises InputError on unusable geometry
            camera = Camera.from_xray_summary(summary)
            image, _ = load_xray(xray_dir / f"{view}.nii.gz")
            result = register(prepared[0], image, camera, init, settings, device=device)
            if result.status != "ok":
                log.warning("register %s %s: %s", patient, view, result.reason)
            record = {
                "stage": "register",
                "patient_id": patient,
                "view": view,
                "status": result.status,
                "reason": result.reason,
                "code_version": STAGE_VERSION,
                "bmdpipe_version": __version__,
                "similarity_measure": settings.similarity,
                "min_similarity": settings.min_similarity,
                "camera": {
                    "sdd_mm": camera.sdd_mm,
                    "pixel_spacing_mm": list(camera.pixel_spacing_mm),
                    "shape_rows_cols": list(camera.shape),
                },
                "initial_pose": asdict(init),
                "ct": prepared[0].info,
                **result.to_json(),
            }
            write_json(path, record)

        stage.attempt(run, path, view=view)
        summaries[view] = _read_json(path)
    if prepared:
        qc_figure(prepared[0], xray_dir, summaries, out / "qc.png", device=device)
    return summaries


def qc_figure(
    prepared: PreparedCT,
    xray_dir: Path,
    summaries: dict[str, dict[str, Any]],
    path: Path,
    *,
    device: torch.device | str | None = None,
) -> None:
    """PNG per patient: each radiograph with the edges of the DRR at the found pose (red) and the similarity ROI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bmdpipe.io.atomic import atomic_path
    from bmdpipe.io.xray import load_xray
    from bmdpipe.similarity import image_gradients

    views = list(summaries)
    fig, axes = plt.subplots(1, len(views), figsize=(3.6 * len(views), 3.8), squeeze=False)
    for ax, view in zip(axes[0], views):
        s = summaries[view]
        ax.set_axis_off()
        if not (xray_dir / f"{view}.nii.gz").exists():
            ax.set_title(f"{view}: no radiograph", fontsize=8)
            continue
        image, _ = load_xray(xray_dir / f"{view}.nii.gz")
        f = max(1.0, max(image.shape) / 480)  # a clinical radiograph is drawn (and its DRR rendered) coarser
        if f > 1:
            shape = (max(1, round(image.shape[0] / f)), max(1, round(image.shape[1] / f)))
            image = _resize(torch.as_tensor(image, dtype=torch.float32)[None, None], shape)[0, 0].numpy()
        ax.imshow(image, cmap="gray")
        if "pose" in s:
            camera = Camera(
                s["camera"]["sdd_mm"], tuple(s["camera"]["pixel_spacing_mm"]), tuple(s["camera"]["shape_rows_cols"])
            ).scaled(f)
            pose = Pose(tuple(s["pose"]["rotation_deg"]), tuple(s["pose"]["translation_mm"]), s["pose"]["orientation"])
            subject = prepared.subject(
                _volume_factors(prepared.image, camera, float(np.linalg.norm(pose.translation_mm))), device
            )
            with torch.no_grad():
                drr = render_slices(subject, camera, pose)
                gx, gy = image_gradients(drr)
                edges = torch.sqrt(gx**2 + gy**2)[0, 0].cpu().numpy()
            thr = np.percentile(edges, 92)
            overlay = np.zeros((*edges.shape, 4))
            overlay[edges > thr] = (1.0, 0.1, 0.1, 0.55)
            ax.imshow(overlay, extent=(0.5, edges.shape[1] + 0.5, edges.shape[0] + 0.5, 0.5))
            if s.get("roi_rows_cols"):
                r0, r1, c0, c1 = (v / f for v in s["roi_rows_cols"])
                ax.add_patch(plt.Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False, color="yellow", lw=0.8))
            title = f"{view}: {s.get('similarity_measure', '')} {s['similarity']:.3f} {s['status']}"
        else:
            title = f"{view}: {s.get('status')}"
        ax.set_title(title, fontsize=8, color="black" if s.get("status") == "ok" else "red")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
