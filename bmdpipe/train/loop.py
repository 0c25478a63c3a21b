"""The epoch loop: seeded, resumable from the last checkpoint, single-process or DistributedDataParallel.

A method supplies a :class:`TrainState` (its modules, optimizers and
schedulers) and two functions, ``train_step(state, batch) -> dict`` and
``evaluate(state) -> dict``; :func:`fit` does the rest:

* seeds Python, NumPy and torch, and on the CPU asks torch for
  deterministic algorithms, so a run is reproducible;
* shuffles with a generator seeded by ``(seed, epoch)`` (a
  :class:`~torch.utils.data.distributed.DistributedSampler` under torchrun),
  so a resumed run sees the same batches as an uninterrupted one;
* after every epoch writes ``last.pt`` (all states, RNG states, history)
  atomically and rewrites ``metrics.csv`` from the history; on start it resumes from
  ``last.pt`` when present;
* uses AMP on CUDA; shows tqdm progress on rank 0.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from bmdpipe.io.atomic import atomic_path

log = logging.getLogger("bmdpipe")


@dataclass
class TrainConfig:
    """Settings of :func:`fit` (a training rule's config slice).

    Attributes:
        epochs: total epochs (a resumed run continues to this number).
        batch_size: per process.
        seed: seeds everything; the fold's seed.
        num_workers: DataLoader workers.
        amp: mixed precision on CUDA (ignored on the CPU).
    """

    epochs: int = 10
    batch_size: int = 4
    seed: int = 0
    num_workers: int = 0
    amp: bool = True


@dataclass
class TrainState:
    """What a checkpoint holds besides RNG states: named modules, optimizers, schedulers."""

    modules: dict[str, torch.nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    scaler: Any = None


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; deterministic algorithms on the CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


# --- distributed ----------------------------------------------------------------


def distributed_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (0, 1, 0 without it)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def resolve_device(prefer: str | torch.device = "auto", index: int | None = None) -> torch.device:
    """The torch device for a config value: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.

    Raises:
        RuntimeError: ``"cuda"`` without a GPU.
    """
    prefer = str(prefer)
    if prefer.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA GPU; set the device to auto or cpu")
    if prefer == "auto":
        prefer = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{index}" if prefer == "cuda" and index is not None else prefer)


def setup_device(prefer: str = "auto") -> torch.device:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on the CPU); pick the device.

    Args:
        prefer: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    """
    rank, world, local = distributed_env()
    device = resolve_device(prefer, local)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    return device


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module on ``device``, wrapped in DistributedDataParallel when a process group is up."""
    module = module.to(device)
    if dist.is_initialized() and dist.get_world_size() > 1 and any(p.requires_grad for p in module.parameters()):
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return module


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper; any other module (e.g. an ``AveragedModel``, which
    also has a ``.module``) as it is, so that its own state is what a checkpoint saves."""
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def make_loader(dataset: Dataset, cfg: TrainConfig, epoch: int, *, shuffle: bool = True) -> DataLoader:
    """Batches of ``dataset`` in an order fixed by ``(cfg.seed, epoch)``; sharded across ranks under torchrun."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=cfg.seed)
        sampler.set_epoch(epoch)
        return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers)
    generator = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=shuffle, generator=generator,
                      num_workers=cfg.num_workers)


def update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: Any = None) -> None:
    """One optimizer update from ``loss``: zero the gradients, backward, step; through the AMP gradient
    scaler when there is one (CUDA; :func:`fit` calls ``scaler.update()`` once per batch)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
    else:
        loss.backward()
        optimizer.step()


# --- checkpoints ------------------------------------------------------------------


def save_checkpoint(state: TrainState, path: Path) -> None:
    """All states and RNG states, written atomically."""
    payload = {
        "epoch": state.epoch,
        "history": state.history,
        "modules": {k: unwrap(m).state_dict() for k, m in state.modules.items()},
        "optimizers": {k: o.state_dict() for k, o in state.optimizers.items()},
        "schedulers": {k: s.state_dict() for k, s in state.schedulers.items()},
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(state: TrainState, path: Path) -> None:
    """Restore what :func:`save_checkpoint` wrote into ``state`` (in place)."""
    payload = torch.load(path, map_location=state.device, weights_only=False)
    for k, m in state.modules.items():
        unwrap(m).load_state_dict(payload["modules"][k])
    for k, o in state.optimizers.items():
        o.load_state_dict(payload["optimizers"][k])
    for k, s in state.schedulers.items():
        s.load_state_dict(payload["schedulers"][k])
    if state.scaler is not None and payload.get("scaler"):
        state.scaler.load_state_dict(payload["scaler"])
    state.epoch = int(payload["epoch"])
    state.history = list(payload["history"])
    random.setstate(payload["rng"]["python"])
    np.random.set_state(payload["rng"]["numpy"])
    torch.set_rng_state(payload["rng"]["torch"])


# --- the loop ---------------------------------------------------------------------


def fit(
    state: TrainState,
    dataset: Dataset,
    train_step: Callable[[TrainState, Any], dict[str, float]],
    cfg: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    evaluate: Callable[[TrainState], dict[str, float]] | None = None,
    progress: bool = True,
) -> TrainState:
    """Train ``state`` for ``cfg.epochs`` epochs, resuming from ``out_dir/last.pt`` when it exists.

    Writes ``out_dir/last.pt`` and ``out_dir/metrics.csv`` (rank 0 only).
    Per-epoch metrics are the batch means of what ``train_step`` returns,
    averaged over ranks, plus ``evaluate(state)`` and ``seconds``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "last.pt"
    if ckpt.exists():
        load_checkpoint(state, ckpt)
        log.info("resumed from %s after epoch %d of %d", ckpt, state.epoch, cfg.epochs)
    if state.device.type == "cuda" and cfg.amp and state.scaler is None:
        state.scaler = torch.amp.GradScaler("cuda")
    while state.epoch < cfg.epochs:
        epoch = state.epoch
        start = time.perf_counter()
        for m in state.modules.values():
            m.train()
        sums: dict[str, float] = {}
        n = 0
        batches = make_loader(dataset, cfg, epoch)
        if progress and is_main():
            from tqdm import tqdm

            batches = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        for batch in batches:
            with torch.autocast(state.device.type, enabled=state.device.type == "cuda" and cfg.amp):
                values = train_step(state, batch)
            if state.scaler is not None:
                state.scaler.update()
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
        for s in state.schedulers.values():
            s.step()
        row = {k: v / max(n, 1) for k, v in sums.items()}
        if dist.is_initialized() and dist.get_world_size() > 1 and row:
            keys = sorted(row)
            t = torch.tensor([row[k] for k in keys], dtype=torch.float64)
            dist.all_reduce(t)
            row = {k: float(v) / dist.get_world_size() for k, v in zip(keys, t)}
        if evaluate is not None:
            row.update(evaluate(state))
        state.epoch = epoch + 1
        row = {"epoch": state.epoch, **row, "seconds": time.perf_counter() - start}
        state.history.append(row)
        if is_main():
            save_checkpoint(state, ckpt)
            write_metrics(out / "metrics.csv", state.history)
        if dist.is_initialized():
            dist.barrier()
    return state


def write_metrics(path: Path, history: list[dict[str, float]]) -> None:
    """The whole history as CSV, written atomically (rewritten each epoch, so a resumed run stays consistent)."""
    fields = list(dict.fromkeys(k for row in history for k in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)
