"""`bmdpipe predict` with the model bundle of the tiny virtual run: new radiographs without CT → BMD per site.

The tiny run's models learn nothing useful (conftest.tiny_virtual_config); these tests check the path a
radiograph takes and what predict writes. How well the localiser places the field is measured on the demo
(results/models/localiser/fold*/localiser.json) and seconds per radiograph by benchmarks/predict.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from bmdpipe.predict import CSV_COLUMNS, Predictor, classify, predict_files
from conftest import REPO, output_bytes, phi_values, pydicom_file


@pytest.fixture(scope="module")
def bundle(virtual_run):
    return virtual_run["work"] / "results" / "model"


def _virtual_radiographs(virtual_run):
    return sorted((virtual_run["work"] / "resources" / "virtual_cohort" / "xray").glob("*.dcm"))


def test_the_run_exports_a_bundle_of_every_fold(bundle, virtual_run):
    meta = json.loads((bundle / "model.json").read_text())
    assert meta["folds"] == virtual_run["cfg"]["train"]["folds"] == 2
    folds = json.loads((bundle.parent / "dataset" / "folds.json").read_text())
    assert meta["columns"] == folds["columns"] == ["dxa_T12", "dxa_L1", "qct_L1"]
    assert meta["trained_on_patients"] == sum(len(v) for v in folds["folds"].values()) >= 2
    for k in range(2):
        assert {p.name for p in (bundle / f"fold{k}").iterdir()} == {
            "generator.pt", "bmd_fit.json", "regressor.pt", "localiser.pt"}
        fits = json.loads((bundle / f"fold{k}" / "bmd_fit.json").read_text())["fits"]
        assert all(len(f["train_range"]) == 2 for f in fits)
    held = meta["localiser_heldout"]
    assert [h["fold"] for h in held] == [0, 1] and all(h["n_views"] >= 1 for h in held)


def test_predict_cli_on_dicom_png_and_a_bad_file(bundle, virtual_run, tmp_path):
    """Virtual DICOM radiographs, one saved as PNG, and a file that is no image: rows for all, the bad one an error."""
    dcms = _virtual_radiographs(virtual_run)[:2]
    ds = pydicom.dcmread(dcms[0])
    png = tmp_path / "as_png.png"
    pixels = ds.pixel_array.astype(np.float64)
    Image.fromarray((255 * (pixels - pixels.min()) / np.ptp(pixels)).astype(np.uint8)).save(png)
    bad = tmp_path / "notes.dcm"
    bad.write_text("not a radiograph")
    out = tmp_path / "out" / "predictions.csv"
    proc = subprocess.run([sys.executable, "-m", "bmdpipe", "predict", "--model", str(bundle), *map(str, dcms),
                           str(png), str(bad), "--out", str(out), "--sex", "M"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["errors"] == 1
    table = pd.read_csv(out)
    assert list(table.columns) == CSV_COLUMNS
    err = table[table.status == "error"]
    assert len(err) == 1 and str(bad) in err.file.iloc[0] and "DICOM" in err.error.iloc[0]
    ok = table[table.status == "ok"]
    assert ok.file.nunique() == 3 and len(ok) == 3 * 3
    assert np.isfinite(ok.bmd).all() and np.isfinite(ok.bmd_decomposition).all()
    dxa = ok[ok.measure == "dxa"]
    assert np.isfinite(dxa.tscore).all() and set(dxa["class"]) <= {"normal", "osteopenia", "osteoporosis"}
    assert (ok.sex == "M").all() and (ok.sex_source == "--sex").all()
    assert set(ok.quality) <= {"ok", "flagged"} and (ok[ok.quality == "flagged"].reasons.str.len() > 0).all()
    for png_path in ok.decomposed_image.unique():
        strip = np.asarray(Image.open(png_path))
        assert strip.ndim == 2 and strip.shape[1] > 2 * strip.shape[0]  # crop | T12 | L1
    assert not list(out.parent.rglob("*.tmp*"))


def test_predict_on_the_real_chest_cr_rg1(bundle, tmp_path):
    """A radiograph nobody here made (pydicom-data RG1, JPEG 2000): no error; a physiological value or a flag."""
    rg1 = pydicom_file("RG1_J2KR.dcm")
    table = predict_files(bundle, [rg1], tmp_path / "rg1.csv")
    assert (table.status == "ok").all()
    for _, row in table.iterrows():
        lo, hi = (0.3, 1.8) if row.measure == "dxa" else (0.0, 350.0)
        assert row.quality == "flagged" or lo <= row.bmd <= hi, row.to_dict()
    # its header's PatientSex is used for the T-score; no identifying value reaches the outputs
    ds = pydicom.dcmread(rg1, stop_before_pixels=True)
    assert (table.sex_source == ("PatientSex (0010,0040)" if ds.get("PatientSex") in ("F", "M")
                                 else "unknown: female reference")).all()
    values = phi_values(ds)
    assert values
    for path, data in output_bytes(tmp_path):
        for value in values:
            assert value.encode() not in data, f"{value!r} found in {path}"


def test_quality_flags_catch_an_image_unlike_the_training_ones(bundle):
    """Flat noise has no spine: the prediction must be flagged, with the reasons named."""
    predictor = Predictor(bundle)
    noise = np.random.default_rng(0).normal(100.0, 1.0, size=(200, 180)).astype(np.float32)
    flags = predictor.quality_flags(predictor(noise))
    assert flags, "a noise image passed every quality check"


def test_classes_follow_who_and_acr():
    from bmdpipe.tscore import reference_table

    mu, sd = reference_table("seed000")["F"]["L1"]
    assert classify("dxa_L1", mu - 2.6 * sd, "F", "seed000") == (pytest.approx(-2.6), "osteoporosis")
    assert classify("dxa_L1", mu - 1.5 * sd, "F", "seed000")[1] == "osteopenia"
    assert classify("dxa_L1", mu, "M", "seed000") == (pytest.approx(0.0), "normal")
    assert classify("qct_L1", 79.0, "F", "seed000")[1] == "osteoporosis"
    assert classify("qct_L1", 100.0, "F", "seed000")[1] == "osteopenia"
    assert np.isnan(classify("qct_L1", 150.0, "F", "seed000")[0])


def test_a_folder_that_is_not_a_bundle_is_a_clear_error(tmp_path, bundle):
    from bmdpipe.errors import InputError

    with pytest.raises(InputError, match="no model.json"):
        Predictor(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    meta = json.loads((copy / "model.json").read_text())
    (copy / "model.json").write_text(json.dumps({**meta, "format": "other/9"}))
    with pytest.raises(InputError, match="format"):
        Predictor(copy)
