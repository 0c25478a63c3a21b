"""CT ingestion: a DICOM series folder or a NIfTI file → a NIfTI volume in HU.

Geometry is kept in the DICOM patient frame (LPS, mm) inside SimpleITK; the
NIfTI writer converts to the file's RAS convention, so any reader that honours
the NIfTI affine sees the same physical voxel positions.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from bmdpipe import __version__
from bmdpipe.errors import InputError
from bmdpipe.io import dicom
from bmdpipe.io.atomic import atomic_path, write_json

#: Bump when a change to this stage changes its outputs (the rule re-runs).
STAGE_VERSION = "1"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: HU outside this range in more than a trace of voxels suggests unscaled values.
PLAUSIBLE_HU = (-1100.0, 4000.0)


@dataclass
class _Slice:
    path: Path
    position: np.ndarray  # (3,) ImagePositionPatient, mm, LPS
    orientation: np.ndarray  # (6,) ImageOrientationPatient
    series_uid: str
    series_number: Any
    series_description: str
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing), mm
    ds: Any = field(repr=False)


def is_nifti(path: str | os.PathLike[str]) -> bool:
    """True when the file name ends in .nii or .nii.gz."""
    return str(path).endswith(NIFTI_SUFFIXES)


def read_ct(
    path: str | os.PathLike[str],
    *,
    series_uid: str | None = None,
    spacing_tolerance: float = 0.01,
) -> tuple[sitk.Image, dict[str, Any]]:
    """Read a CT as a 3-D SimpleITK image in HU.

    Args:
        path: a DICOM series folder (searched recursively) or a NIfTI file.
        series_uid: which SeriesInstanceUID to read when the folder holds
            several image series.
        spacing_tolerance: largest relative deviation of a slice gap from the
            median gap before the series is reported as uneven.

    Returns:
        ``(image, meta)``: the volume (float32 HU, or int16 when every value
        is an integer; spacing in mm, origin and direction in LPS) and a
        JSON-ready dict of technical metadata (no identifying attributes).

    Raises:
        InputError: missing path, no readable series, several series and no
            choice, missing or duplicate slices, uneven spacing, gantry tilt.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder; check the 'ct' column of the samples sheet")
    if p.is_file() and is_nifti(p):
        return _read_nifti(p)
    if p.is_file():
        raise InputError(
            f"{p}: a CT must be a DICOM series folder or a NIfTI file (.nii, .nii.gz); "
            "for a DICOM series give the folder that holds its slices"
        )
    return _read_series(p, series_uid=series_uid, spacing_tolerance=spacing_tolerance)


def _read_nifti(p: Path) -> tuple[sitk.Image, dict[str, Any]]:
    try:
        img = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise InputError(f"{p}: cannot read NIfTI ({str(exc).strip().splitlines()[-1]})") from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{p}: expected a 3-D single-channel CT volume, got {img.GetDimension()}-D with "
            f"{img.GetNumberOfComponentsPerPixel()} component(s)"
        )
    # Rebuild the image from its array so no header text (descrip, aux_file)
    # is carried into outputs.
    arr = sitk.GetArrayFromImage(img)
    out = sitk.GetImageFromArray(_hu_dtype(arr.astype(np.float32)))
    out.CopyInformation(img)
    meta = {"source_format": "nifti", "input_sha256": dicom.sha256_file(p)}
    return out, meta


def _scan_folder(folder: Path) -> tuple[list[_Slice], list[str]]:
    slices: list[_Slice] = []
    skipped: list[str] = []
    files = sorted(f for f in folder.rglob("*") if f.is_file() and not f.name.startswith("."))
    for f in files:
        if f.name.upper() == "DICOMDIR":
            continue
        try:
            ds = dicom.read_dataset(f, header_only=True)
        except InputError as exc:
            if "not a DICOM file" in str(exc):
                skipped.append(f"{f.name}: not DICOM")
                continue
            raise
        image_type = [str(v).upper() for v in ds.get("ImageType", [])]
        if "LOCALIZER" in image_type:
            skipped.append(f"{f.name}: localizer")
            continue
        if "ImageOrientationPatient" not in ds or "ImagePositionPatient" not in ds:
            if dicom.has_pixel_data(ds):
                skipped.append(f"{f.name}: image without ImagePositionPatient/ImageOrientationPatient")
            else:
                skipped.append(f"{f.name}: no pixel data ({ds.get('Modality', 'unknown modality')})")
            continue
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise InputError(
                f"{f}: multi-frame (enhanced) CT is not supported (NumberOfFrames (0028,0008) = "
                f"{ds.NumberOfFrames}); convert it to single-frame slices or NIfTI first"
            )
        if not dicom.has_pixel_data(ds):
            raise InputError(f"{f}: CT slice has no {dicom.PIXEL_DATA_TAG}; the file is incomplete, re-export the series")
        try:
            spacing = tuple(float(v) for v in ds.PixelSpacing)
        except (AttributeError, TypeError, ValueError):
            raise InputError(f"{f}: CT slice without a valid PixelSpacing (0028,0030)") from None
        if len(spacing) != 2 or min(spacing) <= 0:
            raise InputError(f"{f}: PixelSpacing (0028,0030) = {list(spacing)} is not two positive numbers")
        slices.append(
            _Slice(
                path=f,
                position=np.array([float(v) for v in ds.ImagePositionPatient]),
                orientation=np.array([float(v) for v in ds.ImageOrientationPatient]),
                series_uid=str(ds.get("SeriesInstanceUID", "")),
                series_number=ds.get("SeriesNumber"),
                series_description=str(ds.get("SeriesDescription", "")),
                rows=int(ds.Rows),
                cols=int(ds.Columns),
                pixel_spacing=spacing,  # type: ignore[arg-type]
                ds=ds,
            )
        )
    return slices, skipped


def _read_series(folder: Path, *, series_uid: str | None, spacing_tolerance: float) -> tuple[sitk.Image, dict[str, Any]]:
    slices, skipped = _scan_folder(folder)
    if not slices:
        detail = f" ({len(skipped)} file(s) skipped: {'; '.join(skipped[:5])})" if skipped else ""
        raise InputError(f"{folder}: no DICOM CT slices found{detail}")
    by_series: dict[str, list[_Slice]] = {}
    for s in slices:
        by_series.setdefault(s.series_uid, []).append(s)
    if series_uid is not None:
        if series_uid not in by_series:
            raise InputError(
                f"{folder}: no series with SeriesInstanceUID (0020,000E) = {series_uid}; "
                f"the folder holds: {_list_series(by_series)}"
            )
        chosen = by_series[series_uid]
    elif len(by_series) > 1:
        raise InputError(
            f"{folder}: holds {len(by_series)} image series, choose one with the samples sheet column "
            f"'ct_series_uid' (or --series-uid): {_list_series(by_series)}"
        )
    else:
        chosen = next(iter(by_series.values()))

    ref = chosen[0]
    for s in chosen[1:]:
        if (s.rows, s.cols) != (ref.rows, ref.cols):
            raise InputError(f"{s.path}: slice size {s.rows}x{s.cols} differs from {ref.path.name} ({ref.rows}x{ref.cols})")
        if not np.allclose(s.orientation, ref.orientation, atol=1e-4):
            raise InputError(f"{s.path}: ImageOrientationPatient (0020,0037) differs from {ref.path.name}; the series is not one stack")
        if not np.allclose(s.pixel_spacing, ref.pixel_spacing, rtol=1e-5):
            raise InputError(f"{s.path}: PixelSpacing (0028,0030) differs from {ref.path.name}")

    row_dir = ref.orientation[:3] / np.linalg.norm(ref.orientation[:3])
    col_dir = ref.orientation[3:] / np.linalg.norm(ref.orientation[3:])
    normal = np.cross(row_dir, col_dir)
    chosen.sort(key=lambda s: float(s.position @ normal))
    z = np.array([float(s.position @ normal) for s in chosen])

    if len(chosen) > 1:
        gaps = np.diff(z)
        dup = np.flatnonzero(gaps < 1e-3)
        if dup.size:
            i = int(dup[0])
            raise InputError(
                f"{folder}: slices {chosen[i].path.name} and {chosen[i + 1].path.name} share the position "
                f"{z[i]:.3f} mm along the slice normal (ImagePositionPatient (0020,0032)); remove the duplicate"
            )
        step = float(np.median(gaps))
        bad = np.flatnonzero(np.abs(gaps - step) > spacing_tolerance * step + 1e-4)
        if bad.size:
            i = int(bad[0])
            ratio = gaps[i] / step
            if abs(ratio - round(ratio)) < spacing_tolerance + 0.01 and round(ratio) >= 2:
                n_missing = int(round(ratio)) - 1
                raise InputError(
                    f"{folder}: {n_missing} slice(s) missing between {chosen[i].path.name} "
                    f"(at {z[i]:.3f} mm) and {chosen[i + 1].path.name} (at {z[i + 1]:.3f} mm); "
                    f"the series spacing is {step:.3f} mm. Re-export the complete series"
                )
            raise InputError(
                f"{folder}: uneven slice spacing, a gap of {gaps[i]:.3f} mm between {chosen[i].path.name} "
                f"and {chosen[i + 1].path.name} where the series spacing is {step:.3f} mm; resample the "
                "series to a regular grid (or export it as NIfTI) first"
            )
        offsets = np.array([s.position - chosen[0].position for s in chosen])
        in_plane = offsets - np.outer(offsets @ normal, normal)
        if np.abs(in_plane).max() > max(1e-3, 0.01 * step):
            raise InputError(
                f"{folder}: slice positions drift across the slice plane (gantry tilt of about "
                f"{np.degrees(np.arctan2(np.linalg.norm(in_plane[-1]), z[-1] - z[0])):.1f} degrees); "
                "tilted series are not supported, resample to an untilted grid first"
            )
    else:
        step = float(ref.ds.get("SpacingBetweenSlices", ref.ds.get("SliceThickness", 1.0)) or 1.0)

    planes = []
    for s in chosen:
        full = dicom.read_dataset(s.path)
        stored = dicom.decode_pixels(full, s.path)
        if stored.shape != (ref.rows, ref.cols):
            raise InputError(f"{s.path}: decoded pixel array has shape {stored.shape}, expected ({ref.rows}, {ref.cols})")
        slope = float(full.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(full.get("RescaleIntercept", 0.0) or 0.0)
        planes.append(stored.astype(np.float32) * np.float32(slope) + np.float32(intercept))
    volume = np.stack(planes, axis=0)  # (slices, rows, cols)

    img = sitk.GetImageFromArray(_hu_dtype(volume))
    img.SetSpacing((ref.pixel_spacing[1], ref.pixel_spacing[0], step))
    img.SetOrigin(tuple(float(v) for v in chosen[0].position))
    img.SetDirection(tuple(np.stack([row_dir, col_dir, normal], axis=1).ravel().tolist()))

    digest = hashlib.sha256()
    for s in chosen:
        digest.update(dicom.sha256_file(s.path).encode())
    meta: dict[str, Any] = {
        "source_format": "dicom",
        "n_files": len(chosen),
        # reasons only: file names can carry identifying text
        "skipped_files": _count_reasons(skipped),
        "input_sha256": digest.hexdigest(),
        "acquisition": dicom.acquisition_fields(ref.ds),
    }
    return img, meta


def _count_reasons(skipped: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in skipped:
        reason = entry.split(": ", 1)[-1]
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def _list_series(by_series: dict[str, list[_Slice]]) -> str:
    parts = []
    for uid, sl in by_series.items():
        s0 = sl[0]
        parts.append(f"[SeriesNumber {s0.series_number}, {len(sl)} slices, '{s0.series_description}', UID {uid}]")
    return " ".join(parts)


def _hu_dtype(volume: np.ndarray) -> np.ndarray:
    """int16 when every value is an integer inside int16's range, float32 otherwise."""
    if volume.size and np.all(np.mod(volume, 1) == 0) and volume.min() >= -32768 and volume.max() <= 32767:
        return volume.astype(np.int16)
    return volume.astype(np.float32)


def ct_summary(img: sitk.Image, meta: dict[str, Any]) -> dict[str, Any]:
    """JSON summary of a CT volume: geometry, HU statistics, technical metadata."""
    arr = sitk.GetArrayViewFromImage(img)
    lo, hi = PLAUSIBLE_HU
    outside = float(np.mean((arr < lo) | (arr > hi)))
    warnings = []
    if float(np.percentile(arr, 1)) >= 0:
        warnings.append("the 1st percentile is >= 0 HU: there is no air, the values may be unscaled stored values")
    if outside > 0.01:
        warnings.append(f"{outside:.1%} of voxels are outside [{lo}, {hi}] HU")
    acq = meta.get("acquisition", {})
    return {
        "stage": "ingest_ct",
        "bmdpipe_version": __version__,
        "shape_xyz": list(img.GetSize()),
        "spacing_mm": list(img.GetSpacing()),
        "origin_lps_mm": list(img.GetOrigin()),
        "direction_lps": list(img.GetDirection()),
        "dtype": str(arr.dtype),
        "hu_min": float(arr.min()),
        "hu_max": float(arr.max()),
        "hu_p01": float(np.percentile(arr, 1)),
        "hu_p99": float(np.percentile(arr, 99)),
        "kvp": acq.get("KVP"),
        "scanner": {k: acq[k] for k in ("Manufacturer", "ManufacturerModelName", "ConvolutionKernel") if k in acq},
        "warnings": warnings,
        **meta,
    }


def ingest_ct(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    series_uid: str | None = None,
    spacing_tolerance: float = 0.01,
    labels: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Read a CT (:func:`read_ct`) and write ``out`` (.nii.gz) and ``out``'s .json summary.

    Both files are written atomically; on an error neither exists. ``labels``
    (e.g. the sheet's patient_id) are added to the summary.

    Returns:
        The summary written to the JSON file.
    """
    out = Path(out)
    if not is_nifti(out):
        raise InputError(f"{out}: the output must end in .nii.gz or .nii")
    img, meta = read_ct(path, series_uid=series_uid, spacing_tolerance=spacing_tolerance)
    summary = ct_summary(img, meta)
    summary.update(labels or {}, status="ok", code_version=STAGE_VERSION)
    with atomic_path(out) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)
    write_json(json_path(out), summary)
    return summary


def json_path(image_path: str | os.PathLike[str]) -> Path:
    """``x.nii.gz`` → ``x.json`` (the summary beside an image)."""
    p = Path(image_path)
    name = p.name
    for suffix in NIFTI_SUFFIXES[::-1]:
        if name.endswith(suffix):
            return p.with_name(name[: -len(suffix)] + ".json")
    return p.with_suffix(".json")
