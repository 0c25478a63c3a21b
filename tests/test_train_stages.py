"""Training stages of seed 004 on a synthetic targets cohort: data, augmentation, BMD fit, stages 1-3, baseline,
kill-and-resume of the GAN and the GAN under torchrun (2 CPU processes, gloo)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bmdpipe.evaluate.bmd import summarise
from bmdpipe.models.decomposition import Generator, widen_output
from bmdpipe.train import jobs
from bmdpipe.train.bmd_fit import fit_column, thresholded_means
from bmdpipe.train.data import Augment, augment, load_patient_views
from bmdpipe.train.decomposition import load_generator, predict, train_stage
from bmdpipe.train.regression import train_regression
from bmdpipe.train.settings import TrainSettings, work_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_targets import write_cohort  # noqa: E402

GAN_SCRIPT = Path(__file__).resolve().parent / "train_gan_tiny.py"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return write_cohort(tmp_path_factory.mktemp("synthetic"), n_patients=18)


def _settings(**decomposition) -> TrainSettings:
    return TrainSettings.from_config({
        "folds": 3, "image_size": [64, 64], "batch_size": 4, "device": "cpu",
        "decomposition": {"encoder": "hrnet_w18_small", "ngf": 8, "ndf": 8, "num_d": 2, "lr": 1e-3,
                          "restart_epochs": 50, **decomposition},
        "regression": {"dims": [16, 32], "heads": [2, 2], "frozen_epochs": 3, "tune_epochs": 1, "lr": 2e-3},
        "baseline": {"model": "resnet10t", "epochs": 3, "lr": 2e-3},
    })


def test_views_are_resized_by_area_and_keep_g_cm2_means(cohort):
    views = load_patient_views(cohort / "targets" / "s00", ["L2", "L1"], (32, 32))
    with np.load(cohort / "targets" / "s00" / "pa.npz") as z:
        full = z["roi_sites"]
    v = views[0]
    assert v.roi.shape == (2, 32, 32) and v.xray.shape == (32, 32)
    assert v.roi[1].mean() == pytest.approx(full[0].mean(), rel=1e-5)  # L1, reordered
    assert v.xray.mean() == pytest.approx(0, abs=1e-5) and v.xray.std() == pytest.approx(1, abs=1e-3)
    with pytest.raises(Exception, match="ROI sites \\['T12'\\] are not among"):
        load_patient_views(cohort / "targets" / "s00", ["T12"], (32, 32))


def test_augmentation_moves_targets_with_the_radiograph():
    torch.manual_seed(0)
    img = torch.zeros(8, 1, 64, 64)
    img[:, :, 20:30, 10:40] = 1.0
    aug = Augment(rotate_deg=25, shear_deg=9, translate=0.1, scale=0.3, hflip=True, vflip=True)
    x, (y,) = augment(img.clone(), [img.clone()], aug)
    assert not torch.allclose(x, img)  # it moved
    torch.testing.assert_close(x, y, atol=1e-5, rtol=0)  # radiograph and target together
    x2, (y2,) = augment(img.clone(), [img.clone()], Augment(brightness=0.5, contrast=0.5))
    torch.testing.assert_close(y2, img)  # intensity changes leave the g/cm² target alone
    assert not torch.allclose(x2, img)
    x3, _ = augment(img.clone(), [], Augment())
    torch.testing.assert_close(x3, img)


def test_bmd_fit_recovers_a_known_line_and_picks_the_bone_edge():
    rng = np.random.default_rng(0)
    n = 40
    density = rng.uniform(0.6, 1.2, n)
    yy, xx = np.mgrid[:32, :32]
    body = ((yy - 16) ** 2 + (xx - 16) ** 2 < 100).astype(float)
    halo = ((yy - 16) ** 2 + (xx - 16) ** 2 < 160).astype(float) - body
    images = np.stack([(d * body + rng.uniform(0.0, 0.3) * halo)[None] for d in density])  # (n, 1, 32, 32)
    bmd = 0.2 + 1.5 * density
    fit = fit_column(images, bmd, "dxa_L1", 0, [0.0, 0.35, 0.5])
    assert fit.threshold == 0.35  # above the halo, below every body
    assert fit.slope == pytest.approx(1.5, rel=0.02) and fit.intercept == pytest.approx(0.2, abs=0.02)
    assert fit.pcc_train > 0.999 and fit.curve["0"] < fit.pcc_train
    np.testing.assert_allclose(fit.apply(images), bmd, atol=1e-6)
    assert thresholded_means(np.zeros((1, 1, 4, 4)), 0.5)[0, 0] == 0
    with pytest.raises(ValueError, match="need at least 3"):
        fit_column(images[:2], bmd[:2], "dxa_L1", 0, [0.0])


def test_stage2_starts_from_stage1_in_every_site_channel():
    torch.manual_seed(0)
    g1 = Generator.hrnet("hrnet_w18_small", ngf=8, out_channels=1)
    g2 = Generator.hrnet("hrnet_w18_small", ngf=8, out_channels=3)
    g2.load_state_dict(widen_output(g2, g1.state_dict(), 3))
    x = torch.randn(2, 1, 64, 64)
    g1.eval(), g2.eval()
    with torch.no_grad():
        a, b = g1(x), g2(x)
    assert b.shape == (2, 3, 64, 64)
    for c in range(3):
        torch.testing.assert_close(b[:, c:c + 1], a)


def test_folds_leave_out_patients_without_views(cohort, tmp_path):
    targets = {p.name: p for p in sorted((cohort / "targets").iterdir())}
    bad = tmp_path / "s99"
    bad.mkdir()
    (bad / "targets.json").write_text(json.dumps({"status": "failed", "reason": "earlier stage register failed"}))
    no_roi = tmp_path / "s98"
    no_roi.mkdir()
    (no_roi / "targets.json").write_text(json.dumps({"status": "ok", "views": ["pa"], "roi_sites": [],
                                                     "warnings": ["no clinical ROI"]}))
    info = jobs.write_folds({**targets, "s99": bad, "s98": no_roi}, cohort / "samples.tsv", _settings(),
                            tmp_path / "folds.json")
    assert info["columns"] == ["dxa_L1", "dxa_L2", "dxa_L3", "qct_L1"]
    assert info["excluded"] == {"s99": "earlier stage register failed",
                                "s98": "no stage-2 target for ['L1', 'L2', 'L3']: no clinical ROI"}
    assert sorted(p for f in info["folds"].values() for p in f) == sorted(targets)
    with pytest.raises(ValueError, match="none of the BMD columns"):
        jobs.write_folds(targets, cohort / "samples.tsv", TrainSettings.from_config({"sites": ["T12"]}),
                         tmp_path / "f2.json")


def test_all_stages_train_and_the_decomposition_finds_the_sites(cohort, tmp_path):
    """Stage 1 → stage 2 → BMD fit, stage 3 and the baseline on fold 0; held-out predictions are written and scored."""
    torch.set_num_threads(2)
    settings = _settings(stage1_epochs=10, stage2_epochs=40)
    targets = {p.name: p for p in sorted((cohort / "targets").iterdir())}
    jobs.write_folds(targets, cohort / "samples.tsv", settings, tmp_path / "folds.json")
    train, test, columns = jobs.fold_views(tmp_path / "folds.json", 0, cohort / "targets", cohort / "samples.tsv",
                                           settings)
    assert {v.patient for v in train}.isdisjoint({v.patient for v in test})
    g1 = train_stage(train, 1, tmp_path / "s1", tmp_path / "w1", settings, seed=0)
    true = np.stack([v.roi for v in test]) >= 0.3

    def held_out_dice(gen):
        predicted = predict(gen, test) >= 0.3
        return 2 * (predicted & true).sum() / (predicted.sum() + true.sum())

    def every_20(state):  # what benchmarks/training.py curve hooks in: figures every 20 epochs
        return {} if (state.epoch + 1) % 20 else {"dice_test": held_out_dice(state.modules["g"])}

    g2 = train_stage(train, 2, tmp_path / "s2", tmp_path / "w2", settings, init=g1, seed=0, evaluate=every_20)
    assert not (tmp_path / "w2").exists()  # checkpoints are removed after success
    rows = list(csv.DictReader(open(tmp_path / "s2" / "metrics.csv")))
    assert len(rows) == 40 and float(rows[-1]["loss_g_l1"]) < 0.5 * float(rows[0]["loss_g_l1"])
    assert [r["epoch"] for r in rows if r["dice_test"]] == ["20", "40"]
    gen, payload = load_generator(g2)
    assert payload["stage"] == 2 and predict(gen, test).shape == (len(test), 3, 64, 64)
    # after 50 epochs on 24 views the held-out site images are in place (0.93 measured); their
    # density needs far more data and epochs (benchmarks: configs/benchmark.yaml)
    dice = held_out_dice(gen)
    assert dice > 0.85, dice
    assert float(rows[-1]["dice_test"]) == pytest.approx(dice, abs=1e-6)  # the saved generator is the one scored
    summary = jobs.bmd_fit_job(g2, train, test, columns, 0, settings, tmp_path / "bmd")
    assert [f["column"] for f in summary["fits"]] == columns
    accuracy = pd.read_csv(tmp_path / "bmd" / "decomposition.tsv", sep="\t")  # seed 004 Table 3, per view and site
    assert len(accuracy) == len(test) * len(settings.sites) and set(accuracy.method) == {"decomposition"}
    assert accuracy.dice.mean() > 0.7 and accuracy.psnr_db.mean() > 20  # 0.83 and 25.0 dB measured
    m3 = train_regression(train, columns, tmp_path / "reg", tmp_path / "wr", settings, generator=g2, seed=0)
    jobs.regression_predictions_job(m3, test, 0, "decomposition+regression", tmp_path / "reg" / "p.tsv")
    mb = train_regression(train, columns, tmp_path / "base", tmp_path / "wb", settings, seed=0)
    jobs.regression_predictions_job(mb, test, 0, "baseline", tmp_path / "base" / "p.tsv")
    assert (tmp_path / "reg" / "metrics_frozen.csv").exists() and (tmp_path / "reg" / "metrics_tune.csv").exists()
    predictions = pd.concat([pd.read_csv(p, sep="\t") for p in (tmp_path / "bmd" / "predictions.tsv",
                                                                tmp_path / "reg" / "p.tsv", tmp_path / "base" / "p.tsv")])
    table = summarise(predictions).set_index(["method", "column"])
    assert set(table.index.get_level_values(0)) == {"ceiling", "decomposition", "decomposition+regression", "baseline"}
    assert table.loc[("ceiling", "dxa_L1"), "pcc"] > 0.99  # the true ROI images carry the BMD
    assert table.loc[("decomposition", "dxa_L1"), "n_patients"] == len({v.patient for v in test})


def test_work_dir_depends_on_settings():
    assert work_dir("r", 0, {"a": 1}) == work_dir("r", 0, {"a": 1})
    assert work_dir("r", 0, {"a": 1}) != work_dir("r", 0, {"a": 2})


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_killed_gan_training_resumes_to_the_same_state(cohort, tmp_path):
    run = [sys.executable, str(GAN_SCRIPT), str(cohort)]
    subprocess.run([*run, str(tmp_path / "straight")], check=True, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*run, str(killed), "--sleep", "0.1"])
    deadline = time.monotonic() + 300
    metrics = killed / "work" / "metrics.csv"
    while time.monotonic() < deadline and (not metrics.exists() or len(_rows(metrics)) < 2):
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "model" / "generator.pt").exists()
    assert 2 <= len(_rows(metrics)) < 8
    subprocess.run([*run, str(killed)], check=True, timeout=600)  # resumes from work/last.pt
    a = torch.load(tmp_path / "straight" / "model" / "generator.pt", weights_only=False)["state_dict"]
    b = torch.load(killed / "model" / "generator.pt", weights_only=False)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    straight = _rows(tmp_path / "straight" / "model" / "metrics.csv")
    resumed = _rows(killed / "model" / "metrics.csv")
    assert [r["loss_g_total"] for r in resumed] == [r["loss_g_total"] for r in straight]


def test_training_jobs_under_torchrun_two_cpu_processes(cohort, tmp_path):
    """The rules' launch path with train.processes 2: GAN stage 1, stage 3 (frozen, then tuned) and the baseline,
    each in 2 gloo processes started by torchrun through bmdpipe.train.launch."""
    from bmdpipe.train.launch import launch

    config = {"folds": 3, "image_size": [64, 64], "batch_size": 2, "device": "cpu", "processes": 2,
              "decomposition": {"encoder": "hrnet_w18_small", "ngf": 8, "ndf": 8, "num_d": 1, "stage1_epochs": 2},
              "regression": {"dims": [16, 32], "heads": [2, 2], "frozen_epochs": 1, "tune_epochs": 1},
              "baseline": {"model": "resnet10t", "epochs": 1}}
    settings = TrainSettings.from_config(config)
    targets = {p.name: p for p in sorted((cohort / "targets").iterdir())}
    jobs.write_folds(targets, cohort / "samples.tsv", settings, tmp_path / "folds.json")
    job = {"folds": str(tmp_path / "folds.json"), "fold": 0, "targets_root": str(cohort / "targets"),
           "samples": str(cohort / "samples.tsv"), "settings": config, "code_version": "test"}
    log = tmp_path / "job.log"
    stage1 = tmp_path / "stage1"
    launch("bmdpipe.train.jobs:decomposition_fold_job",
           {**job, "stage": 1, "out": str(stage1), "checkpoints": str(tmp_path / "ck")},
           processes=2, threads=2, log_file=log)
    assert [int(r["epoch"]) for r in _rows(stage1 / "metrics.csv")] == [1, 2]
    info = json.loads((stage1 / "train.json").read_text())
    assert info["processes"] == 2 and info["status"] == "ok", info
    for method, generator in (("decomposition+regression", str(stage1 / "generator.pt")), ("baseline", None)):
        out = tmp_path / method
        launch("bmdpipe.train.jobs:regression_fold_job",
               {**job, "out": str(out), "checkpoints": str(tmp_path / "ck" / method), "method": method,
                "generator": generator}, processes=2, threads=2, log_file=log)
        info = json.loads((out / "train.json").read_text())
        assert info["processes"] == 2 and info["status"] == "ok", info
        predictions = pd.read_csv(out / "predictions.tsv", sep="\t")
        test_views = jobs.fold_views(tmp_path / "folds.json", 0, cohort / "targets", cohort / "samples.tsv",
                                     settings)[1]
        assert set(predictions.method) == {method} and predictions.view.nunique() > 0
        assert len(predictions) == sum(np.isfinite(v.bmd).sum() for v in test_views)
    assert "[rank 0]" in log.read_text() and "[rank 1]" not in log.read_text()
    with pytest.raises(RuntimeError, match="torchrun \\(2 processes\\)"):  # a failing rank fails the job
        launch("bmdpipe.train.jobs:decomposition_fold_job",
               {**job, "fold": 7, "stage": 1, "out": str(tmp_path / "bad"), "checkpoints": str(tmp_path / "ck")},
               processes=2, threads=2)
