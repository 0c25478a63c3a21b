"""Training the hierarchical decomposition GAN (seed 004 §3.2): stage 1 learns all bones, stage 2 the ROI.

Stage 1 maps the radiograph to the stage-1 target (one channel, g/cm²);
stage 2 starts from stage 1's weights (its single output filter copied to
each site channel) and maps it to the per-site ROI projections ``(S, H, W)``.
``stage2_from_scratch`` is the ablation without stage 1. The generator
trains against three-scale PatchGAN discriminators with seed 004's losses
(Eq. 1–8). Checkpoints go to a work folder so that a killed run resumes.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from bmdpipe import __version__
from bmdpipe.io.atomic import atomic_path, write_json
from bmdpipe.models.decomposition import Generator, MultiscaleDiscriminator, build_generator, widen_output
from bmdpipe.models.losses import discriminator_loss, generator_loss
from bmdpipe.train.data import Augment, View, ViewDataset, augment
from bmdpipe.train.loop import (
    TrainConfig,
    TrainState,
    fit,
    distributed_env,
    is_main,
    seed_everything,
    setup_device,
    unwrap,
    update,
    wrap_ddp,
)
from bmdpipe.train.settings import STAGE_VERSION, DecompositionSettings, TrainSettings

log = logging.getLogger(__name__)


def save_generator(generator: Generator, arch: dict, path: str | os.PathLike[str], **extra) -> None:
    """``{"arch", "state_dict", ...extra}`` written atomically."""
    with atomic_path(path) as tmp:
        torch.save({"arch": arch, "state_dict": unwrap(generator).state_dict(), **extra}, tmp)


def load_generator(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[Generator, dict]:
    """The generator saved by :func:`save_generator` (eval mode) and the saved payload."""
    payload = torch.load(path, map_location=device, weights_only=False)
    gen = build_generator(payload["arch"])
    gen.load_state_dict(payload["state_dict"])
    return gen.to(device).eval(), payload


def gan_step(gen: torch.nn.Module, disc: torch.nn.Module, opt_g: torch.optim.Optimizer,
             opt_d: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             dec: DecompositionSettings, scaler: Any = None) -> dict[str, float]:
    """One update of the discriminators, then of the generator (seed 004 Eq. 1–8).

    Args:
        x: ``(B, 1, H, W)`` radiographs; y: ``(B, C, H, W)`` targets, g/cm².
        scaler: the AMP gradient scaler (CUDA) or None.

    Returns:
        The losses: ``loss_d`` and ``loss_g_{total,gan,fm,l1,gc}``.
    """
    fake = gen(x)
    d_loss = discriminator_loss(disc(torch.cat([x, y], 1)), disc(torch.cat([x, fake.detach()], 1)))
    update(d_loss, opt_d, scaler)
    with torch.no_grad():
        d_real = disc(torch.cat([x, y], 1))
    parts = generator_loss(fake, y, disc(torch.cat([x, fake], 1)), d_real, lambda_fm=dec.lambda_fm,
                           lambda_l1=dec.lambda_l1, lambda_gc=dec.lambda_gc)
    update(parts["total"], opt_g, scaler)
    return {"loss_d": d_loss.item(), **{f"loss_g_{k}": v.item() for k, v in parts.items()}}


def train_stage(
    views: Sequence[View],
    stage: int,
    out_dir: str | os.PathLike[str],
    work: str | os.PathLike[str],
    settings: TrainSettings,
    *,
    init: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: bool = False,
    evaluate: Callable[[TrainState], dict[str, float]] | None = None,
) -> Path:
    """Train one stage on ``views``; write ``out_dir/generator.pt``, ``metrics.csv`` and ``train.json``.

    Args:
        views: training views (their ``bone`` or ``roi`` is the target).
        stage: 1 (all bones) or 2 (per-site ROI).
        work: checkpoint folder (resumed from when it holds ``last.pt``; removed after success).
        init: stage 1's ``generator.pt`` for stage 2 (None: from scratch).
        seed: of weights, batches and augmentation.
        evaluate: called after every epoch with the training state (the generator is ``state.modules["g"]``,
            ``state.epoch`` the epoch just trained, from 0); what it returns joins that epoch's row of
            ``metrics.csv`` (``benchmarks/training.py curve`` records held-out figures this way).

    Returns:
        ``out_dir/generator.pt``.
    """
    dec = settings.decomposition
    epochs = dec.stage1_epochs if stage == 1 else dec.stage2_epochs
    channels = 1 if stage == 1 else len(settings.sites)
    seed_everything(seed)
    device = setup_device(settings.device)
    arch = dec.arch(channels)
    gen = build_generator(arch)
    if init is not None:
        payload = torch.load(init, map_location="cpu", weights_only=False)
        gen.load_state_dict(widen_output(gen, payload["state_dict"], channels))
    disc = MultiscaleDiscriminator(1 + channels, dec.ndf, dec.n_layers, dec.num_d)
    gen, disc = wrap_ddp(gen, device), wrap_ddp(disc, device)
    opt_g = torch.optim.AdamW(gen.parameters(), lr=dec.lr, betas=(0.5, 0.999), weight_decay=dec.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=dec.lr, betas=(0.5, 0.999), weight_decay=dec.weight_decay)
    sched = {name: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=dec.restart_epochs)
             for name, o in (("g", opt_g), ("d", opt_d))}
    state = TrainState({"g": gen, "d": disc}, {"g": opt_g, "d": opt_d}, sched, device=device)
    aug = Augment.from_config(settings.augment)

    def train_step(state: TrainState, batch) -> dict[str, float]:
        x, bone, roi = (t.to(device) for t in batch[:3])
        x, (y,) = augment(x, [bone if stage == 1 else roi], aug)
        return gan_step(gen, disc, opt_g, opt_d, x, y, dec, state.scaler)

    cfg = TrainConfig(epochs=epochs, batch_size=settings.batch_size, seed=seed, amp=settings.amp)
    start = time.perf_counter()
    fit(state, ViewDataset(views), train_step, cfg, work, evaluate=evaluate, progress=progress)
    out = Path(out_dir)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_generator(gen, arch, out / "generator.pt", stage=stage, sites=list(settings.sites),
                       image_size=list(settings.image_size))
        shutil.copyfile(Path(work) / "metrics.csv", out / "metrics.csv")
        write_json(out / "train.json", {
            "stage": f"decomposition_stage{stage}", "status": "ok", "code_version": STAGE_VERSION,
            "bmdpipe_version": __version__, "epochs": epochs, "views": len(views),
            "patients": sorted({v.patient for v in views}), "init": str(init) if init else None,
            "seconds": time.perf_counter() - start, "device": str(device), "processes": distributed_env()[1],
            "final": state.history[-1] if state.history else {},
        })
        shutil.rmtree(work, ignore_errors=True)
    return out / "generator.pt"


@torch.no_grad()
def predict(generator: Generator, views: Sequence[View], *, batch_size: int = 8) -> np.ndarray:
    """The generator's images for ``views``: ``(N, C, H, W)`` float32, g/cm² (negative values set to 0)."""
    device = next(generator.parameters()).device
    generator.eval()
    out = []
    for i in range(0, len(views), batch_size):
        x = torch.from_numpy(np.stack([v.xray for v in views[i:i + batch_size]]))[:, None].to(device)
        out.append(generator(x).clamp_min(0).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1, 1, 1), np.float32)
