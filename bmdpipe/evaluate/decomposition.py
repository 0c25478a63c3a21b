"""How close the generator's held-out ROI images are to their targets (seed 004 §4.3.1, Table 3's "image
decomposition accuracy"): mean PSNR, mean multi-threshold Dice, and the PCC and ICC of the images' mean
intensity.

These say where a decomposition's BMD error comes from. The BMD figures (:mod:`bmdpipe.evaluate.bmd`) compare a
linear fit of the predicted image with the label; these compare the predicted image with the target image, so
a generator that draws the right bone with the wrong density shows a high Dice and a low intensity PCC.

* PSNR per image and site channel: ``10·log10(peak² / MSE)``, dB, with the peak the target channel's maximum
  (seed 004 does not say which peak; its images are in its own units, so the dB values are not comparable
  with its Table 3, only between methods and runs here).
* Multi-threshold Dice: the mean over the candidate thresholds t > 0 of the BMD fit
  (:attr:`bmdpipe.train.settings.DecompositionSettings.thresholds`) of the Dice of ``predicted ≥ t`` and
  ``target ≥ t``, over the thresholds that some target pixel reaches.
* Mean intensity: the mean of the site channel over the image, g/cm² (seed 004's "average intensity of
  PF-DRR"); its PCC and ICC(2,1) between predicted and target images, pooled over views.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from bmdpipe.evaluate import metrics

#: Columns of a BMD-fit folder's ``decomposition.tsv`` (one row per held-out view and site).
ACCURACY_COLUMNS = ["patient_id", "view", "fold", "method", "site", "psnr_db", "dice", "mean_true", "mean_pred"]
#: Columns of :func:`summarise_accuracy`'s table.
SUMMARY_COLUMNS = ["method", "site", "n_views", "psnr_db", "dice", "pcc_mean", "icc_mean", "mean_ratio"]


def image_accuracy(predicted: np.ndarray, true: np.ndarray, thresholds: Sequence[float]) -> dict[str, np.ndarray]:
    """Per image and site channel: PSNR, multi-threshold Dice and mean intensities.

    Args:
        predicted, true: ``(N, S, H, W)`` ROI images, g/cm².
        thresholds: candidate thresholds, g/cm²; those ≤ 0 are left out of the Dice.

    Returns:
        ``psnr_db``, ``dice``, ``mean_true``, ``mean_pred``, each ``(N, S)``; PSNR is NaN where the target
        channel is empty (peak 0), Dice where no threshold is reached by the target.
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if predicted.shape != true.shape or predicted.ndim != 4:
        raise ValueError(f"predicted {predicted.shape} and true {true.shape} must both be (N, S, H, W)")
    mse = ((predicted - true) ** 2).mean(axis=(2, 3))
    peak = true.max(axis=(2, 3))
    with np.errstate(divide="ignore", invalid="ignore"):
        psnr = np.where(peak > 0, 10 * np.log10(peak**2 / np.maximum(mse, 1e-12)), np.nan)
    dices = []
    for t in (t for t in thresholds if t > 0):
        p, g = predicted >= t, true >= t
        size = g.sum(axis=(2, 3))
        overlap = 2 * (p & g).sum(axis=(2, 3)) / np.maximum(p.sum(axis=(2, 3)) + size, 1)
        dices.append(np.where(size > 0, overlap, np.nan))
    stack = np.stack(dices) if dices else np.full((1, *peak.shape), np.nan)
    reached = np.isfinite(stack).sum(axis=0)
    dice = np.where(reached > 0, np.nansum(stack, axis=0) / np.maximum(reached, 1), np.nan)
    return {"psnr_db": psnr, "dice": dice, "mean_true": true.mean(axis=(2, 3)),
            "mean_pred": predicted.mean(axis=(2, 3))}


def accuracy_rows(patients: Sequence[str], views: Sequence[str], fold: int, method: str, sites: Sequence[str],
                  predicted: np.ndarray, true: np.ndarray, thresholds: Sequence[float]) -> pd.DataFrame:
    """:data:`ACCURACY_COLUMNS` rows of :func:`image_accuracy` for ``(N, S, H, W)`` images of the named views."""
    acc = image_accuracy(predicted, true, thresholds)
    rows = [(p, v, fold, method, site, *(float(acc[k][i, s]) for k in ACCURACY_COLUMNS[5:]))
            for i, (p, v) in enumerate(zip(patients, views)) for s, site in enumerate(sites)]
    return pd.DataFrame(rows, columns=ACCURACY_COLUMNS)


def read_accuracy(folders: Sequence[str | os.PathLike[str]]) -> pd.DataFrame:
    """The ``decomposition.tsv`` rows of every folder that has one (BMD-fit folders; a stage-3 folder has none),
    concatenated; :data:`ACCURACY_COLUMNS` with no rows when none has."""
    paths = [Path(d) / "decomposition.tsv" for d in folders]
    frames = [pd.read_csv(p, sep="\t") for p in paths if p.exists()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=ACCURACY_COLUMNS)


def summarise_accuracy(rows: pd.DataFrame) -> pd.DataFrame:
    """Per method and site, pooled over folds: views, mean PSNR (dB), mean Dice, PCC and ICC(2,1) of the mean
    intensity (predicted against target) and the ratio of their averages (1: no overall intensity bias).
    Figures that need 3 views or a non-constant intensity are NaN without them."""
    out = []
    for (method, site), g in rows.groupby(["method", "site"], sort=False):
        g = g.dropna(subset=["mean_true", "mean_pred"])
        pcc = icc = np.nan
        if len(g) >= 3 and g.mean_true.std() > 0 and g.mean_pred.std() > 0:
            pcc, icc = metrics.pcc(g.mean_true, g.mean_pred), metrics.icc(g.mean_true, g.mean_pred)
        total = g.mean_true.sum()
        out.append([method, site, len(g), g.psnr_db.mean(), g.dice.mean(), pcc, icc,
                    g.mean_pred.sum() / total if total > 0 else np.nan])
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS)
