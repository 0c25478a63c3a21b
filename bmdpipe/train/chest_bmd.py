"""Seed 000's five models trained on the shared folds (Wang et al. §III-C to §III-E).

Every registered radiograph of a fold becomes the inputs of the five models (:data:`VARIANTS`):

* ``whole``: the whole radiograph resized to ``S × S``;
* ``patches``: the whole radiograph resized to ``3S × 3S`` and cut into its 3 × 3 patches;
* ``rois``: the 14 crops of :func:`bmdpipe.chest_landmarks.roi_boxes` around the 16 landmarks that the
  fold's landmark detector (:mod:`bmdpipe.train.chest`) finds on the radiograph, each resized to ``S × S``,
  plus the whole image (15 inputs). Training and held-out radiographs are cropped the same way, at the
  detected landmarks (a new radiograph has no CT), as seed 000 cropped at its detector's landmarks.

Each input is standardised on its own (zero mean, unit SD). Labels are the sheet's BMD columns of the
folds file, standardised with the training views' mean and SD. The loss is seed 000's L2 on the global
prediction plus, for the attentive models, the L2 of every local regressor (:func:`multiroi_loss`).
Training uses the shared epoch loop (:func:`bmdpipe.train.loop.fit`: seeded, resumable).

A held-out patient is predicted by the one fold model that did not see it (K-fold cross-validation), so
every patient gets one out-of-fold prediction per view, like the decomposition methods'.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from bmdpipe.chest_landmarks import ROIS, roi_boxes
from bmdpipe.evaluate.metrics import pcc
from bmdpipe.io.atomic import atomic_path
from bmdpipe.io.xray import load_xray
from bmdpipe.models.multiroi import VARIANTS, build_chest_model, multiroi_loss
from bmdpipe.train.data import Augment, _resize, augment, standardise
from bmdpipe.train.loop import TrainConfig, TrainState, fit, seed_everything, setup_device, update
from bmdpipe.train.regression import label_norm
from bmdpipe.train.settings import ChestBmdSettings

#: Input kinds of the variants, in the order they are made.
KINDS = ("whole", "patches", "rois")


@dataclass
class ChestView:
    """One radiograph as seed 000's models see it.

    Attributes:
        inputs: kind → ``(N, S, S)`` float32 (``whole`` N = 1, ``patches`` N = 9, ``rois`` N = 15: the 14 ROIs
            in :data:`bmdpipe.chest_landmarks.ROIS` order, then the whole image).
        bmd: ``(K,)`` the patient's labels of the fold's BMD columns (NaN where the sheet has none).
        landmark_confidence: ``(16,)`` the detector's heatmap peaks (empty without a detector).
    """

    patient: str
    view: str
    inputs: dict[str, np.ndarray]
    bmd: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    landmark_confidence: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


def chest_inputs(image: np.ndarray, size: int, kinds: Sequence[str],
                 points_rows_cols: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The models' inputs from a whole radiograph.

    Args:
        image: ``(rows, cols)`` ingested radiograph (any intensity scale).
        size: S, pixels.
        kinds: which of :data:`KINDS` to make.
        points_rows_cols: ``(16, 2)`` landmarks in radiograph pixels (needed for ``rois``).

    Returns:
        kind → ``(N, S, S)`` float32, each input standardised.

    Raises:
        ValueError: ``rois`` asked for without landmarks.
    """
    image = np.asarray(image, dtype=np.float32)
    whole = standardise(_resize(image, (size, size)))
    out: dict[str, np.ndarray] = {}
    if "whole" in kinds:
        out["whole"] = whole[None]
    if "patches" in kinds:
        big = _resize(image, (3 * size, 3 * size))
        out["patches"] = np.stack([standardise(big[r * size:(r + 1) * size, c * size:(c + 1) * size])
                                   for r in range(3) for c in range(3)])
    if "rois" in kinds:
        if points_rows_cols is None:
            raise ValueError("the ROI inputs need the 16 chest landmarks of the radiograph")
        boxes = roi_boxes(points_rows_cols, image.shape)
        crops = []
        for name, _ in ROIS:
            box = boxes[name]
            crops.append(np.zeros((size, size), np.float32) if box is None else
                         standardise(_resize(image[box[0]:box[1], box[2]:box[3]], (size, size))))
        out["rois"] = np.stack([*crops, whole])
    return out


def load_chest_views(patients: Sequence[str], targets_root: str | os.PathLike[str],
                     xray_root: str | os.PathLike[str], labels: Mapping[str, np.ndarray], size: int,
                     kinds: Sequence[str], detector: str | os.PathLike[str] | None = None,
                     device: str = "cpu") -> list[ChestView]:
    """Every view the targets stage made for ``patients`` (whole radiographs from ``xray_root``), as
    :class:`ChestView` with ``labels[patient]``; ``detector`` (a landmark ``model.pt``) places the ROIs."""
    from bmdpipe.train.chest import detect, load_detector
    from bmdpipe.train.localise import letterbox

    model, payload = load_detector(detector, device) if detector is not None else (None, None)
    out = []
    for p in patients:
        summary = json.loads((Path(targets_root) / p / "targets.json").read_text())
        for view in summary.get("views", []) if summary.get("status") == "ok" else []:
            image, _ = load_xray(Path(xray_root) / p / f"{view}.nii.gz")
            points = confidence = None
            if model is not None:
                grid, lb = letterbox(image, payload["arch"]["size"])
                points, confidence = detect(model, payload, grid, lb)
            out.append(ChestView(p, view, chest_inputs(image, size, kinds, points), labels[p],
                                 np.zeros(0, np.float32) if confidence is None else confidence.astype(np.float32)))
    return out


class ChestDataset(Dataset):
    """``(inputs (N, 1, S, S), bmd (K,), mask (K,))`` of one input kind; NaN labels weigh 0 (``mask``)."""

    def __init__(self, views: Sequence[ChestView], kind: str, columns: Sequence[int] | None = None) -> None:
        self.x = [torch.from_numpy(v.inputs[kind])[:, None] for v in views]
        bmd = np.stack([v.bmd for v in views]).astype(np.float32)
        if columns is not None:
            bmd = bmd[:, list(columns)]
        self.mask = torch.from_numpy(np.isfinite(bmd).astype(np.float32))
        self.bmd = torch.from_numpy(np.nan_to_num(bmd, nan=0.0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.x[i], self.bmd[i], self.mask[i]


def chest_optimizer(model: torch.nn.Module, variant: str, settings: ChestBmdSettings):
    """``(AdamW, cosine warm restarts stepped per epoch)`` for a model of ``variant``: ``settings.attentive_lr``
    for the attentive variants when set, else ``settings.lr``."""
    lr = settings.attentive_lr if VARIANTS[variant][2] and settings.attentive_lr is not None else settings.lr
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=settings.weight_decay)
    return opt, torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=settings.restart_epochs)


def train_chest_model(views: Sequence[ChestView], variant: str, columns: Sequence[str], column_index: Sequence[int],
                      out_path: str | os.PathLike[str], work: str | os.PathLike[str], settings: ChestBmdSettings,
                      *, device: str = "auto", seed: int = 0, progress: bool = False) -> dict:
    """Train one model of ``variant`` for the BMD columns ``column_index`` of the views' labels.

    Writes ``out_path`` (``{"arch", "state_dict", "norm": {"columns", "mean", "sd"}}``) and, beside it,
    ``{stem}_metrics.csv``; returns the last epoch's metrics and the seconds taken.
    """
    seed_everything(seed)
    dev = setup_device(device)
    kind = VARIANTS[variant][0]
    arch = {"variant": variant, "n_outputs": len(column_index), "width": settings.width, "hidden": settings.hidden,
            "batch_norm": settings.batch_norm, "activation": settings.activation, "layers": settings.layers,
            "heads": settings.heads, "feedforward": settings.feedforward, "dropout": settings.dropout,
            "pooling": settings.pooling, "input_size": settings.input_size}
    model = build_chest_model(arch).to(dev)
    norm = label_norm(views, [columns[k] for k in column_index], column_index)
    m, s = torch.tensor(norm["mean"], device=dev), torch.tensor(norm["sd"], device=dev)
    opt, sched = chest_optimizer(model, variant, settings)
    state = TrainState({"model": model}, {"model": opt}, {"model": sched}, device=dev)
    aug = Augment.from_config(settings.augment)

    def train_step(state: TrainState, batch) -> dict[str, float]:
        x, bmd, mask = (t.to(dev) for t in batch)
        b, n = x.shape[:2]
        x = augment(x.flatten(0, 1), [], aug)[0].view(b, n, *x.shape[2:])
        out = model(x)
        pred, local = out if isinstance(out, tuple) else (out, None)
        loss = multiroi_loss(pred.float(), None if local is None else local.float(), (bmd - m) / s,
                             settings.local_weight, mask)
        update(loss, opt, state.scaler)
        return {"loss": loss.item()}

    start = time.perf_counter()
    cfg = TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size, seed=seed)
    fit(state, ChestDataset(views, kind, column_index), train_step, cfg, work, progress=progress)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        torch.save({"arch": arch, "state_dict": model.state_dict(), "norm": norm}, tmp)
    if (Path(work) / "metrics.csv").exists():
        shutil.copyfile(Path(work) / "metrics.csv", out.with_name(f"{out.stem}_metrics.csv"))
    return {**(state.history[-1] if state.history else {}), "seconds": time.perf_counter() - start}


def load_chest_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    payload = torch.load(path, map_location=device, weights_only=False)
    model = build_chest_model(payload["arch"])
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), payload


@torch.no_grad()
def chest_outputs(model: torch.nn.Module, payload: dict, views: Sequence[ChestView], *,
                  batch_size: int = 16) -> tuple[np.ndarray, np.ndarray | None]:
    """One pass of the model over ``views``: the global predictions ``(N, K)`` and, for an attentive variant, the
    local regressors' ``(N, inputs, K)`` (None for a plain one), both in the columns' units."""
    device = next(model.parameters()).device
    kind = VARIANTS[payload["arch"]["variant"]][0]
    glob, local = [], []
    for i in range(0, len(views), batch_size):
        x = torch.from_numpy(np.stack([v.inputs[kind] for v in views[i:i + batch_size]]))[:, :, None].to(device)
        pred = model(x)
        glob.append((pred[0] if isinstance(pred, tuple) else pred).float().cpu().numpy())
        if isinstance(pred, tuple):
            local.append(pred[1].float().cpu().numpy())
    mean, sd = np.asarray(payload["norm"]["mean"]), np.asarray(payload["norm"]["sd"])
    g = np.concatenate(glob) if glob else np.zeros((0, len(payload["norm"]["columns"])), np.float32)
    return g * sd + mean, (np.concatenate(local) * sd + mean if local else None)


def predict_chest(model: torch.nn.Module, payload: dict, views: Sequence[ChestView], *,
                  batch_size: int = 16) -> np.ndarray:
    """BMD per view and column of the model, ``(N, K)`` in the columns' units (the global regressor only)."""
    return chest_outputs(model, payload, views, batch_size=batch_size)[0]


def input_names(variant: str) -> list[str]:
    """Names of a variant's inputs in model order: the 14 ROIs of :data:`bmdpipe.chest_landmarks.ROIS` and
    ``whole``, the 3 × 3 ``patch_{row}{col}``, or ``whole``."""
    kind = VARIANTS[variant][0]
    if kind == "rois":
        return [name for name, _ in ROIS] + ["whole"]
    return [f"patch_{r}{c}" for r in range(3) for c in range(3)] if kind == "patches" else ["whole"]


def local_agreement(local: np.ndarray | None, truth: np.ndarray, variant: str,
                    columns: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """What each input tells alone: PCC between an attentive model's local regressor of each input and the labels
    (seed 000 uses the local regressors in training only; here they show which ROIs carry BMD).

    Args:
        local: ``(N, inputs, K)`` local predictions (:func:`chest_outputs`); None for a plain variant.
        truth: ``(N, K)`` the views' labels of the model's ``columns`` (NaN where none).

    Returns:
        input name (:func:`input_names`) → column → PCC over the views with that label (None with fewer than 3
        or a constant); empty for a plain variant.
    """
    if local is None or not len(local):
        return {}
    out: dict[str, dict[str, float | None]] = {}
    for i, name in enumerate(input_names(variant)):
        out[name] = {}
        for k, column in enumerate(columns):
            ok = np.isfinite(truth[:, k])
            y, p = truth[ok, k], local[ok, i, k]
            out[name][column] = pcc(y, p) if len(y) >= 3 and np.ptp(y) > 0 and np.ptp(p) > 0 else None
    return out


def landmark_table(views: Sequence[ChestView], fold: int, low: float) -> pd.DataFrame:
    """Per view: the detector's lowest and median landmark confidence and whether it is below ``low``
    (seed 000's bad-input case: ROIs cut at landmarks the detector was unsure of)."""
    rows = [{"patient_id": v.patient, "view": v.view, "fold": fold,
             "confidence_min": float(v.landmark_confidence.min()),
             "confidence_median": float(np.median(v.landmark_confidence)),
             "flagged": bool(v.landmark_confidence.min() < low)} for v in views if v.landmark_confidence.size]
    return pd.DataFrame(rows, columns=["patient_id", "view", "fold", "confidence_min", "confidence_median", "flagged"])


def summary_row(variant: str, kind: str, trained: Sequence[dict]) -> dict:
    return {"variant": variant, "inputs": kind, "n_inputs": VARIANTS[variant][1], "attentive": VARIANTS[variant][2],
            "models": len(trained), "seconds": float(sum(t["seconds"] for t in trained)),
            "final_loss": [t.get("loss") for t in trained]}

