"""Training machinery: folds, kill-and-resume equals an uninterrupted run, torchrun with 2 CPU processes (gloo)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from bmdpipe.train.folds import make_folds, split
from bmdpipe.train.loop import unwrap

SCRIPT = Path(__file__).resolve().parent / "train_tiny.py"


def test_folds_are_patient_level_fixed_and_cover_everyone():
    patients = [f"p{i:02d}" for i in range(23)] * 3  # several radiographs per patient
    folds = make_folds(patients, 5, seed=1)
    assert folds == make_folds(list(reversed(patients)), 5, seed=1)
    flat = [p for f in folds.values() for p in f]
    assert sorted(flat) == sorted(set(patients)) and len(flat) == 23
    assert {len(f) for f in folds.values()} <= {4, 5}
    parts = split(folds, test_fold=2, n_val_folds=1)
    assert set(parts["test"]) == set(folds["2"]) and set(parts["val"]) == set(folds["3"])
    assert not set(parts["train"]) & (set(parts["test"]) | set(parts["val"]))
    assert make_folds(patients, 5, seed=2) != folds


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _run(out: Path, *extra: str, timeout: int = 300) -> None:
    subprocess.run([sys.executable, str(SCRIPT), str(out), *extra], check=True, timeout=timeout)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final.pt", weights_only=True)


def test_killed_training_resumes_to_the_same_state(tmp_path):
    _run(tmp_path / "straight")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(killed), "--sleep", "0.05"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill once two epochs are checkpointed, mid-way through the third
        rows = _rows(killed / "metrics.csv") if (killed / "metrics.csv").exists() else []
        if len(rows) >= 2:
            break
        time.sleep(0.05)
    time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final.pt").exists()
    assert 2 <= len(_rows(killed / "metrics.csv")) < 6
    _run(killed)  # resumes from last.pt
    a, b = _weights(tmp_path / "straight"), _weights(killed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    rows = _rows(killed / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    straight = _rows(tmp_path / "straight" / "metrics.csv")
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight]
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])


def test_torchrun_two_cpu_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           str(tmp_path / "ddp"), "--epochs", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(tmp_path / "ddp" / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert (tmp_path / "ddp" / "final.pt").exists()
    # unwrap() took the DDP wrapper off: the weights and the checkpoint carry the bare network's keys
    bare = {"0.weight", "0.bias", "1.weight", "1.bias", "5.weight", "5.bias"}
    assert set(torch.load(tmp_path / "ddp" / "final.pt")) == bare
    assert set(torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)["modules"]["model"]) == bare


def test_unwrap_strips_only_distributed_data_parallel():
    """An AveragedModel also has ``.module``; unwrapping it would drop its ``n_averaged`` from checkpoints.
    (The DDP path is checked in test_torchrun_two_cpu_processes.)"""
    net = torch.nn.Linear(2, 1)
    averaged = torch.optim.swa_utils.AveragedModel(net)
    assert unwrap(net) is net
    assert unwrap(averaged) is averaged
    assert "n_averaged" in unwrap(averaged).state_dict()
