"""Stage-3 regression (seed 004 §3.3) and the conventional baseline: BMD values straight from the radiograph.

Both regress the sheet's BMD columns (standardised with the training
views' mean and SD) with seed 004's sample-weighted L1 (Eq. 9–11; an empty
label weighs 0). Stage 3 inherits the stage-2 generator's encoder and
trains a transformer head on its 1/4-resolution features: first with the
encoder frozen (``frozen_epochs`` at ``lr``), then end to end
(``tune_epochs`` at ``tune_lr``). The baseline is a CNN on the crop.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bmdpipe import __version__
from bmdpipe.io.atomic import atomic_path, write_json
from bmdpipe.models.decomposition import build_generator
from bmdpipe.models.regression import RegressionHead, Regressor, conventional_regressor, weighted_l1
from bmdpipe.train.data import Augment, View, ViewDataset, augment
from bmdpipe.train.loop import (
    TrainConfig,
    TrainState,
    distributed_env,
    fit,
    is_main,
    seed_everything,
    setup_device,
    unwrap,
    update,
    wrap_ddp,
)
from bmdpipe.train.settings import REGRESSION_CODE_VERSION, STAGE_VERSION, TrainSettings


def build_regressor(arch: dict, generator: torch.nn.Module | None = None) -> torch.nn.Module:
    """A model from its description: ``{"kind": "stage3", "generator", "head", "feature_hw", "n_outputs"}``
    or ``{"kind": "baseline", "model", "n_outputs"}``.

    ``generator``: stage 3 inherits this generator's encoder (weights included); None builds a fresh one.
    """
    if arch["kind"] == "baseline":
        return conventional_regressor(arch["n_outputs"], arch["model"])
    gen = generator if generator is not None else build_generator(arch["generator"])
    head = RegressionHead(gen.feature_channels, tuple(arch["feature_hw"]), arch["n_outputs"], **arch["head"])
    return Regressor(gen.encoder, head)


def save_regressor(model: torch.nn.Module, arch: dict, norm: dict, path: str | os.PathLike[str], **extra) -> None:
    """``{"arch", "state_dict", "norm": {"columns", "mean", "sd"}, ...}`` written atomically."""
    with atomic_path(path) as tmp:
        torch.save({"arch": arch, "state_dict": unwrap(model).state_dict(), "norm": norm, **extra}, tmp)


def load_regressor(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """A model saved by :func:`save_regressor` (eval mode) and its payload; stage-3 heads saved before
    :class:`~bmdpipe.models.regression.RegressionHead` had ``pool_norm`` load with their LayerNorm."""
    payload = torch.load(path, map_location=device, weights_only=False)
    head = payload["arch"].get("head")
    if head is not None and "pool_norm" not in head:
        head["pool_norm"] = "head.norm.weight" in payload["state_dict"]
    model = build_regressor(payload["arch"])
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), payload


def label_norm(views: Sequence[View], columns: Sequence[str], index: Sequence[int] | None = None) -> dict:
    """Mean and SD per BMD column over the training views (labels are standardised with them).

    ``index``: positions of ``columns`` in each view's ``bmd`` (None: ``bmd`` holds exactly ``columns``).
    """
    bmd = np.stack([v.bmd for v in views])
    if index is not None:
        bmd = bmd[:, list(index)]
    mean = np.nanmean(bmd, axis=0)
    sd = np.nanstd(bmd, axis=0)
    return {"columns": list(columns), "mean": np.nan_to_num(mean).tolist(),
            "sd": np.where(np.nan_to_num(sd) > 0, np.nan_to_num(sd), 1.0).tolist()}


def train_regression(
    views: Sequence[View],
    columns: Sequence[str],
    out_dir: str | os.PathLike[str],
    work: str | os.PathLike[str],
    settings: TrainSettings,
    *,
    generator: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Train stage 3 (``generator`` = the stage-2 ``generator.pt``) or, without it, the baseline.

    Writes ``out_dir/model.pt``, ``metrics.csv`` (one per phase) and ``train.json``; returns ``model.pt``.
    """
    seed_everything(seed)
    device = setup_device(settings.device)
    h, w = settings.image_size
    if generator is not None:
        payload = torch.load(generator, map_location="cpu", weights_only=False)
        reg = settings.regression
        arch = {"kind": "stage3", "generator": payload["arch"], "feature_hw": [h // 4, w // 4],
                "n_outputs": len(columns), "head": {"dims": list(reg.dims), "depths": list(reg.depths),
                                                    "heads": list(reg.heads), "pool_norm": False}}
        gen = build_generator(payload["arch"])
        gen.load_state_dict(payload["state_dict"])
        model = build_regressor(arch, gen)
        phases = [("frozen", reg.frozen_epochs, reg.lr, True), ("tune", reg.tune_epochs, reg.tune_lr, False)]
        restart, wd = reg.restart_epochs, reg.weight_decay
    else:
        base = settings.baseline
        arch = {"kind": "baseline", "model": base.model, "n_outputs": len(columns)}
        model = build_regressor(arch)
        phases = [("train", base.epochs, base.lr, False)]
        restart, wd = base.restart_epochs, base.weight_decay
    norm = label_norm(views, columns)
    mean, sd = torch.tensor(norm["mean"]), torch.tensor(norm["sd"])
    data = ViewDataset(views)
    aug = Augment.from_config(settings.augment)
    out = Path(out_dir)
    start = time.perf_counter()
    history = []
    model = model.to(device)
    for name, epochs, lr, frozen in phases:
        if epochs <= 0:
            continue
        if isinstance(model, Regressor):
            model.freeze_encoder(frozen)
        net = wrap_ddp(model, device)
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=wd)
        sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=restart)
        state = TrainState({"model": net}, {"model": opt}, {"model": sched}, device=device)

        def train_step(state: TrainState, batch, net=net, opt=opt) -> dict[str, float]:
            x, bmd, weight = batch[0].to(device), batch[3].to(device), batch[4].to(device)
            x, _ = augment(x, [], aug)
            loss = weighted_l1(net(x).float(), (bmd - mean.to(device)) / sd.to(device), weight)
            update(loss, opt, state.scaler)
            return {"loss": loss.item()}

        cfg = TrainConfig(epochs=epochs, batch_size=settings.batch_size, seed=seed, amp=settings.amp)
        fit(state, data, train_step, cfg, Path(work) / name, progress=progress)
        model = unwrap(net)
        history += [{"phase": name, **row} for row in state.history]
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_regressor(model, arch, norm, out / "model.pt", image_size=[h, w])
        for name, *_ in phases:
            if (Path(work) / name / "metrics.csv").exists():
                shutil.copyfile(Path(work) / name / "metrics.csv", out / f"metrics_{name}.csv")
        write_json(out / "train.json", {
            "stage": "regression" if generator is not None else "baseline", "status": "ok",
            "code_version": STAGE_VERSION if generator is None else REGRESSION_CODE_VERSION,
            "bmdpipe_version": __version__, "columns": list(columns),
            "views": len(views), "patients": sorted({v.patient for v in views}),
            "generator": str(generator) if generator else None, "seconds": time.perf_counter() - start,
            "device": str(device), "processes": distributed_env()[1], "final": history[-1] if history else {},
        })
        shutil.rmtree(work, ignore_errors=True)
    return out / "model.pt"


@torch.no_grad()
def predict_bmd(model: torch.nn.Module, norm: dict, views: Sequence[View], *, batch_size: int = 8) -> np.ndarray:
    """BMD per view and column, ``(N, K)`` in the columns' units."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for i in range(0, len(views), batch_size):
        x = torch.from_numpy(np.stack([v.xray for v in views[i:i + batch_size]]))[:, None].to(device)
        out.append(model(x).float().cpu().numpy())
    pred = np.concatenate(out) if out else np.zeros((0, len(norm["columns"])), np.float32)
    return pred * np.asarray(norm["sd"]) + np.asarray(norm["mean"])
