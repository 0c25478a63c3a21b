"""The crop localiser: where the training field (the box around T12–L3) lies on a whole radiograph.

In the pipeline the field comes from 2D-3D registration with the patient's
CT (:func:`bmdpipe.targets.field_box`); a new radiograph has no CT. The
localiser learns the registered boxes of the training folds from the whole
radiographs: a heatmap U-Net (:mod:`bmdpipe.models.landmarks`) finds two
points, the middle of the box's top edge and of its bottom edge, on the
radiograph brought to ``size × size`` (aspect kept, zero-padded). The box
is rebuilt from them: centre between the points, height their distance,
width from the training aspect. Heatmap peaks give a confidence, which
``bmdpipe predict`` uses for its quality flag.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from bmdpipe import __version__
from bmdpipe.io.atomic import atomic_path, write_json
from bmdpipe.io.xray import load_xray
from bmdpipe.models.landmarks import decode_heatmaps, gaussian_heatmaps, heatmap_loss, heatmap_unet
from bmdpipe.targets import widen_to_aspect
from bmdpipe.train.data import Augment, augment, standardise
from bmdpipe.train.loop import TrainConfig, TrainState, fit, seed_everything, setup_device, update
from bmdpipe.train.settings import STAGE_VERSION, LocaliserSettings


@dataclass
class Letterbox:
    """How a ``(h, w)`` radiograph sits on the ``size × size`` localiser grid: scaled by ``(sy, sx)``, shifted by ``(oy, ox)``."""

    size: int
    sy: float
    sx: float
    oy: int
    ox: int

    def to_grid(self, rc: np.ndarray) -> np.ndarray:
        """``(..., 2)`` radiograph pixels → grid pixels."""
        rc = np.asarray(rc, dtype=np.float64)
        return np.stack([(rc[..., 0] + 0.5) * self.sy - 0.5 + self.oy, (rc[..., 1] + 0.5) * self.sx - 0.5 + self.ox], -1)

    def from_grid(self, rc: np.ndarray) -> np.ndarray:
        """``(..., 2)`` grid pixels → radiograph pixels."""
        rc = np.asarray(rc, dtype=np.float64)
        return np.stack([(rc[..., 0] - self.oy + 0.5) / self.sy - 0.5, (rc[..., 1] - self.ox + 0.5) / self.sx - 0.5], -1)


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """The radiograph area-averaged to fit ``size × size`` (aspect kept), standardised, zero-padded around.

    Returns:
        ``((size, size) float32, Letterbox)``.
    """
    h, w = image.shape
    s = size / max(h, w)
    nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    t = torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32)[None, None]
    mode = "area" if nh <= h and nw <= w else "bilinear"
    small = F.interpolate(t, size=(nh, nw), mode=mode, **({} if mode == "area" else {"align_corners": False}))[0, 0]
    grid = np.zeros((size, size), np.float32)
    oy, ox = (size - nh) // 2, (size - nw) // 2
    grid[oy:oy + nh, ox:ox + nw] = standardise(small.numpy())
    return grid, Letterbox(size, nh / h, nw / w, oy, ox)


def box_points(box: Sequence[float]) -> np.ndarray:
    """``[r0, r1, c0, c1]`` → ``(2, 2)``: middle of the top edge and of the bottom edge, ``(row, col)`` pixel centres."""
    r0, r1, c0, c1 = (float(v) for v in box)
    cc = (c0 + c1) / 2 - 0.5
    return np.array([[r0 - 0.5, cc], [r1 - 0.5, cc]])


def points_box(points: np.ndarray, aspect_rows_per_col: float, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """The box of :func:`box_points`' two points (kept inside ``shape``); inverse of :func:`box_points`."""
    top, bottom = np.asarray(points, dtype=np.float64)
    centre = (top + bottom) / 2 + 0.5
    h = max(float(np.linalg.norm(bottom - top)), 2.0)
    w = h / aspect_rows_per_col
    return widen_to_aspect((centre[0] - h / 2, centre[0] + h / 2, centre[1] - w / 2, centre[1] + w / 2),
                           aspect_rows_per_col, shape)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[r0, r1, c0, c1]`` boxes."""
    ih = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    iw = max(0.0, min(a[3], b[3]) - max(a[2], b[2]))
    inter = ih * iw
    union = (a[1] - a[0]) * (a[3] - a[2]) + (b[1] - b[0]) * (b[3] - b[2]) - inter
    return inter / union if union > 0 else 0.0


# --- data -----------------------------------------------------------------------------


@dataclass
class LocaliserView:
    """One whole radiograph on the localiser grid, with its registered crop box.

    Attributes:
        image: ``(size, size)`` letterboxed radiograph.
        points: ``(2, 2)`` the box's top and bottom edge middles on the grid, pixels.
        box: ``[r0, r1, c0, c1]`` on the radiograph, pixels.
        spacing_mm: radiograph ``(row, col)`` pixel pitch, mm.
    """

    patient: str
    view: str
    image: np.ndarray
    points: np.ndarray
    box: np.ndarray
    shape: tuple[int, int]
    spacing_mm: tuple[float, float]
    letterbox: Letterbox


def registered_views(patients: Sequence[str], targets_root: str | os.PathLike[str],
                     xray_root: str | os.PathLike[str], size: int, key: str,
                     keep: Callable[[np.ndarray], bool] = lambda a: True,
                     adjust: Callable[[str, str, np.ndarray | None], np.ndarray | None] | None = None) -> Iterator[tuple]:
    """Every view the targets stage made for ``patients``, whole: ``(patient, view, array key of its targets
    .npz (float64), radiograph shape, pixel pitch (mm), letterboxed grid, Letterbox)``; views whose array
    ``keep`` rejects (or that lack it) are skipped before their radiograph is read. ``adjust(patient, view,
    array or None)`` may replace the array first (e.g. by points placed by hand)."""
    for p in patients:
        summary = json.loads((Path(targets_root) / p / "targets.json").read_text())
        for view in summary.get("views", []) if summary.get("status") == "ok" else []:
            with np.load(Path(targets_root) / p / f"{view}.npz") as z:
                array = z[key].astype(np.float64) if key in z.files else None
            if adjust is not None:
                array = adjust(p, view, array)
            if array is None or not keep(array):
                continue
            image, spacing = load_xray(Path(xray_root) / p / f"{view}.nii.gz")
            grid, lb = letterbox(image, size)
            yield p, view, array, image.shape, spacing, grid, lb


def load_localiser_views(patients: Sequence[str], targets_root: str | os.PathLike[str],
                         xray_root: str | os.PathLike[str], size: int) -> list[LocaliserView]:
    """The registered views of ``patients``: ``results/xray/{patient}/{view}.nii.gz`` and the box in ``targets``."""
    return [LocaliserView(p, view, grid, lb.to_grid(box_points(box)), box, shape, spacing, lb)
            for p, view, box, shape, spacing, grid, lb in registered_views(patients, targets_root, xray_root, size,
                                                                         "crop_box_rows_cols")]


class LocaliserDataset(Dataset):
    """``(image (1, S, S), heatmaps (K, S, S))`` of a list of :class:`LocaliserView` (K = 2) or of any views with
    ``image`` and grid ``points`` (seed 000's :class:`bmdpipe.train.chest.LandmarkView`; NaN points: empty maps)."""

    def __init__(self, views: Sequence[LocaliserView], sigma: float) -> None:
        self.views = list(views)
        self.sigma = sigma

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.views[i]
        maps = gaussian_heatmaps(torch.as_tensor(v.points)[None], v.image.shape, self.sigma)[0]
        return torch.from_numpy(v.image)[None], maps


# --- model ----------------------------------------------------------------------------


def build_localiser(arch: dict) -> torch.nn.Module:
    return heatmap_unet(2, arch["channels"])


def save_localiser(model: torch.nn.Module, arch: dict, path: str | os.PathLike[str], **extra) -> None:
    """``{"arch", "state_dict", **extra}`` of any heatmap detector, written atomically."""
    with atomic_path(path) as tmp:
        torch.save({"arch": arch, "state_dict": model.state_dict(), **extra}, tmp)


def load_localiser(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    payload = torch.load(path, map_location=device, weights_only=False)
    model = build_localiser(payload["arch"])
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), payload


def train_localiser(views: Sequence[LocaliserView], out_dir: str | os.PathLike[str], work: str | os.PathLike[str],
                    settings: LocaliserSettings, *, aspect: float, device: str = "auto", seed: int = 0,
                    progress: bool = False) -> Path:
    """Train the heatmap localiser on ``views``; writes ``out_dir/model.pt`` and ``metrics.csv``.

    ``model.pt`` also keeps the range of the training fields' heights as a fraction of the radiograph's
    (``height_fraction_range``): a field far outside it on a new radiograph is not where the training
    fields were.

    Args:
        aspect: rows/cols of the training field (``targets.size``), stored with the model.
    """
    seed_everything(seed)
    dev = setup_device(device)
    arch = {"channels": list(settings.channels), "size": settings.size, "sigma_px": settings.sigma_px,
            "aspect_rows_per_col": aspect}
    model = build_localiser(arch).to(dev)
    fractions = [(v.box[1] - v.box[0]) / v.shape[0] for v in views]
    return fit_heatmaps(model, arch, views, settings, out_dir, work, stage="localiser",
                        augment_config=settings.augment, seed=seed, progress=progress,
                        height_fraction_range=[float(min(fractions)), float(max(fractions))])


def fit_heatmaps(model: torch.nn.Module, arch: dict, views: Sequence, settings: LocaliserSettings,
                 out_dir: str | os.PathLike[str], work: str | os.PathLike[str], *, stage: str, augment_config: dict,
                 seed: int, progress: bool = False, **extra) -> Path:
    """A heatmap detector's whole training run (the crop localiser's and seed 000's landmark detector's).

    AdamW with cosine warm restarts on :func:`~bmdpipe.models.landmarks.heatmap_loss` over
    :class:`LocaliserDataset` of ``views``, image and maps augmented together, checkpoints in ``work``
    (resumed after a kill, removed at the end). Writes ``out_dir/model.pt`` (``arch``, weights and ``extra``),
    ``metrics.csv`` and ``train.json`` (``stage``). ``model`` is on its device already.

    Returns:
        The path of ``model.pt``.
    """
    start = time.perf_counter()
    dev = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=settings.restart_epochs)
    state = TrainState({"model": model}, {"model": opt}, {"model": sched}, device=dev)
    aug = Augment.from_config(augment_config)

    def train_step(state: TrainState, batch) -> dict[str, float]:
        x, maps = batch[0].to(dev), batch[1].to(dev)
        x, (maps,) = augment(x, [maps], aug)
        loss = heatmap_loss(model(x).float(), maps, settings.foreground_weight)
        update(loss, opt, state.scaler)
        return {"loss": loss.item()}

    cfg = TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size, seed=seed, amp=False)
    fit(state, LocaliserDataset(views, settings.sigma_px), train_step, cfg, work, progress=progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_localiser(model, arch, out / "model.pt", code_version=STAGE_VERSION, bmdpipe_version=__version__, **extra)
    shutil.copyfile(Path(work) / "metrics.csv", out / "metrics.csv")
    write_json(out / "train.json", {
        "stage": stage, "status": "ok", "code_version": STAGE_VERSION, "bmdpipe_version": __version__,
        "views": len(views), "patients": sorted({v.patient for v in views}), "seconds": time.perf_counter() - start,
        "device": str(dev), "final": state.history[-1] if state.history else {}})
    shutil.rmtree(work, ignore_errors=True)
    return out / "model.pt"


def locate(models: Sequence[tuple[torch.nn.Module, dict]], image: np.ndarray) -> dict:
    """The field on one whole radiograph, from one or more localisers (e.g. the fold models), averaged.

    Args:
        models: ``(model, payload)`` pairs from :func:`load_localiser`, all of one grid size.
        image: ``(rows, cols)`` ingested radiograph (MONOCHROME2).

    Returns:
        ``box`` ``[r0, r1, c0, c1]`` pixels; ``points`` ``(2, 2)``; ``confidence`` (mean heatmap peak,
        0–1); ``spread_px``: largest distance of a model's box centre from the mean, pixels.
    """
    grid, lb = letterbox(image, models[0][1]["arch"]["size"])
    return _locate_on_grid(models, grid, lb, image.shape)


@torch.no_grad()
def _locate_on_grid(models: Sequence[tuple[torch.nn.Module, dict]], grid: np.ndarray, lb: Letterbox,
                    shape: tuple[int, int]) -> dict:
    x = torch.from_numpy(grid)[None, None]
    pts, conf = [], []
    for model, _ in models:
        p, c = decode_heatmaps(model(x.to(next(model.parameters()).device)).float().cpu())
        pts.append(lb.from_grid(p[0].numpy()))
        conf.append(float(c[0].mean()))
    pts = np.stack(pts)  # (M, 2, 2)
    mean = pts.mean(axis=0)
    centres = pts.mean(axis=1)
    spread = float(np.linalg.norm(centres - centres.mean(axis=0), axis=-1).max())
    box = points_box(mean, models[0][1]["arch"]["aspect_rows_per_col"], shape)
    return {"box": list(box), "points": mean, "confidence": float(np.mean(conf)), "spread_px": spread}


def evaluate_localiser(model_path: str | os.PathLike[str], views: Sequence[LocaliserView], fold: int,
                       device: str = "cpu") -> pd.DataFrame:
    """Held-out boxes against the registered ones: centre error (mm), height error (%), IoU, confidence."""
    models = [load_localiser(model_path, device)]
    rows = []
    for v in views:
        res = _locate_on_grid(models, v.image, v.letterbox, v.shape)
        box, ref = np.asarray(res["box"], float), v.box
        dy = ((box[0] + box[1]) / 2 - (ref[0] + ref[1]) / 2) * v.spacing_mm[0]
        dx = ((box[2] + box[3]) / 2 - (ref[2] + ref[3]) / 2) * v.spacing_mm[1]
        rows.append({"patient_id": v.patient, "view": v.view, "fold": fold,
                     "centre_error_mm": float(np.hypot(dy, dx)),
                     "height_error_pct": float(100 * ((box[1] - box[0]) / (ref[1] - ref[0]) - 1)),
                     "iou": box_iou(box, ref), "confidence": res["confidence"]})
    return pd.DataFrame(rows)


def summarise_localiser(table: pd.DataFrame) -> dict:
    """Median and 95th-percentile centre error (mm), median IoU, fraction with IoU ≥ 0.5, median confidence."""
    if table.empty:
        return {"n_views": 0}
    return {"n_views": int(len(table)), "centre_error_mm_median": float(table.centre_error_mm.median()),
            "centre_error_mm_p95": float(table.centre_error_mm.quantile(0.95)),
            "height_error_pct_median_abs": float(table.height_error_pct.abs().median()),
            "iou_median": float(table.iou.median()), "iou_at_least_0.5": float((table.iou >= 0.5).mean()),
            "confidence_median": float(table.confidence.median())}
