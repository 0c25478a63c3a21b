"""Reading the virtual cohort's truth back (benchmarks and tests; the pipeline never reads truth/)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def truth_labels(cohort_dir: str | os.PathLike[str], patient: str) -> sitk.Image:
    """The true label map of a virtual patient, in TotalSegmentator's scheme, placed in the patient's physical space.

    The simulator records that a patient's labels are its anatomy variant's
    label map (``truth/labels_{base}_e{seed}.nii.gz``), mirrored along x when
    ``mirrored``, with the base's origin and direction and the patient's CT
    spacing. The ingested CT may order its slices the other way, so place it on
    a CT grid by geometry (:func:`bmdpipe.segment.labels_from_map` resamples),
    and read its values with ``labels/structures.csv``.
    """
    root = Path(cohort_dir)
    info = json.loads((root / "truth" / f"{patient}.json").read_text())["labels"]
    img = sitk.ReadImage(str(root / info["file"]))
    arr = sitk.GetArrayFromImage(img)
    if info.get("mirrored"):
        arr = arr[:, :, ::-1]
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    out.SetOrigin(img.GetOrigin())
    out.SetDirection(img.GetDirection())
    out.SetSpacing([float(v) for v in info.get("ct_spacing_mm", img.GetSpacing())])
    return out
