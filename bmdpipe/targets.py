"""Training targets: bone and clinical-ROI projections in each radiograph's registered pose (seed 004 Fig. 3).

For every radiograph whose registration succeeded:

- *stage-1 target* (``bone``): the areal density of every segmented bone,
  the calibrated CT (mg/cm³ HA) masked by the bone labels (dilated by
  ``dilate_voxels``: the labels are tighter than the blurred cortex) and
  projected along the rays of the registered camera, g/cm²;
- *stage-2 target* (``roi``): the same for the clinical ROI only (the DXA
  regions of the ROI stage), g/cm²;
- *the radiograph* cropped to the same field.

All three share one frame: a box on the radiograph's detector (the whole
image, or the projected target vertebrae plus a margin), widened to the
aspect ratio of the training size, then brought to the training size (the
projections are rendered directly on that grid: a virtual detector with the
box's extent and the training pixel count; the radiograph is area-averaged).

Saved per view as ``{view}.npz`` (arrays ``xray``, ``bone``, ``roi`` of shape
``(rows, cols)`` float32, plus the crop box, pixel size and pose) with a QC
overlay PNG; ``targets.json`` lists the views made and the views left out
with their reasons (failed registrations are never used).

Each view also gets seed 000's 16 chest landmarks (:mod:`bmdpipe.chest_landmarks`), found on the
bone labels and projected through the registered pose: ``chest_landmarks_rows_cols`` ``(16, 2)``
whole-radiograph pixels, NaN where the labels lack the bone (the U-Net's labels name only the
target vertebrae) or the point falls outside the detector; ``{view}_chest.png`` draws them and
seed 000's 14 ROI boxes on the whole radiograph.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from bmdpipe.drr import (
    MG_CM3_MM_TO_G_CM2,
    Camera,
    Pose,
    project_points,
    render,
    render_slices,
    volume_from_sitk,
)
from bmdpipe.errors import InputError

log = logging.getLogger(__name__)

#: Bump when a change to this stage changes its outputs (the rule re-runs).
STAGE_VERSION = "2"


@dataclass(frozen=True)
class TargetSettings:
    """Settings of the targets stage (config ``targets``).

    Attributes:
        field: ``"vertebrae"``: a box around the projected ``vertebrae`` plus
            ``margin_mm``; ``"image"``: the largest centred box of the
            training aspect ratio inside the radiograph.
        vertebrae: the vertebrae whose projection defines the field.
        margin_mm: margin around them, mm at the isocentre plane.
        size: training resolution ``(rows, cols)``.
        dilate_voxels: dilation of the bone labels before masking.
        clip_negative: set negative densities (fat in marrow, noise) to 0 mg/cm³ before projecting.
        ray_oversample: 0: one bilinear sample per CT slice along each ray
            (:func:`bmdpipe.drr.render_slices`); > 0: nanodrr ray marching with
            this many samples per smallest voxel size.
    """

    field: str = "vertebrae"
    vertebrae: tuple[str, ...] = ("T12", "L1", "L2", "L3")
    margin_mm: float = 30.0
    size: tuple[int, int] = (256, 256)
    dilate_voxels: int = 1
    clip_negative: bool = True
    ray_oversample: float = 0.0

    def __post_init__(self) -> None:
        if self.field not in ("vertebrae", "image"):
            raise ValueError(f"targets.field must be 'vertebrae' or 'image', got {self.field!r}")

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "TargetSettings":
        cfg = dict(cfg)
        for key in ("vertebrae", "size"):
            if key in cfg:
                cfg[key] = tuple(cfg[key])
        return cls(**cfg)


# --- geometry ---------------------------------------------------------------------


def widen_to_aspect(
    box: Sequence[float], aspect_rows_per_col: float, shape: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Grow ``[r0, r1, c0, c1]`` about its centre to ``rows/cols = aspect`` (in pixels), kept inside ``shape`` where it fits.

    Returns:
        Integer ``[r0, r1, c0, c1]`` (end exclusive), inside the detector.
    """
    r0, r1, c0, c1 = (float(v) for v in box)
    h, w = r1 - r0, c1 - c0
    if h / w < aspect_rows_per_col:
        h = w * aspect_rows_per_col
    else:
        w = h / aspect_rows_per_col
    h, w = min(h, shape[0]), min(w, shape[1])
    cr, cc = (r0 + r1) / 2, (c0 + c1) / 2
    rr0 = int(round(np.clip(cr - h / 2, 0, shape[0] - h)))
    cc0 = int(round(np.clip(cc - w / 2, 0, shape[1] - w)))
    return rr0, rr0 + max(1, int(round(h))), cc0, cc0 + max(1, int(round(w)))


def target_camera(camera: Camera, box: Sequence[int], size: tuple[int, int]) -> Camera:
    """A virtual detector covering ``box`` of ``camera`` with ``size`` pixels (the training grid)."""
    r0, r1, c0, c1 = box
    crop = camera.crop((r0, r1), (c0, c1))
    dy, dx = camera.pixel_spacing_mm
    return replace(
        crop, shape=(int(size[0]), int(size[1])), pixel_spacing_mm=(dy * (r1 - r0) / size[0], dx * (c1 - c0) / size[1])
    )


def field_box(
    camera: Camera,
    pose: Pose,
    isocenter_mm: Sequence[float],
    settings: TargetSettings,
    vertebra_points_ras_mm: np.ndarray | None,
) -> tuple[int, int, int, int]:
    """The crop box ``[r0, r1, c0, c1]`` on the radiograph (see :class:`TargetSettings`).

    Raises:
        InputError: ``field: vertebrae`` and none of the vertebrae is
            segmented, or they project outside the radiograph.
    """
    h, w = camera.shape
    aspect = settings.size[0] / settings.size[1]
    if settings.field == "image":
        return _centred_inside(camera.shape, aspect)
    if vertebra_points_ras_mm is None or len(vertebra_points_ras_mm) == 0:
        raise InputError(
            f"none of the target vertebrae {', '.join(settings.vertebrae)} (targets.vertebrae) is in the "
            "segmentation: the field cannot be placed; segment them or use targets.field: image"
        )
    rc = project_points(vertebra_points_ras_mm, camera, pose, isocenter_mm)
    sid = float(np.linalg.norm(pose.translation_mm))
    margin = settings.margin_mm * camera.sdd_mm / sid / np.array(camera.pixel_spacing_mm)
    r0, c0 = rc.min(axis=0) + 0.5 - margin
    r1, c1 = rc.max(axis=0) + 0.5 + margin
    if r1 <= 0 or c1 <= 0 or r0 >= h or c0 >= w:
        raise InputError(
            f"the target vertebrae project outside the radiograph (rows {r0:.0f}–{r1:.0f}, columns "
            f"{c0:.0f}–{c1:.0f} of {h}×{w}): is this radiograph of the spine?"
        )
    r0, r1, c0, c1 = max(r0, 0.0), min(r1, float(h)), max(c0, 0.0), min(c1, float(w))
    return widen_to_aspect((r0, r1, c0, c1), aspect, camera.shape)


def _centred_inside(shape: tuple[int, int], aspect: float) -> tuple[int, int, int, int]:
    h, w = shape
    if h / w > aspect:  # taller than wanted: full width, central rows
        rows = int(round(w * aspect))
        r0 = (h - rows) // 2
        return r0, r0 + rows, 0, w
    cols = int(round(h / aspect))
    c0 = (w - cols) // 2
    return 0, h, c0, c0 + cols


def crop_resize(image: np.ndarray, box: Sequence[int], size: tuple[int, int]) -> np.ndarray:
    """``image[r0:r1, c0:c1]`` brought to ``size`` by area averaging (bilinear when enlarging); float32."""
    r0, r1, c0, c1 = box
    t = torch.as_tensor(np.ascontiguousarray(image[r0:r1, c0:c1]), dtype=torch.float32)[None, None]
    mode = "area" if t.shape[-2] >= size[0] and t.shape[-1] >= size[1] else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(t, size=tuple(size), mode=mode, **kwargs)[0, 0].numpy()


# --- projections --------------------------------------------------------------------


def masked_density_subject(
    density: sitk.Image,
    mask: np.ndarray,
    *,
    clip_negative: bool,
    isocenter_mm: Sequence[float],
    device: torch.device | str | None = None,
) -> Any | None:
    """nanodrr Subject of ``density`` × ``mask`` (mg/cm³), cropped to the mask's bounding box; None for an empty mask.

    Args:
        mask: ``(z, y, x)`` bool on the density's grid.
    """
    if not mask.any():
        return None
    arr = sitk.GetArrayFromImage(density).astype(np.float32)
    if clip_negative:
        np.maximum(arr, 0.0, out=arr)
    arr = np.where(mask, arr, 0.0).astype(np.float32)
    nz = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    lo = [max(int(n[0]) - 1, 0) for n in nz]
    hi = [min(int(n[-1]) + 2, s) for n, s in zip(nz, arr.shape)]
    sub = sitk.GetImageFromArray(np.ascontiguousarray(arr[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]))
    sub.SetSpacing(density.GetSpacing())
    sub.SetDirection(density.GetDirection())
    sub.SetOrigin(density.TransformIndexToPhysicalPoint([lo[2], lo[1], lo[0]]))
    return volume_from_sitk(sub, hu=False, device=device, isocenter_mm=isocenter_mm)


def project(subject: Any | None, camera: Camera, pose: Pose, oversample: float) -> np.ndarray:
    """``(rows, cols)`` areal density, g/cm², of a masked density subject (zeros for None).

    ``oversample`` 0: one bilinear sample per slice (:func:`bmdpipe.drr.render_slices`);
    > 0: nanodrr ray marching with that many samples per voxel size.
    """
    if subject is None:
        return np.zeros(camera.shape, np.float32)
    with torch.no_grad():
        if oversample > 0:
            from bmdpipe.register import _n_samples

            out = render(subject, camera, pose, n_samples=_n_samples(subject, camera, pose, oversample))
        else:
            out = render_slices(subject, camera, pose)
    return (out[0, 0] * MG_CM3_MM_TO_G_CM2).cpu().numpy().astype(np.float32)


def _label_name(value: int) -> str:
    from bmdpipe.segment import BONE_LABELS

    names = {v: k for k, v in BONE_LABELS.items()}
    return names.get(value, f"label_{value}").removeprefix("vertebra_")


def vertebra_points(labels: sitk.Image, names: Sequence[str], *, step: int = 1) -> np.ndarray:
    """``(N, 3)`` RAS mm centres of the voxels of the named vertebrae (bmdpipe labels), every ``step``-th."""
    from bmdpipe.register import _ras_points
    from bmdpipe.segment import BONE_LABELS

    values = [BONE_LABELS[f"vertebra_{n}"] for n in names if f"vertebra_{n}" in BONE_LABELS]
    arr = sitk.GetArrayViewFromImage(labels)
    idx = np.argwhere(np.isin(arr, values))[::step]
    return _ras_points(labels, idx[:, ::-1]) if len(idx) else np.zeros((0, 3))


def make_targets(
    density: sitk.Image,
    bone_labels: sitk.Image,
    roi: sitk.Image | None,
    registrations: dict[str, dict[str, Any]],
    radiographs: dict[str, np.ndarray],
    settings: TargetSettings = TargetSettings(),
    *,
    device: torch.device | str | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Targets of every successfully registered view of one patient (in memory).

    Args:
        density: calibrated CT, mg/cm³ HA.
        bone_labels: bmdpipe bone labels on the density's grid (0 = background).
        roi: clinical ROI labels on the same grid (the roi stage's ``roi.nii.gz``:
            each site its bone-label value; non-zero inside), or None.
        registrations: per view the register stage's JSON summary.
        radiographs: per view the ingested ``(rows, cols)`` radiograph.

    Returns:
        ``(targets, excluded)``: per view a dict of arrays and metadata (the
        ``.npz`` content: ``xray``, ``bone``, ``roi`` ``(rows, cols)``;
        ``roi_sites`` ``(sites, rows, cols)`` with ``roi_site_names``; crop
        box, pixel size, pose), and per view left out the reason.

    Raises:
        InputError: the label map or ROI is not on the density's grid.
    """
    for name, img in (("bone labels", bone_labels), ("clinical ROI", roi)):
        if img is not None and (
            img.GetSize() != density.GetSize()
            or not np.allclose(img.GetOrigin(), density.GetOrigin(), atol=1e-2)
            or not np.allclose(img.GetSpacing(), density.GetSpacing(), rtol=1e-4)
        ):
            raise InputError(
                f"the {name} ({img.GetSize()}) and the calibrated CT ({density.GetSize()}) are not on one "
                "grid; both must come from the patient's ingested CT"
            )
    excluded: dict[str, str] = {}
    ok = {v: r for v, r in registrations.items() if r.get("status") == "ok"}
    for v, r in registrations.items():
        if v not in ok:
            excluded[v] = f"registration {r.get('status', 'missing')}: {r.get('reason', '')}"
    for v in list(ok):
        if v not in radiographs:
            excluded[v] = "no ingested radiograph"
            ok.pop(v)
    if not ok:
        return {}, excluded
    iso = next(iter(ok.values()))["isocenter_ras_mm"]
    bone = sitk.GetArrayViewFromImage(bone_labels) > 0
    if settings.dilate_voxels:
        from scipy import ndimage

        bone = ndimage.binary_dilation(bone, iterations=settings.dilate_voxels)
    roi_arr = sitk.GetArrayFromImage(roi) if roi is not None else np.zeros(bone.shape, np.uint8)
    site_values = [int(v) for v in np.unique(roi_arr) if v != 0]
    masks = [("bone", bone), ("roi", roi_arr > 0)] + [(f"site_{v}", roi_arr == v) for v in site_values]
    subjects = {
        name: masked_density_subject(density, m, clip_negative=settings.clip_negative, isocenter_mm=iso, device=device)
        for name, m in masks
    }
    site_names = [_label_name(v) for v in site_values]
    points = vertebra_points(bone_labels, settings.vertebrae, step=7) if settings.field == "vertebrae" else None
    from bmdpipe.chest_landmarks import chest_landmarks

    chest, _ = chest_landmarks(bone_labels)
    out: dict[str, dict[str, Any]] = {}
    for view, reg in ok.items():
        cam_json = reg["camera"]
        camera = Camera(
            float(cam_json["sdd_mm"]), tuple(cam_json["pixel_spacing_mm"]), tuple(cam_json["shape_rows_cols"])
        )
        pose = Pose(
            tuple(reg["pose"]["rotation_deg"]), tuple(reg["pose"]["translation_mm"]), reg["pose"]["orientation"]
        )
        iso_v = reg["isocenter_ras_mm"]
        if not np.allclose(iso_v, iso, atol=1e-3):
            raise ValueError("the views of one patient were registered about different isocentres")
        try:
            box = field_box(camera, pose, iso, settings, points)
        except InputError as exc:
            excluded[view] = str(exc)
            continue
        tcam = target_camera(camera, box, settings.size)
        image = radiographs[view]
        if image.shape != tuple(camera.shape):
            excluded[view] = f"radiograph shape {image.shape} differs from the registered camera {camera.shape}"
            continue
        marks = project_points(chest, camera, pose, iso) if np.isfinite(chest).any() else np.full((len(chest), 2), np.nan)
        marks[~((marks >= 0) & (marks <= np.array(camera.shape) - 1)).all(axis=1)] = np.nan  # off the detector
        out[view] = {
            "xray": crop_resize(image, box, settings.size),
            "bone": project(subjects["bone"], tcam, pose, settings.ray_oversample),
            "roi": project(subjects["roi"], tcam, pose, settings.ray_oversample),
            "roi_sites": np.stack(
                [project(subjects[f"site_{v}"], tcam, pose, settings.ray_oversample) for v in site_values]
            )
            if site_values
            else np.zeros((0, *settings.size), np.float32),
            "roi_site_names": np.array(site_names, dtype=str),
            "crop_box_rows_cols": np.array(box, dtype=np.int64),
            "pixel_spacing_mm": np.array(tcam.pixel_spacing_mm, dtype=np.float64),
            "pixel_spacing_isocenter_mm": np.array(tcam.pixel_spacing_mm, dtype=np.float64)
            * float(np.linalg.norm(pose.translation_mm))
            / camera.sdd_mm,
            "sdd_mm": np.float64(camera.sdd_mm),
            "pose_rotation_deg": np.array(pose.rotation_deg),
            "pose_translation_mm": np.array(pose.translation_mm),
            "pose_orientation": np.array(pose.orientation),
            "isocenter_ras_mm": np.array(iso, dtype=np.float64),
            "camera_to_world_ras": np.array(reg["camera_to_world_ras"], dtype=np.float64),
            "registration_similarity": np.float64(reg["similarity"]),
            "chest_landmarks_rows_cols": marks.astype(np.float64),
        }
    return out, excluded


def targets_patient(
    register_dir: str | os.PathLike[str],
    xray_dir: str | os.PathLike[str],
    calibration_dir: str | os.PathLike[str],
    segment_dir: str | os.PathLike[str],
    roi_dir: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    settings: TargetSettings = TargetSettings(),
    *,
    patient: str = "",
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """The targets stage of one patient: reads the stages' outputs, writes ``{view}.npz``, ``{view}_qc.png``, ``targets.json``.

    Args:
        register_dir: ``results/register/{patient}`` ({view}.json).
        xray_dir: ``results/xray/{patient}`` ({view}.nii.gz).
        calibration_dir: ``results/calibration/{patient}`` (bmd.nii.gz, calibration.json).
        segment_dir: ``results/segment/{patient}`` (labels.nii.gz, segment.json).
        roi_dir: ``results/roi/{patient}`` (roi.nii.gz, abmd.json), or None; when
            the ROI stage failed the stage-2 targets are empty and the reason is
            recorded in ``warnings``.

    Raises:
        InputError: the calibration or segmentation failed (their reason is
            repeated), or no view could be made (the reason of each).
    """
    from bmdpipe import __version__
    from bmdpipe.io.atomic import atomic_path, write_json
    from bmdpipe.io.xray import load_xray
    from bmdpipe.workflow import upstream_failure

    register_dir, xray_dir, out = Path(register_dir), Path(xray_dir), Path(out_dir)
    cal_dir, seg_dir = Path(calibration_dir), Path(segment_dir)
    upstream_failure(cal_dir / "calibration.json")
    if (seg_dir / "segment.json").exists():
        upstream_failure(seg_dir / "segment.json")
    if not (seg_dir / "labels.nii.gz").exists():
        raise InputError(f"{seg_dir / 'labels.nii.gz'}: missing; the segment stage did not write it")
    warnings: list[str] = []
    roi = None
    if roi_dir is not None:
        try:
            if (Path(roi_dir) / "abmd.json").exists():
                upstream_failure(Path(roi_dir) / "abmd.json")
            if not (Path(roi_dir) / "roi.nii.gz").exists():
                raise InputError(f"{Path(roi_dir) / 'roi.nii.gz'}: missing")
            roi = sitk.ReadImage(str(Path(roi_dir) / "roi.nii.gz"))
        except InputError as exc:
            warnings.append(f"no clinical ROI, the stage-2 targets are empty: {exc}")
    registrations = {p.stem: json.loads(p.read_text()) for p in sorted(register_dir.glob("*.json"))}
    if not registrations:
        raise InputError(f"{register_dir}: no registration summary")
    radiographs = {
        v: load_xray(xray_dir / f"{v}.nii.gz")[0] for v in registrations if (xray_dir / f"{v}.nii.gz").exists()
    }
    density = sitk.ReadImage(str(cal_dir / "bmd.nii.gz"))
    labels = sitk.ReadImage(str(seg_dir / "labels.nii.gz"))
    targets, excluded = make_targets(density, labels, roi, registrations, radiographs, settings, device=device)
    if not targets:
        raise InputError("no view could be used: " + "; ".join(f"{v}: {r}" for v, r in excluded.items()))
    out.mkdir(parents=True, exist_ok=True)
    for view, arrays in targets.items():
        with atomic_path(out / f"{view}.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **arrays)
        qc_figure(arrays, view, out / f"{view}_qc.png")
        chest_qc_figure(radiographs[view], arrays["chest_landmarks_rows_cols"], view, out / f"{view}_chest.png")
    for view, reason in excluded.items():
        log.warning("targets %s %s left out: %s", patient, view, reason)
    for w in warnings:
        log.warning("targets %s: %s", patient, w)
    summary = {
        "stage": "targets",
        "patient_id": patient,
        "status": "ok",
        "reason": "",
        "code_version": STAGE_VERSION,
        "bmdpipe_version": __version__,
        "settings": asdict(settings),
        "views": sorted(targets),
        "excluded": excluded,
        "warnings": warnings,
        "roi_sites": [str(n) for n in next(iter(targets.values()))["roi_site_names"]],
        "bone_mean_g_cm2": {v: float(t["bone"].mean()) for v, t in targets.items()},
        "roi_max_g_cm2": {v: float(t["roi"].max()) for v, t in targets.items()},
        "chest_landmarks": {v: int(np.isfinite(t["chest_landmarks_rows_cols"]).all(axis=1).sum())
                            for v, t in targets.items()},  # of 16 found and on the detector, per view
    }
    write_json(out / "targets.json", summary)
    return summary


def qc_figure(arrays: dict[str, Any], view: str, path: str | os.PathLike[str]) -> None:
    """PNG per view: the radiograph, the bone target, and the radiograph with the ROI target's outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bmdpipe.io.atomic import atomic_path

    fig, ax = plt.subplots(1, 3, figsize=(9.6, 3.6))
    ax[0].imshow(arrays["xray"], cmap="gray")
    ax[0].set_title(f"{view}: radiograph (field)", fontsize=8)
    im = ax[1].imshow(arrays["bone"], cmap="magma")
    ax[1].set_title("stage-1 target: bone, g/cm²", fontsize=8)
    fig.colorbar(im, ax=ax[1], fraction=0.046)
    ax[2].imshow(arrays["xray"], cmap="gray")
    roi = arrays["roi"]
    if roi.max() > 0:
        ax[2].contour(roi, levels=[0.05], colors="lime", linewidths=0.7)
        ax[2].imshow(np.ma.masked_less_equal(roi, 0.05), cmap="viridis", alpha=0.45)
    ax[2].set_title(f"stage-2 target: ROI (max {roi.max():.2f} g/cm²)", fontsize=8)
    for a in ax:
        a.set_axis_off()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def chest_qc_figure(image: np.ndarray, points_rows_cols: np.ndarray, view: str, path: str | os.PathLike[str]) -> None:
    """PNG of the whole radiograph with seed 000's 16 landmarks and its 14 ROI boxes (where found)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bmdpipe.chest_landmarks import roi_boxes
    from bmdpipe.io.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(4.2, 4.2 * image.shape[0] / image.shape[1]))
    ax.imshow(image, cmap="gray")
    ok = np.isfinite(points_rows_cols).all(axis=1)
    ax.scatter(points_rows_cols[ok, 1], points_rows_cols[ok, 0], s=8, c="red")
    for box in roi_boxes(points_rows_cols, image.shape).values():
        if box is not None:
            r0, r1, c0, c1 = box
            ax.add_patch(plt.Rectangle((c0, r0), c1 - c0, r1 - r0, fill=False, color="yellow", lw=0.7))
    ax.set_title(f"{view}: seed 000 landmarks ({int(ok.sum())} of 16) and ROIs", fontsize=8)
    ax.set_axis_off()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
