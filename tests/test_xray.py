"""Radiograph ingestion on real pydicom-data files and on bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pydicom
import pytest
import tifffile
from conftest import pydicom_file
from PIL import Image

from bmdpipe.cli import main as cli
from bmdpipe.errors import InputError
from bmdpipe.io import dicom
from bmdpipe.io.xray import ingest_xray, load_xray, read_xray


def test_rg1_uncompressed_and_jpeg2000_ingest_to_identical_pixels(tmp_path):
    a = ingest_xray(pydicom_file("RG1_UNCR.dcm"), tmp_path / "u.nii.gz", pixel_spacing_mm=0.2)
    b = ingest_xray(pydicom_file("RG1_J2KR.dcm"), tmp_path / "j.nii.gz", pixel_spacing_mm=0.2)
    img_u, spacing_u = load_xray(tmp_path / "u.nii.gz")
    img_j, _ = load_xray(tmp_path / "j.nii.gz")
    assert img_u.shape == (1955, 1841)
    assert np.array_equal(img_u, img_j)
    assert spacing_u == pytest.approx((0.2, 0.2))
    assert a["acquisition"]["TransferSyntax"] == "Explicit VR Little Endian"
    assert b["acquisition"]["TransferSyntaxIsLossy"] is False
    assert a["sdd_mm"] == pytest.approx(1996.0)  # DistanceSourceToDetector of RG1
    assert json.loads((tmp_path / "u.json").read_text())["status"] == "ok"


def test_monochrome1_is_inverted_over_the_stored_range():
    ds = pydicom.dcmread(pydicom_file("RG1_UNCR.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1" and int(ds.BitsStored) == 15
    stored = ds.pixel_array.astype(np.float64)
    image, meta = read_xray(pydicom_file("RG1_UNCR.dcm"), pixel_spacing_mm=0.2)
    assert meta["inverted_to_monochrome2"] is True
    np.testing.assert_array_equal(image, (2**15 - 1) - stored)
    # after inversion bone is bright: the spine column (centre) is brighter than the lung fields
    h, w = image.shape
    spine = np.median(image[h // 3 : 2 * h // 3, w // 2 - 40 : w // 2 + 40])
    lungs = np.median(np.concatenate([image[h // 3 : 2 * h // 3, w // 4 - 40 : w // 4 + 40],
                                      image[h // 3 : 2 * h // 3, 3 * w // 4 - 40 : 3 * w // 4 + 40]]))
    assert spine > lungs


def test_lossy_jpeg2000_is_flagged_and_close():
    exact, _ = read_xray(pydicom_file("RG1_UNCR.dcm"), pixel_spacing_mm=0.2)
    lossy, meta = read_xray(pydicom_file("RG1_J2KI.dcm"), pixel_spacing_mm=0.2)
    assert meta["acquisition"]["TransferSyntaxIsLossy"] is True
    assert np.mean(np.abs(exact - lossy)) < 0.02 * exact.std()  # measured 1.1 %
    assert np.corrcoef(exact.ravel(), lossy.ravel())[0, 1] > 0.999


def test_extremity_cr_needs_a_pixel_spacing_and_then_ingests(tmp_path):
    with pytest.raises(InputError, match=r"RG3_UNCR\.dcm: no usable pixel spacing.*xray_pixel_spacing_mm"):
        read_xray(pydicom_file("RG3_UNCR.dcm"))
    image, meta = read_xray(pydicom_file("RG3_UNCR.dcm"), default_pixel_spacing_mm=0.15)
    assert image.shape == (1760, 1760)
    assert meta["pixel_spacing_source"] == "config default"


def test_rg1_zero_pixel_spacing_is_an_error_naming_the_tag():
    with pytest.raises(InputError, match=r"RG1_J2KR\.dcm: no usable pixel spacing \(PixelSpacing \(0028,0030\) = \[0\.0, 0\.0\]\)"):
        read_xray(pydicom_file("RG1_J2KR.dcm"))


def test_pixel_spacing_from_imager_pixel_spacing(tmp_path):
    from bmdpipe.io.dicom_write import write_radiograph

    pixels = np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) % 4096
    write_radiograph(pixels, tmp_path / "dx.dcm", pixel_spacing_mm=(0.139, 0.143), sdd_mm=1800.0, sid_mm=1650.0)
    image, meta = read_xray(tmp_path / "dx.dcm")
    assert meta["pixel_spacing_mm"] == pytest.approx([0.139, 0.143])
    assert meta["pixel_spacing_source"].startswith("ImagerPixelSpacing")
    assert meta["sdd_mm"] == pytest.approx(1800.0)
    np.testing.assert_array_equal(image, pixels.astype(np.float32))


@pytest.mark.parametrize("compressed", ["emri_small_jpeg_ls_lossless.dcm", "emri_small_RLE.dcm"])
def test_jpeg_ls_and_rle_decode_to_the_uncompressed_pixels(compressed):
    reference = dicom.decode_pixels(pydicom.dcmread(pydicom_file("emri_small.dcm")), "emri_small.dcm")
    other = dicom.decode_pixels(pydicom.dcmread(pydicom_file(compressed)), compressed)
    assert reference.shape == (10, 64, 64)
    np.testing.assert_array_equal(reference, other)


def test_multiframe_file_is_rejected_as_a_radiograph():
    with pytest.raises(InputError, match=r"emri_small_RLE\.dcm: holds 10 frames \(NumberOfFrames \(0028,0008\)\)"):
        read_xray(pydicom_file("emri_small_RLE.dcm"), pixel_spacing_mm=1.0)


def test_png_8_and_16_bit_and_tiff_16_bit(tmp_path):
    rng = np.random.default_rng(1)
    img16 = rng.integers(0, 65535, size=(40, 30), dtype=np.uint16)
    img8 = (img16 >> 8).astype(np.uint8)
    Image.fromarray(img16).save(tmp_path / "a16.png")
    Image.fromarray(img8).save(tmp_path / "a8.png")
    tifffile.imwrite(tmp_path / "a16.tif", img16)
    Image.fromarray(img8).save(tmp_path / "a8.jpg", quality=95)
    for name, ref in (("a16.png", img16), ("a8.png", img8), ("a16.tif", img16)):
        image, meta = read_xray(tmp_path / name, pixel_spacing_mm=0.2)
        np.testing.assert_array_equal(image, ref.astype(np.float32))
        assert meta["bit_depth"] == ref.dtype.itemsize * 8
    jpeg, meta = read_xray(tmp_path / "a8.jpg", pixel_spacing_mm=0.2)
    assert jpeg.shape == (40, 30) and any("lossy JPEG" in w for w in meta["warnings"])


def test_gray_stored_as_rgb_is_accepted_colour_is_not(tmp_path):
    gray = np.random.default_rng(2).integers(0, 255, size=(20, 20), dtype=np.uint8)
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(tmp_path / "gray_rgb.png")
    image, meta = read_xray(tmp_path / "gray_rgb.png", pixel_spacing_mm=0.2)
    np.testing.assert_array_equal(image, gray)
    colour = np.stack([gray, gray[::-1], gray.T], axis=-1)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(InputError, match=r"colour\.png: is a colour image .*grayscale"):
        read_xray(tmp_path / "colour.png", pixel_spacing_mm=0.2)


def test_rgb_dicom_is_rejected_naming_the_tag():
    with pytest.raises(InputError, match=r"SC_rgb\.dcm: is a colour image \(PhotometricInterpretation \(0028,0004\) = RGB"):
        read_xray(pydicom_file("SC_rgb.dcm"), pixel_spacing_mm=0.2)


def test_truncated_dicom_names_the_file(tmp_path):
    data = pydicom_file("RG1_UNCR.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.dcm: .*(truncated|cannot decode Pixel Data)"):
        read_xray(tmp_path / "cut.dcm", pixel_spacing_mm=0.2)


def test_real_truncated_jpeg2000_file_names_the_file():
    with pytest.raises(InputError, match=r"emri_small_jpeg_2k_lossless_too_short\.dcm: truncated"):
        read_xray(pydicom_file("emri_small_jpeg_2k_lossless_too_short.dcm"), pixel_spacing_mm=0.2)


def test_not_dicom(tmp_path):
    (tmp_path / "notes.dcm").write_text("this is a radiology report, not an image\n" * 20)
    with pytest.raises(InputError, match=r"notes\.dcm: not a DICOM file"):
        read_xray(tmp_path / "notes.dcm", pixel_spacing_mm=0.2)


def test_dicom_without_pixel_data(tmp_path):
    ds = pydicom.dcmread(pydicom_file("RG3_UNCR.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "header_only.dcm")
    with pytest.raises(InputError, match=r"header_only\.dcm: has no Pixel Data \(7FE0,0010\)"):
        read_xray(tmp_path / "header_only.dcm", pixel_spacing_mm=0.2)


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match=r"nothere\.dcm: no such file"):
        read_xray(tmp_path / "nothere.dcm")


def test_bad_input_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(pydicom_file("SC_rgb.dcm"), tmp_path / "rgb.dcm")
    with pytest.raises(InputError):
        ingest_xray(tmp_path / "rgb.dcm", out / "x.nii.gz", pixel_spacing_mm=0.2)
    assert list(out.iterdir()) == []


def test_voi_lut_applied_only_when_asked():
    raw, meta_raw = read_xray(pydicom_file("RG1_UNCR.dcm"), pixel_spacing_mm=0.2)
    win, meta_win = read_xray(pydicom_file("RG1_UNCR.dcm"), pixel_spacing_mm=0.2, apply_voi=True)
    assert meta_raw["voi_lut_applied"] is False and meta_win["voi_lut_applied"] is True
    assert not np.array_equal(raw, win)


def test_cli_reports_bad_input_with_exit_status_2(tmp_path, capsys):
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 300)
    assert cli(["ingest-xray", str(tmp_path / "junk.dcm"), "--out", str(tmp_path / "x.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bmdpipe: error: ") and "junk.dcm: not a DICOM file" in err
    assert cli(["ingest-xray", str(pydicom_file("RG1_J2KR.dcm")), "--out", str(tmp_path / "x.nii.gz"), "--pixel-spacing", "0.2"]) == 0
    assert (tmp_path / "x.nii.gz").exists() and (tmp_path / "x.json").exists()
