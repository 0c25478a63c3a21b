"""Trained bone segmentation (Bayesian U-Net, MC dropout) and the segment stage, on a small simulated cohort.

The cohort (5 virtual patients, every one with a label map) is simulated at a
coarse CT resolution; the U-Net trains on four at 4 mm and segments the fifth.
The ≥ 30-patient figures at the default settings are in benchmarks/segmentation.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from bmdpipe.errors import InputError
from bmdpipe.io.ct import read_ct
from bmdpipe.models.segmentation import bayesian_unet, enable_mc_dropout, mc_dropout_predict
from bmdpipe.segment import BONE_LABELS, labels_from_map, read_label_table, resolve_method, segment_ct
from bmdpipe.segment_unet import (
    UNetSettings,
    evaluate,
    fit_unet,
    from_classes,
    load_segmenter,
    predict,
    to_classes,
    to_working,
    train_segmenter,
    working_grid,
)
from bmdpipe.simulate import truth_labels

from conftest import make_ct

#: Small and coarse enough to train in under a minute on one CPU thread (300 steps).
TINY = UNetSettings(spacing_mm=4.0, slice_spacing_mm=4.0, channels=(8, 16, 32, 64), patch_pixels=(64, 64),
                    batch_size=8, epochs=12, steps_per_epoch=25, learning_rate=5e-3, mc_samples=6)
COHORT = {"n_patients": 5, "seed": 3, "views": ["pa"], "label_fraction": 1.0, "elastic_mm": 0.0,
          "resolution": {"ct_downsample": 4, "detector_shape": [72, 80], "detector_pitch_mm": 4.8}}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from bmdpipe.simulate import simulate_cohort

    root = tmp_path_factory.mktemp("seg_cohort")
    simulate_cohort(root, COHORT)
    return root


def case(root, pid):
    return {"patient_id": pid, "ct": str(root / "ct" / pid), "labels": str(root / "labels" / f"{pid}.nii.gz"),
            "label_table": str(root / "labels" / "structures.csv")}


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("segmenter")
    cases = [case(cohort, p) for p in ("sim000", "sim001", "sim002", "sim003")]
    cases.append({**case(cohort, "sim004"), "labels": str(cohort / "labels" / "missing.nii.gz")})
    summary = train_segmenter(cases, out, TINY)
    return out, summary


def test_class_maps_round_trip():
    names = TINY.class_names
    assert names == ["background", "vertebra_T12", "vertebra_L1", "vertebra_L2", "vertebra_L3", "bone"]
    bone = np.array([0, BONE_LABELS["vertebra_T12"], BONE_LABELS["vertebra_L1"], BONE_LABELS["vertebra_T11"],
                     BONE_LABELS["rib"], BONE_LABELS["vertebra_L3"]], dtype=np.uint8)
    classes = to_classes(bone, TINY.vertebrae)
    np.testing.assert_array_equal(classes, [0, 1, 2, 5, 5, 4])
    back = from_classes(classes, TINY.vertebrae)
    np.testing.assert_array_equal(back, [0, BONE_LABELS["vertebra_T12"], BONE_LABELS["vertebra_L1"], BONE_LABELS["bone"],
                                         BONE_LABELS["bone"], BONE_LABELS["vertebra_L3"]])
    with pytest.raises(InputError, match=r"unknown vertebra name\(s\) \['L7'\]"):
        UNetSettings(vertebrae=("L1", "L7"))
    with pytest.raises(InputError, match="patch_pixels"):
        UNetSettings(patch_pixels=(100, 96))
    assert resolve_method("auto", has_labels=True, has_model=True) == "supplied"
    assert resolve_method("auto", has_labels=False, has_model=True) == "unet"
    assert resolve_method("auto", has_labels=False, has_model=False) == "threshold"


def test_working_grid_keeps_anatomy_in_place():
    """A bright block lands where it is in physical space, whatever the CT's direction and spacing."""
    ct = make_ct(size_xyz=(40, 36, 30), spacing=(1.2, 1.2, 2.0), direction=(1, 0, 0, 0, -1, 0, 0, 0, -1))
    arr = np.full((30, 36, 40), -1000, np.int16)
    arr[10:20, 5:15, 20:32] = 1000  # (z, y, x) voxels of the flipped grid
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ct)
    ref = working_grid(img, UNetSettings(spacing_mm=2.0, slice_spacing_mm=2.0))
    assert ref.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    assert all(s % 16 == 0 for s in ref.GetSize()[1:])
    work = to_working(img, ref)
    assert work.min() == pytest.approx(-1.0, abs=1e-3) and work.max() > 0.8
    centre_ijk = np.argwhere(work > 0.5).mean(axis=0)[::-1]  # x, y, z working voxels
    centre_world = np.array(ref.TransformContinuousIndexToPhysicalPoint(centre_ijk.tolist()))
    expected = np.array(img.TransformContinuousIndexToPhysicalPoint([25.5, 9.5, 14.5]))
    np.testing.assert_allclose(centre_world, expected, atol=1.0)

    # the shifted grids of inference (±1/4 voxel for two): moved by the shift, still covering the CT's box
    corners = np.array([img.TransformContinuousIndexToPhysicalPoint([float(c) for c in np.array(ijk) * np.array(img.GetSize()) - 0.5])
                        for ijk in np.ndindex(2, 2, 2)])
    for shift in (-0.25, 0.25):
        moved = working_grid(img, UNetSettings(spacing_mm=2.0, slice_spacing_mm=2.0), shift=shift)
        assert all(s % 16 == 0 for s in moved.GetSize()[1:])
        np.testing.assert_allclose(
            np.array(moved.GetOrigin()) - np.array(ref.GetOrigin()),
            shift * 2.0 - 0.5 * 2.0 * (np.array(moved.GetSize()) - np.array(ref.GetSize())), atol=1e-9)
        lo = np.array(moved.GetOrigin()) - 1.0
        hi = lo + np.array(moved.GetSize()) * 2.0
        assert (corners.min(axis=0) >= lo - 1e-6).all() and (corners.max(axis=0) <= hi + 1e-6).all()


def test_mc_dropout_statistics():
    torch.manual_seed(0)
    net = bayesian_unet(4, channels=(4, 8, 16), dropout=0.3, in_channels=3)
    x = torch.randn(2, 3, 32, 32)
    enable_mc_dropout(net)
    a = mc_dropout_predict(net, x, 5, generator_seed=7)
    b = mc_dropout_predict(net, x, 5, generator_seed=7)
    c = mc_dropout_predict(net, x, 5, generator_seed=8)
    assert torch.equal(a["probability"], b["probability"])  # seeded: reproducible
    assert not torch.equal(a["probability"], c["probability"])  # dropout is on
    assert a["probability"].shape == (2, 4, 32, 32)
    torch.testing.assert_close(a["probability"].sum(1), torch.ones(2, 32, 32))
    assert float(a["entropy"].max()) <= math.log(4) + 1e-5 and float(a["mutual_information"].min()) >= 0
    assert float(a["mutual_information"].mean()) > 1e-4
    assert torch.all(a["mutual_information"] <= a["entropy"] + 1e-6)
    net.eval()  # dropout off: the passes agree, no epistemic part
    d = mc_dropout_predict(net, x, 3)
    assert float(d["mutual_information"].max()) < 1e-5


def test_evaluate_on_known_errors():
    truth = np.zeros((4, 10, 10), np.uint8)
    truth[1:3, 2:6, 2:6] = BONE_LABELS["vertebra_L1"]  # 32 voxels
    pred = truth.copy()
    pred[1, 2, 2:6] = 0  # 4 voxels missed
    unc = (pred != truth).astype(np.float32)
    images = []
    for a in (pred, truth, unc):
        img = sitk.GetImageFromArray(a)
        img.SetSpacing((1.0, 1.0, 2.0))
        images.append(img)
    ev = evaluate(*images, vertebrae=("L1",))
    assert ev["dice"] == {"L1": pytest.approx(2 * 28 / (28 + 32))}
    assert ev["auroc_band"] == pytest.approx(1.0) and ev["auroc_field"] == pytest.approx(1.0)


def test_training_is_seeded(tmp_path):
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 6, size=(48, 48, 12)).astype(np.uint8)
    volume = ((classes > 0) * 0.8 - 0.1 + rng.normal(0, 0.05, classes.shape)).astype(np.float32), classes
    short = UNetSettings(**{**TINY.__dict__, "epochs": 1, "steps_per_epoch": 2})
    m1, h1 = fit_unet([volume], short, tmp_path / "a")
    m2, h2 = fit_unet([volume], short, tmp_path / "b")
    assert h1[0]["loss"] == h2[0]["loss"]
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(v1, v2), k


def test_trained_unet_segments_a_held_out_patient(cohort, trained):
    out, summary = trained
    assert summary["patients"] == ["sim000", "sim001", "sim002", "sim003"]
    assert "sim004" in summary["skipped"] and "label map not found" in summary["skipped"]["sim004"]
    assert summary["loss_per_epoch"][-1] < 0.6 * summary["loss_per_epoch"][0]
    assert (out / "model.pt").exists() and (out / "metrics.csv").exists()
    seg = load_segmenter(out)
    ct, _ = read_ct(cohort / "ct" / "sim004")
    pred, unc, info = predict(seg, ct)
    assert info["mc_samples"] == TINY.mc_samples and info["grids"] == TINY.inference_grids == 2
    assert pred.GetSize() == ct.GetSize() and pred.GetOrigin() == ct.GetOrigin()
    truth, _ = labels_from_map(truth_labels(cohort, "sim004"),
                               read_label_table(cohort / "labels" / "structures.csv"), ct)
    ev = evaluate(pred, truth, unc, TINY.vertebrae)
    # measured at these tiny settings (4 mm, 300 steps): Dice T12 0.71, L1 0.57, L2 0.53, L3 0.64, bone 0.63,
    # AUROC 0.72 (an untrained network: Dice ~0, AUROC ~0.5). Default settings: benchmarks/segmentation.py
    assert set(ev["dice"]) == {"T12", "L1", "L2", "L3"}
    assert min(ev["dice"].values()) > 0.35, ev
    assert ev["dice_bone"] > 0.5, ev
    assert ev["auroc_band"] > 0.65, ev
    u = sitk.GetArrayViewFromImage(unc)
    assert u.dtype == np.float32 and 0 <= u.min() and u.max() <= math.log(len(TINY.class_names)) + 1e-4
    # one grid, the same passes: a prediction of its own, as good within noise (the benchmark measures the gain)
    pred1, _, info1 = predict(seg, ct, grids=1)
    assert info1["grids"] == 1 and info1["mc_samples"] == TINY.mc_samples
    assert not np.array_equal(sitk.GetArrayViewFromImage(pred1), sitk.GetArrayViewFromImage(pred))
    assert min(evaluate(pred1, truth, unc, TINY.vertebrae)["dice"].values()) > 0.35


def test_segment_stage_outputs_and_methods(cohort, trained, tmp_path):
    from bmdpipe.cli import main

    out, _ = trained
    ct_dir = cohort / "ct" / "sim004"
    assert main(["segment", str(ct_dir), str(tmp_path / "unet"), "--model", str(out), "--mc-samples", "3"]) == 0
    summary = json.loads((tmp_path / "unet" / "segment.json").read_text())
    assert summary["method"] == "unet" and summary["status"] == "ok" and summary["mc_samples"] == 3
    assert {"vertebra_T12", "vertebra_L1", "vertebra_L2", "vertebra_L3", "bone"} <= set(summary["classes_present"])
    assert 0 < summary["uncertainty"]["mean_in_bone"] < math.log(6)
    assert (tmp_path / "unet" / "qc.png").stat().st_size > 5000
    labels = sitk.ReadImage(str(tmp_path / "unet" / "labels.nii.gz"))
    assert labels.GetPixelID() == sitk.sitkUInt8

    # supplied labels: translated, zero uncertainty
    table = cohort / "labels" / "structures.csv"
    s = segment_ct(ct_dir, tmp_path / "supplied", method="auto", labels=cohort / "labels" / "sim004.nii.gz",
                   label_table=table, tags={"patient_id": "sim004"})
    assert s["method"] == "supplied" and s["patient_id"] == "sim004" and "uncertainty" not in s
    assert s["structures_voxels"]["vertebra_L1"] > 100
    assert not sitk.GetArrayViewFromImage(sitk.ReadImage(str(tmp_path / "supplied" / "uncertainty.nii.gz"))).any()

    # threshold fallback warns; bones are not named
    t = segment_ct(ct_dir, tmp_path / "threshold", method="threshold")
    assert t["classes_present"] == ["bone"] and t["warnings"]


def test_segment_bad_input(cohort, tmp_path):
    ct_dir = cohort / "ct" / "sim004"
    table = tmp_path / "table.csv"
    table.write_text("value,name\n" + "\n".join(f"{v},{'L1' if n == 'vertebrae_L1' else n}" for v, n in
                                                 read_label_table(cohort / "labels" / "structures.csv").items()))
    with pytest.raises(InputError, match=r"sim004.nii.gz: structure 'L1' maps to 'vertebra_XX'"):
        segment_ct(ct_dir, tmp_path / "a", method="supplied", labels=cohort / "labels" / "sim004.nii.gz",
                   label_table=table, extra_names={"L1": "vertebra_XX"})
    with pytest.raises(InputError, match="needs a label map and a label table"):
        segment_ct(ct_dir, tmp_path / "b", method="supplied")
    with pytest.raises(InputError, match="no trained segmentation model"):
        segment_ct(ct_dir, tmp_path / "c", method="unet", model_dir=tmp_path)
    with pytest.raises(InputError, match=r"class\(es\) \['vertebra_L1'\] absent from every training label map"):
        train_segmenter([{**case(cohort, "sim000"), "label_table": str(table)}], tmp_path / "d", TINY)
    with pytest.raises(InputError, match="no usable training patient.*sim001: .*label map not found"):
        train_segmenter([{**case(cohort, "sim001"), "labels": str(tmp_path / "none.nii.gz")}], tmp_path / "e", TINY)
    assert not (tmp_path / "a").exists()
