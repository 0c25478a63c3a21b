"""Writing DICOM as a hospital would hand it over.

Used by the public demo cohort, the virtual-cohort simulator and the tests:
a CT volume becomes a CT Image Storage series (one file per slice, signed
16-bit, rescale to HU), a radiograph a Digital X-Ray image. The writers take
the identifying attributes as arguments so that tests can fill them with
values and prove none of them reaches the pipeline's outputs.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import DS

from bmdpipe.io.atomic import atomic_dir, atomic_path


def _ds(value: float) -> DS:
    return DS(float(value), auto_format=True)


def _base(sop_class: str, identity: dict[str, str], study_uid: str, series_uid: str, for_uid: str,
          sop_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = for_uid
    ds.PatientName = identity.get("PatientName", "ANONYMOUS")
    ds.PatientID = identity.get("PatientID", "ANONYMOUS")
    for keyword, value in identity.items():
        setattr(ds, keyword, value)
    today = _dt.date.today().strftime("%Y%m%d")
    ds.StudyDate = ds.get("StudyDate", today)
    return ds


def seeded_uids(namespace: str) -> Callable[[], str]:
    """A UID maker whose n-th UID depends only on ``namespace`` and n (reproducible files)."""
    counter = iter(range(10**12))
    return lambda: generate_uid(entropy_srcs=[namespace, str(next(counter))])


def write_ct_series(
    image: sitk.Image,
    folder: str | os.PathLike[str],
    *,
    identity: dict[str, str] | None = None,
    series_description: str = "CT",
    series_number: int = 1,
    kvp: float | None = 120.0,
    manufacturer: str = "bmdpipe",
    series_uid: str | None = None,
    study_uid: str | None = None,
    uid: Callable[[], str] = generate_uid,
) -> list[Path]:
    """Write a 3-D HU volume as a DICOM CT series, one file per slice.

    Args:
        image: HU volume; its origin and direction (LPS) become
            ImagePositionPatient and ImageOrientationPatient, its spacing
            PixelSpacing and the slice positions. Values are rounded to int16.
        folder: destination folder, written atomically (all slices or none).
        identity: identifying attributes to store (PatientName, PatientID,
            InstitutionName, ...): test data only.
        uid: makes each new UID (default random); a seeded one makes the
            files reproducible byte for byte.

    Returns:
        The slice files, in slice order.
    """
    identity = dict(identity or {})
    study_uid = study_uid or uid()
    series_uid = series_uid or uid()
    for_uid = uid()
    arr = sitk.GetArrayFromImage(image)  # (slices, rows, cols)
    hu = np.clip(np.rint(arr), -32768, 32767).astype(np.int16)
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = image.GetSpacing()
    origin = np.array(image.GetOrigin(), dtype=np.float64)
    row_dir, col_dir, slice_dir = direction[:, 0], direction[:, 1], direction[:, 2]
    files: list[Path] = []
    with atomic_dir(folder) as tmp:
        for k in range(hu.shape[0]):
            ds = _base(CTImageStorage, identity, study_uid, series_uid, for_uid, uid())
            ds.Modality = "CT"
            ds.Manufacturer = manufacturer
            ds.SeriesDescription = series_description
            ds.SeriesNumber = series_number
            ds.InstanceNumber = k + 1
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            if kvp is not None:
                ds.KVP = _ds(kvp)
            ds.SliceThickness = _ds(spacing[2])
            ds.ImagePositionPatient = [_ds(v) for v in origin + k * spacing[2] * slice_dir]
            ds.ImageOrientationPatient = [_ds(v) for v in np.concatenate([row_dir, col_dir])]
            ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
            ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[2])
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1
            ds.RescaleIntercept = 0
            ds.RescaleSlope = 1
            ds.RescaleType = "HU"
            ds.PixelData = np.ascontiguousarray(hu[k]).tobytes()
            name = f"CT{k + 1:04d}.dcm"
            ds.save_as(tmp / name, enforce_file_format=True)
            files.append(Path(folder) / name)
    return files


def write_radiograph(
    pixels: np.ndarray,
    path: str | os.PathLike[str],
    *,
    pixel_spacing_mm: tuple[float, float] | None,
    sdd_mm: float | None = None,
    sid_mm: float | None = None,
    identity: dict[str, str] | None = None,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    kvp: float | None = None,
    view_position: str = "PA",
    extra: dict[str, Any] | None = None,
    uid: Callable[[], str] = generate_uid,
) -> None:
    """Write a ``(rows, cols)`` unsigned-integer image as a DX DICOM file, atomically.

    Args:
        pixels: stored values, integers in ``[0, 2**bits_stored)``.
        pixel_spacing_mm: ``(row, col)`` detector pitch, written as
            ImagerPixelSpacing; None writes no spacing at all.
        sdd_mm, sid_mm: DistanceSourceToDetector and DistanceSourceToPatient.
        photometric: MONOCHROME1 or MONOCHROME2; the caller inverts values.
        extra: further attributes by keyword.
        uid: makes each new UID (see :func:`write_ct_series`).
    """
    arr = np.asarray(pixels)
    if arr.ndim != 2:
        raise ValueError(f"pixels must be (rows, cols), got {arr.shape}")
    if arr.min() < 0 or arr.max() >= 2**bits_stored:
        raise ValueError(f"pixels must lie in [0, {2**bits_stored}) for BitsStored {bits_stored}")
    ds = _base(DigitalXRayImageStorageForPresentation, dict(identity or {}), uid(), uid(), uid(), uid())
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ViewPosition = view_position
    if kvp is not None:
        ds.KVP = _ds(kvp)
    if pixel_spacing_mm is not None:
        ds.ImagerPixelSpacing = [_ds(pixel_spacing_mm[0]), _ds(pixel_spacing_mm[1])]
    if sdd_mm is not None:
        ds.DistanceSourceToDetector = _ds(sdd_mm)
    if sid_mm is not None:
        ds.DistanceSourceToPatient = _ds(sid_mm)
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(arr.astype(np.uint16)).tobytes()
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
