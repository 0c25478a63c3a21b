"""A tiny decomposition-GAN training run (bmdpipe.train.decomposition.train_stage) for the resume and DDP tests.

    python tests/train_gan_tiny.py DATA OUT [--epochs N] [--sleep S]
    torchrun --nproc_per_node 2 tests/train_gan_tiny.py DATA OUT

DATA is a cohort from tests/synthetic_targets.py. Trains stage 1 on fold 0's training
patients into OUT/model (checkpoints in OUT/work).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bmdpipe.train import decomposition
from bmdpipe.train.jobs import fold_views, write_folds
from bmdpipe.train.settings import TrainSettings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per step, to give a test time to kill")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data, out = Path(args.data), Path(args.out)
    settings = TrainSettings.from_config({
        "folds": 3, "image_size": [64, 64], "batch_size": 4, "device": "cpu",
        "augment": {"rotate_deg": 10, "translate": 0.05, "scale": 0.1, "brightness": 0.3, "contrast": 0.3,
                    "hflip": True},
        "decomposition": {"encoder": "hrnet_w18_small", "ngf": 8, "ndf": 8, "num_d": 2, "stage1_epochs": args.epochs,
                          "restart_epochs": 4, "lr": 1e-3},
    })
    targets = {p.name: p for p in sorted((data / "targets").iterdir())}
    folds = out / "folds.json"
    if not folds.exists() and (not dist.is_available() or int(__import__("os").environ.get("RANK", 0)) == 0):
        write_folds(targets, data / "samples.tsv", settings, folds)
    while not folds.exists():
        time.sleep(0.05)
    train, _, _ = fold_views(folds, 0, data / "targets", data / "samples.tsv", settings)
    if args.sleep:
        original = decomposition.augment

        def slow(*a, **k):
            time.sleep(args.sleep)
            return original(*a, **k)

        decomposition.augment = slow
    decomposition.train_stage(train, 1, out / "model", out / "work", settings, seed=5)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
