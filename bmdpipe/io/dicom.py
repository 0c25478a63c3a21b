"""Reading DICOM files with errors a person can act on.

All DICOM access of the pipeline goes through this module so that

* every failure names the file and, where one is at fault, the DICOM tag;
* compressed transfer syntaxes decode through pydicom's pixel backends
  (pylibjpeg with its openjpeg, libjpeg and rle plugins);
* nothing that identifies a person leaves it: :func:`acquisition_fields`
  returns an allow-list of technical attributes only, never names, ids,
  dates, accession numbers or institutions.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from bmdpipe.errors import InputError

PIXEL_DATA_TAG = "Pixel Data (7FE0,0010)"

#: Attributes that identify a person or a visit (DICOM PS3.15 Annex E basic
#: profile, the ones pydicom-data's files carry). Used by tests to prove that
#: none of their values reach an output; nothing in bmdpipe copies them.
PHI_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "PhysiciansOfRecord",
    "StationName",
    "StudyID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "StudyTime",
    "DeviceSerialNumber",
    "RequestingPhysician",
)

#: Technical attributes that may be copied into a JSON summary: they describe
#: the acquisition, not the person. Values are converted to plain JSON types.
ACQUISITION_KEYWORDS: tuple[str, ...] = (
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "KVP",
    "XRayTubeCurrent",
    "Exposure",
    "ExposureTime",
    "ConvolutionKernel",
    "BodyPartExamined",
    "ViewPosition",
    "PatientOrientation",
    "Grid",
    "FilterType",
    "SliceThickness",
    "BitsStored",
    "PixelRepresentation",
    "PhotometricInterpretation",
    "LossyImageCompression",
    "DistanceSourceToDetector",
    "DistanceSourceToPatient",
    "EstimatedRadiographicMagnificationFactor",
)


def describe(path: str | os.PathLike[str]) -> str:
    """The path as it appears in messages."""
    return os.fspath(path)


def read_dataset(path: str | os.PathLike[str], *, header_only: bool = False) -> Dataset:
    """Read one DICOM file.

    Args:
        path: the file.
        header_only: defer the pixel data (large values are read on access),
            so that presence of Pixel Data can be checked cheaply.

    Raises:
        InputError: the path does not exist, is a folder, is not DICOM, or is
            truncated inside its header.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{describe(p)}: no such file; check the path in the samples sheet or on the command line")
    if p.is_dir():
        raise InputError(f"{describe(p)}: is a folder, expected a DICOM file")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(p, defer_size="1 KB" if header_only else None)
    except InvalidDicomError:
        raise InputError(
            f"{describe(p)}: not a DICOM file (no 'DICM' marker after the 128-byte preamble); "
            "give a DICOM file, or a PNG/JPEG/TIFF with a matching extension"
        ) from None
    except (EOFError, OSError, ValueError, KeyError) as exc:
        raise InputError(f"{describe(p)}: unreadable DICOM header, the file looks truncated or corrupt ({exc})") from None
    for w in caught:
        if "End of file reached" in str(w.message):
            raise InputError(
                f"{describe(p)}: truncated, the file ends inside a DICOM element ({w.message}); "
                "re-export it from the PACS"
            )
    return ds


def has_pixel_data(ds: Dataset) -> bool:
    """True when the dataset carries Pixel Data (or float pixel data)."""
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def require_pixel_data(ds: Dataset, path: str | os.PathLike[str]) -> None:
    """Raise :class:`InputError` naming the file when ``ds`` has no Pixel Data."""
    if not has_pixel_data(ds):
        sop = ds.get("SOPClassUID")
        kind = f" (SOP Class {sop.name})" if sop is not None else ""
        raise InputError(
            f"{describe(path)}: has no {PIXEL_DATA_TAG}{kind}; it is not an image. "
            "Point the samples sheet at the image file itself"
        )


def decode_pixels(ds: Dataset, path: str | os.PathLike[str]) -> np.ndarray:
    """Decode the stored pixel values, whatever the transfer syntax.

    Returns:
        The stored values, shape ``(rows, cols)`` or ``(frames, rows, cols)``
        (``(..., samples)`` for colour), in the stored integer dtype: no
        modality or VOI LUT applied.

    Raises:
        InputError: no Pixel Data, or it cannot be decoded (truncated file,
            missing codec).
    """
    require_pixel_data(ds, path)
    try:
        return ds.pixel_array
    except Exception as exc:  # pydicom raises many types from its backends
        ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        ts_name = ts.name if ts is not None else "unknown transfer syntax"
        raise InputError(
            f"{describe(path)}: cannot decode {PIXEL_DATA_TAG} ({ts_name}): {exc}. "
            "The file may be truncated; re-export it from the PACS"
        ) from None


def acquisition_fields(ds: Dataset) -> dict[str, Any]:
    """Technical attributes of ``ds`` from :data:`ACQUISITION_KEYWORDS`, as JSON types.

    Identifying attributes (:data:`PHI_KEYWORDS`) are never included.
    """
    out: dict[str, Any] = {}
    for kw in ACQUISITION_KEYWORDS:
        if kw in ds and ds[kw].value not in (None, ""):
            out[kw] = _plain(ds[kw].value)
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is not None:
        out["TransferSyntax"] = ts.name
        out["TransferSyntaxIsLossy"] = _is_lossy(ts)
    return out


def _is_lossy(ts: pydicom.uid.UID) -> bool:
    from pydicom import uid

    lossless = {
        uid.ExplicitVRLittleEndian,
        uid.ImplicitVRLittleEndian,
        uid.ExplicitVRBigEndian,
        uid.DeflatedExplicitVRLittleEndian,
        uid.RLELossless,
        uid.JPEGLossless,
        uid.JPEGLosslessSV1,
        uid.JPEGLSLossless,
        uid.JPEG2000Lossless,
    }
    return ts not in lossless


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return [_plain(v) for v in value]
    if isinstance(value, (pydicom.valuerep.DSfloat, pydicom.valuerep.DSdecimal, float)):
        return float(value)
    if isinstance(value, (pydicom.valuerep.IS, int)):
        return int(value)
    return str(value)


def float_tag(ds: Dataset, keyword: str) -> float | None:
    """A single positive number from ``keyword``, or None if absent, empty or not positive."""
    if keyword not in ds or ds[keyword].value in (None, ""):
        return None
    try:
        value = float(ds[keyword].value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
