"""A tiny training run through bmdpipe.train.loop, for the resume and DistributedDataParallel tests.

    python tests/train_tiny.py OUT_DIR [--epochs N] [--sleep S]
    torchrun --nproc_per_node 2 tests/train_tiny.py OUT_DIR

A small CNN learns the mean intensity of synthetic 16x16 images with AdamW and
cosine warm restarts. Writes OUT_DIR/last.pt, metrics.csv and, at the end,
final.pt (the model's weights) from rank 0.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch.utils.data import TensorDataset

from bmdpipe.train.loop import (
    TrainConfig,
    TrainState,
    fit,
    is_main,
    seed_everything,
    setup_device,
    unwrap,
    wrap_ddp,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per step, to give a test time to kill")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = TrainConfig(epochs=args.epochs, batch_size=8, seed=3)
    seed_everything(cfg.seed)
    device = setup_device()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(64, 1, 16, 16, generator=g)
    data = TensorDataset(images, images.mean(dim=(1, 2, 3)))
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 1))
    model = wrap_ddp(net, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=3)
    state = TrainState({"model": model}, {"model": opt}, {"model": sched}, device=device)

    def step(state: TrainState, batch) -> dict[str, float]:
        x, y = (t.to(device) for t in batch)
        loss = torch.nn.functional.l1_loss(model(x).squeeze(1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(args.sleep)
        return {"loss": loss.item()}

    fit(state, data, step, cfg, args.out, progress=False)
    if is_main():
        torch.save(unwrap(model).state_dict(), f"{args.out}/final.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
