"""Seed 000's landmark detector (§III-B): the 16 chest landmarks on a whole radiograph, learned from the CT.

Seed 000 trained a graph network on 1000 hand-labelled radiographs. Here the labels come from the CT: the
targets stage projects the landmarks it finds on the bone labels through each radiograph's registered pose
(``chest_landmarks_rows_cols`` in ``results/targets/{patient}/{view}.npz``), so only patients whose labels
name the clavicles, ribs, C7 and T12 (the supplied label maps) teach it, together with any view whose points
were placed by hand (``cohort.landmarks``, :func:`bmdpipe.samples.read_landmark_table`: they replace the
CT's); it then finds them on any radiograph. The detector is the heatmap U-Net of :mod:`bmdpipe.models.landmarks` (the paper's graph
network is optional in the issue), on the radiograph letterboxed like the crop localiser's
(:func:`bmdpipe.train.localise.letterbox`); a landmark that is off the detector trains an empty map.

Held-out figures: per landmark the distance in mm on the radiograph (its pixel pitch) between the
detected and the CT-derived position, and the heatmap peak as confidence (seed 000's bad-input flag:
a landmark found with a low peak is not to be cropped at).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from bmdpipe.chest_landmarks import LANDMARKS
from bmdpipe.errors import InputError
from bmdpipe.models.landmarks import decode_heatmaps, heatmap_unet, position_prior
from bmdpipe.train.localise import Letterbox, fit_heatmaps, registered_views
from bmdpipe.train.loop import seed_everything, setup_device
from bmdpipe.train.settings import LocaliserSettings

#: Landmarks a labelled view must show on its detector to be used (the rib cage alone is 8).
MIN_POINTS = 8


@dataclass
class LandmarkView:
    """One whole radiograph on the detector grid with its landmarks.

    Attributes:
        image: ``(size, size)`` letterboxed radiograph.
        points: ``(K, 2)`` landmarks on the grid, pixels; NaN where off the detector.
        truth: ``(K, 2)`` the same on the radiograph, pixels.
        spacing_mm: radiograph ``(row, col)`` pixel pitch, mm.
    """

    patient: str
    view: str
    image: np.ndarray
    points: np.ndarray
    truth: np.ndarray
    shape: tuple[int, int]
    spacing_mm: tuple[float, float]
    letterbox: Letterbox


def load_landmark_views(patients: Sequence[str], targets_root: str | os.PathLike[str],
                        xray_root: str | os.PathLike[str], size: int, min_points: int = MIN_POINTS,
                        manual: Mapping[tuple[str, str], np.ndarray] | None = None,
                        manual_source: str = "the landmark table") -> list[LandmarkView]:
    """The views of ``patients`` whose targets hold at least ``min_points`` landmarks on the detector.

    ``manual`` (:func:`bmdpipe.samples.read_landmark_table`): ``(patient, view)`` → ``(16, 2)`` points placed
    by hand on the radiograph, NaN where not given; a point given there replaces the one projected from the
    CT, so a view whose CT labels do not name the chest bones can teach the detector too.

    Raises:
        InputError: a point of ``manual`` lies outside its radiograph (named with ``manual_source``).
    """
    manual = manual or {}

    def merged(patient: str, view: str, ct_points: np.ndarray | None) -> np.ndarray | None:
        hand = manual.get((patient, view))
        if hand is None:
            return ct_points
        out = np.full((len(LANDMARKS), 2), np.nan) if ct_points is None else ct_points.copy()
        given = np.isfinite(hand).all(axis=1)
        out[given] = hand[given]
        return out

    views = []
    for p, view, truth, shape, spacing, grid, lb in registered_views(
            patients, targets_root, xray_root, size, "chest_landmarks_rows_cols",
            keep=lambda a: np.isfinite(a).all(axis=1).sum() >= min_points, adjust=merged):
        hand = manual.get((p, view))
        if hand is not None:
            outside = np.isfinite(hand).all(axis=1) & ~((hand >= -0.5) & (hand <= np.asarray(shape) - 0.5)).all(axis=1)
            if outside.any():
                k = int(np.flatnonzero(outside)[0])
                raise InputError(f"{manual_source}: {LANDMARKS[k]} of patient {p!r} view {view!r} at row, col "
                                 f"{hand[k, 0]:g}, {hand[k, 1]:g} is outside its radiograph ({shape[0]} × {shape[1]} "
                                 "pixels); row and col are pixels of the radiograph file")
        views.append(LandmarkView(p, view, grid, lb.to_grid(truth), truth, shape, spacing, lb))
    return views


def build_detector(arch: dict) -> torch.nn.Module:
    """The heatmap U-Net with coordinate channels: the 16 points come in look-alike groups (rib edges, clavicle
    points) that only their place on the chest tells apart."""
    return heatmap_unet(len(arch["names"]), arch["channels"], coords=True)


def load_detector(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    payload = torch.load(path, map_location=device, weights_only=False)
    model = build_detector(payload["arch"])
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), payload


def train_detector(views: Sequence[LandmarkView], out_dir: str | os.PathLike[str], work: str | os.PathLike[str],
                   settings: LocaliserSettings, *, names: Sequence[str] = LANDMARKS, device: str = "auto",
                   seed: int = 0, progress: bool = False) -> Path:
    """Train the heatmap detector on ``views``; writes ``out_dir/model.pt``, ``metrics.csv`` and ``train.json``.

    Raises:
        ValueError: no view has landmarks (no patient's labels name the chest bones).
    """
    if not views:
        raise ValueError("no training radiograph has chest landmarks: the detector learns them from patients whose "
                         "bone labels name the clavicles, ribs, C7 and T12 (a supplied label map, ct_labels in the "
                         "samples sheet)")
    seed_everything(seed)
    dev = setup_device(device)
    arch = {"channels": list(settings.channels), "size": settings.size, "sigma_px": settings.sigma_px,
            "names": list(names), "prior_sigma_px": settings.prior_sigma_px}
    model = build_detector(arch).to(dev)
    with warnings.catch_warnings():  # a landmark no training view shows: NaN, no prior for it
        warnings.simplefilter("ignore", RuntimeWarning)
        prior = np.nanmean(np.stack([v.points for v in views]), axis=0)
    return fit_heatmaps(model, arch, views, settings, out_dir, work, stage="chest_landmarks",
                        augment_config={**settings.augment, "hflip": False},  # a flip would swap left and right
                        seed=seed, progress=progress,
                        prior_mean_grid=prior.tolist())


@torch.no_grad()
def detect(model: torch.nn.Module, payload: dict, grid: np.ndarray, lb: Letterbox) -> tuple[np.ndarray, np.ndarray]:
    """``(points (K, 2) radiograph pixels, confidence (K,) heatmap peaks 0–1)`` on one letterboxed radiograph.

    With a position prior in ``payload`` (:func:`train_detector`), each landmark is the peak of its map
    weighted by a Gaussian around its mean place on the training radiographs: a look-alike spot far away
    (another rib edge, the other clavicle) no longer wins over a lower peak where the landmark belongs.
    """
    x = torch.from_numpy(grid)[None, None].to(next(model.parameters()).device)
    maps = model(x).float().cpu()
    weights = None
    if payload.get("prior_mean_grid") is not None and payload["arch"].get("prior_sigma_px"):
        weights = position_prior(torch.tensor(payload["prior_mean_grid"], dtype=torch.float32), maps.shape[-2:],
                                 payload["arch"]["prior_sigma_px"])
    points, confidence = decode_heatmaps(maps, weights=weights)
    return lb.from_grid(points[0].numpy()), confidence[0].numpy()


def evaluate_detector(model_path: str | os.PathLike[str], views: Sequence[LandmarkView], fold: int,
                      device: str = "cpu") -> pd.DataFrame:
    """Per held-out view and landmark on its detector: error in mm (radiograph pitch) and confidence."""
    model, payload = load_detector(model_path, device)
    names = payload["arch"]["names"]
    rows = []
    for v in views:
        found, confidence = detect(model, payload, v.image, v.letterbox)
        for k, name in enumerate(names):
            if not np.isfinite(v.truth[k]).all():
                continue
            dy, dx = (found[k] - v.truth[k]) * np.asarray(v.spacing_mm)
            rows.append({"patient_id": v.patient, "view": v.view, "fold": fold, "landmark": name,
                         "error_mm": float(np.hypot(dy, dx)), "confidence": float(confidence[k])})
    return pd.DataFrame(rows, columns=["patient_id", "view", "fold", "landmark", "error_mm", "confidence"])


def summarise_detector(table: pd.DataFrame, within_mm: float = 5.0) -> dict:
    """Mean and median error (mm), the fraction within ``within_mm``, the mean error per landmark, confidence."""
    if table.empty:
        return {"n_views": 0, "n_points": 0}
    return {"n_views": int(table.groupby(["patient_id", "view"]).ngroups), "n_points": int(len(table)),
            "error_mm_mean": float(table.error_mm.mean()), "error_mm_median": float(table.error_mm.median()),
            f"within_{within_mm:g}_mm": float((table.error_mm <= within_mm).mean()),
            "confidence_median": float(table.confidence.median()),
            "error_mm_mean_per_landmark": {k: float(g.error_mm.mean()) for k, g in table.groupby("landmark", sort=False)}}
