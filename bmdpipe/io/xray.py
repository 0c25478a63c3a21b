"""Radiograph ingestion: DICOM CR/DX, PNG, JPEG or TIFF → float image + geometry.

The output image is MONOCHROME2 (bright = more attenuation, as on a light
box), float32, in the units of the stored values after the modality LUT
(rescale slope/intercept). The display window (VOI LUT) is applied only when
asked: raw detector values keep more of the physics.

Pixel spacing is the detector pixel pitch in mm, taken in this order: the
samples sheet (``xray_pixel_spacing_mm``), ImagerPixelSpacing (0018,1164),
PixelSpacing (0028,0030), the configured default. A zero or missing spacing
everywhere is an error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from bmdpipe import __version__
from bmdpipe.errors import InputError
from bmdpipe.io import dicom
from bmdpipe.io.atomic import atomic_path, write_json
from bmdpipe.io.ct import is_nifti, json_path

#: Bump when a change to this stage changes its outputs (the rule re-runs).
STAGE_VERSION = "1"
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
RADIOGRAPH_MODALITIES = ("CR", "DX", "DR", "RG", "PX", "MG")


def read_xray(
    path: str | os.PathLike[str],
    *,
    pixel_spacing_mm: float | None = None,
    sdd_mm: float | None = None,
    apply_voi: bool = False,
    default_pixel_spacing_mm: float | None = None,
    default_sdd_mm: float | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one radiograph.

    Args:
        path: DICOM file (any extension other than the raster ones), or a
            ``.png``, ``.jpg``/``.jpeg``, ``.tif``/``.tiff`` image.
        pixel_spacing_mm: detector pixel pitch from the samples sheet; wins
            over the file.
        sdd_mm: source-to-detector distance from the samples sheet, mm; wins
            over DistanceSourceToDetector (0018,1110).
        apply_voi: apply the DICOM VOI LUT or window.
        default_pixel_spacing_mm, default_sdd_mm: used when neither the sheet
            nor the file gives a value.

    Returns:
        ``(image, meta)``: image of shape ``(rows, cols)``, float32,
        MONOCHROME2; meta a JSON-ready dict (no identifying attributes) with
        ``pixel_spacing_mm`` as ``[row, col]`` in mm and ``sdd_mm`` (or None).

    Raises:
        InputError: missing file, not an image, colour, multi-frame,
            undecodable or truncated pixel data, or no usable pixel spacing.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file; check the 'xray' column of the samples sheet")
    if p.is_dir():
        raise InputError(f"{p}: is a folder; a radiograph is one file (DICOM, PNG, JPEG or TIFF)")
    if p.name.lower().endswith(RASTER_SUFFIXES):
        image, meta, file_spacing, file_sdd = _read_raster(p)
    else:
        image, meta, file_spacing, file_sdd = _read_dicom(p, apply_voi=apply_voi)

    spacing, source = _choose_spacing(p, pixel_spacing_mm, file_spacing, default_pixel_spacing_mm)
    if sdd_mm is not None:
        sdd, sdd_source = float(sdd_mm), "samples sheet"
    elif file_sdd is not None:
        sdd, sdd_source = file_sdd, "DistanceSourceToDetector (0018,1110)"
    elif default_sdd_mm is not None:
        sdd, sdd_source = float(default_sdd_mm), "config default"
    else:
        sdd, sdd_source = None, None
    meta.update(
        {
            "shape_rows_cols": [int(image.shape[0]), int(image.shape[1])],
            "pixel_spacing_mm": [float(spacing[0]), float(spacing[1])],
            "pixel_spacing_source": source,
            "sdd_mm": sdd,
            "sdd_source": sdd_source,
            "input_sha256": dicom.sha256_file(p),
        }
    )
    return image, meta


def _choose_spacing(
    p: Path,
    sheet: float | None,
    file_spacing: tuple[tuple[float, float] | None, str | None],
    default: float | None,
) -> tuple[tuple[float, float], str]:
    if sheet is not None:
        if not sheet > 0:
            raise InputError(f"{p}: pixel spacing from the samples sheet must be positive, got {sheet}")
        return (float(sheet), float(sheet)), "samples sheet"
    spacing, tag = file_spacing
    if spacing is not None:
        return spacing, str(tag)
    if default is not None:
        return (float(default), float(default)), "config default"
    found = f" ({tag})" if tag else ""
    raise InputError(
        f"{p}: no usable pixel spacing{found}: ImagerPixelSpacing (0018,1164) and PixelSpacing (0028,0030) "
        "are missing or zero. Give the detector pixel pitch in mm in the samples sheet column "
        "'xray_pixel_spacing_mm' (or ingest.xray.default_pixel_spacing_mm in the config, "
        "or --pixel-spacing on the command line)"
    )


def _spacing_from_dicom(ds: Dataset) -> tuple[tuple[float, float] | None, str | None]:
    unusable = []
    for kw, tag in (("ImagerPixelSpacing", "(0018,1164)"), ("PixelSpacing", "(0028,0030)")):
        if kw not in ds:
            continue
        try:
            values = [float(v) for v in ds[kw].value]
        except (TypeError, ValueError):
            unusable.append(f"{kw} {tag} = {ds[kw].value!r} is not numeric")
            continue
        if len(values) == 2 and min(values) > 0 and all(np.isfinite(values)):
            return (values[0], values[1]), f"{kw} {tag}"
        unusable.append(f"{kw} {tag} = {values}")
    return None, "; ".join(unusable) or None


def _read_dicom(p: Path, *, apply_voi: bool) -> tuple[np.ndarray, dict[str, Any], Any, float | None]:
    ds = dicom.read_dataset(p)
    dicom.require_pixel_data(ds, p)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputError(
            f"{p}: is a colour image (PhotometricInterpretation (0028,0004) = {photometric or 'missing'}, "
            f"SamplesPerPixel (0028,0002) = {samples}); a radiograph must be grayscale MONOCHROME1 or "
            "MONOCHROME2. Export the original grayscale image"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise InputError(
            f"{p}: holds {frames} frames (NumberOfFrames (0028,0008)); a radiograph is one frame. "
            "Split the file or export the frame you want"
        )
    stored = dicom.decode_pixels(ds, p)
    if stored.ndim != 2:
        raise InputError(f"{p}: decoded pixel array has shape {stored.shape}, expected (rows, cols)")
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    lo, hi = _modality_range(ds)
    voi_applied = False
    if apply_voi and ("VOILUTSequence" in ds or "WindowCenter" in ds):
        values = np.asarray(apply_voi_lut(values, ds, prefer_lut=True), dtype=np.float64)
        lo, hi = float(values.min()), float(values.max())
        voi_applied = True
    inverted = photometric == "MONOCHROME1"
    if inverted:
        values = (lo + hi) - values
    meta: dict[str, Any] = {
        "source_format": "dicom",
        "photometric_interpretation_in_file": photometric,
        "inverted_to_monochrome2": inverted,
        "voi_lut_applied": voi_applied,
        "value_range": [float(lo), float(hi)],
        "acquisition": dicom.acquisition_fields(ds),
        "warnings": [],
    }
    modality = str(ds.get("Modality", ""))
    if modality and modality not in RADIOGRAPH_MODALITIES:
        meta["warnings"].append(f"Modality (0008,0060) is {modality}, not a projection radiograph")
    return values.astype(np.float32), meta, _spacing_from_dicom(ds), dicom.float_tag(ds, "DistanceSourceToDetector")


def _modality_range(ds: Dataset) -> tuple[float, float]:
    """Range of values the modality LUT can output, from BitsStored and the rescale."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    smin, smax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if "ModalityLUTSequence" in ds:
        lut = np.asarray(apply_modality_lut(np.arange(smin, smax + 1), ds), dtype=np.float64)
        return float(lut.min()), float(lut.max())
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    a, b = smin * slope + intercept, smax * slope + intercept
    return (min(a, b), max(a, b))


def _read_raster(p: Path) -> tuple[np.ndarray, dict[str, Any], Any, float | None]:
    warnings: list[str] = []
    try:
        if p.name.lower().endswith((".tif", ".tiff")):
            import tifffile

            arr = np.asarray(tifffile.imread(p))
            mode = f"tiff {arr.dtype}"
        else:
            from PIL import Image

            with Image.open(p) as im:
                mode = im.mode
                if im.mode == "P":
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                arr = np.asarray(im)
            if mode in ("I", "I;16", "I;16B") and arr.size and arr.min() >= 0 and arr.max() <= 65535:
                arr = arr.astype(np.uint16)  # 16-bit PNG opens as 32-bit integers
    except Exception as exc:
        raise InputError(f"{p}: cannot read the image ({exc}); is it a valid PNG/JPEG/TIFF?") from None
    if arr.ndim == 3:
        channels = arr[..., :3] if arr.shape[-1] in (3, 4) else arr
        if arr.shape[-1] in (2, 4):
            warnings.append("alpha channel dropped")
        if arr.shape[-1] == 2:
            channels = arr[..., :1]
        if channels.shape[-1] == 3 and not (
            np.array_equal(channels[..., 0], channels[..., 1]) and np.array_equal(channels[..., 0], channels[..., 2])
        ):
            raise InputError(
                f"{p}: is a colour image ({mode}, channels differ); a radiograph must be grayscale. "
                "Export the original grayscale image (a colour rendering loses the detector values)"
            )
        if channels.shape[-1] == 3:
            warnings.append("grayscale stored as RGB: one channel kept")
        arr = channels[..., 0]
    if arr.ndim != 2:
        raise InputError(f"{p}: expected a 2-D grayscale image, got an array of shape {arr.shape}")
    if arr.dtype == np.uint8 and p.name.lower().endswith((".jpg", ".jpeg")):
        warnings.append("8-bit lossy JPEG: detector values are quantized and compressed")
    meta: dict[str, Any] = {
        "source_format": p.suffix.lower().lstrip("."),
        "raster_mode": mode,
        "bit_depth": int(arr.dtype.itemsize * 8),
        "photometric_interpretation_in_file": "MONOCHROME2 (assumed for raster images)",
        "inverted_to_monochrome2": False,
        "voi_lut_applied": False,
        "value_range": [float(np.iinfo(arr.dtype).min), float(np.iinfo(arr.dtype).max)]
        if np.issubdtype(arr.dtype, np.integer)
        else [float(arr.min()), float(arr.max())],
        "warnings": warnings,
    }
    return arr.astype(np.float32), meta, (None, None), None


def xray_summary(image: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
    """JSON summary of an ingested radiograph: geometry, intensity statistics, metadata."""
    return {
        "stage": "ingest_xray",
        "bmdpipe_version": __version__,
        "intensity_p01": float(np.percentile(image, 1)),
        "intensity_p50": float(np.percentile(image, 50)),
        "intensity_p99": float(np.percentile(image, 99)),
        **meta,
    }


def write_xray(image: np.ndarray, pixel_spacing_mm: tuple[float, float] | list[float], out: str | os.PathLike[str]) -> None:
    """Write a ``(rows, cols)`` float image as 2-D NIfTI with spacing ``(col, row)`` in mm, atomically."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(image, dtype=np.float32))
    img.SetSpacing((float(pixel_spacing_mm[1]), float(pixel_spacing_mm[0])))
    with atomic_path(out) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)


def load_xray(path: str | os.PathLike[str]) -> tuple[np.ndarray, tuple[float, float]]:
    """Read an ingested radiograph back: ``(rows, cols)`` float32 and ``(row, col)`` spacing in mm."""
    img = sitk.ReadImage(str(path))
    sx, sy = img.GetSpacing()
    return sitk.GetArrayFromImage(img).astype(np.float32), (sy, sx)


def ingest_xray(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    labels: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Read a radiograph (:func:`read_xray`, same keyword options) and write ``out`` (.nii.gz) plus its .json.

    Both files are written atomically; on an error neither exists. ``labels``
    (e.g. the sheet's patient_id and view) are added to the summary.

    Returns:
        The summary written to the JSON file.
    """
    out = Path(out)
    if not is_nifti(out):
        raise InputError(f"{out}: the output must end in .nii.gz or .nii")
    image, meta = read_xray(path, **options)
    summary = xray_summary(image, meta)
    summary.update(labels or {}, status="ok", code_version=STAGE_VERSION)
    write_xray(image, meta["pixel_spacing_mm"], out)
    write_json(json_path(out), summary)
    return summary
