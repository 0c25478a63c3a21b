"""Training data: the targets stage's views, BMD labels from the samples sheet, seed 004's augmentations.

A *view* is one registered radiograph of one patient (``results/targets/{patient}/{view}.npz``):
the radiograph crop and its stage-1 (all bones) and per-site stage-2 (clinical ROI) projections
in g/cm², brought to the training size by area averaging (which keeps the g/cm² means).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from bmdpipe.errors import InputError


@dataclass
class View:
    """One radiograph with its targets, at the training size.

    Attributes:
        xray: ``(H, W)`` radiograph crop, standardised per image (zero mean, unit SD).
        bone: ``(H, W)`` stage-1 target, g/cm².
        roi: ``(S, H, W)`` stage-2 target per site, g/cm².
        bmd: ``(K,)`` the patient's BMD labels (NaN where the sheet has none).
    """

    patient: str
    view: str
    xray: np.ndarray
    bone: np.ndarray
    roi: np.ndarray
    bmd: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


def bmd_columns(samples: pd.DataFrame, sites: Sequence[str], measures: Sequence[str]) -> list[str]:
    """The sheet's BMD columns ``{measure}_{site}`` that exist and hold a value, in ``measures`` × ``sites`` order."""
    cols = [f"{m}_{s}" for m in measures for s in sites]
    return [c for c in cols if c in samples and pd.to_numeric(samples[c], errors="coerce").notna().any()]


def bmd_labels(samples: pd.DataFrame, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """patient_id → ``(K,)`` float32 labels of ``columns`` (NaN where empty)."""
    first = samples.drop_duplicates("patient_id").set_index("patient_id")
    values = first[list(columns)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float32)
    return {p: values[i] for i, p in enumerate(first.index)}


def _resize(a: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Area-average (or bilinear when enlarging) ``(..., h, w)`` to ``(..., *size)``."""
    if tuple(a.shape[-2:]) == tuple(size):
        return a.astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    lead = t.shape[:-2]
    t = t.reshape(1, -1, *t.shape[-2:])
    mode = "area" if size[0] <= t.shape[-2] and size[1] <= t.shape[-1] else "bilinear"
    t = F.interpolate(t, size=tuple(size), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    return t.reshape(*lead, *size).numpy()


def standardise(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit SD per image (the display pipeline of each radiograph differs)."""
    sd = float(x.std())
    return ((x - x.mean()) / (sd if sd > 0 else 1.0)).astype(np.float32)


def model_input(image: np.ndarray, box: Sequence[int], field_size: Sequence[int],
                image_size: Sequence[int]) -> np.ndarray:
    """The networks' input from a whole ingested radiograph: ``box`` ``[r0, r1, c0, c1]`` cropped to the
    targets' ``field_size`` (as the targets stage crops its ``xray``), area-averaged to the training
    ``image_size``, standardised. ``(H, W)`` float32.

    Training reads the targets' stored crop (:func:`load_patient_views`); the robustness variants and
    ``bmdpipe predict`` start from the whole radiograph through this function, so all three agree.
    """
    from bmdpipe.targets import crop_resize

    return standardise(_resize(crop_resize(image, box, tuple(field_size)), image_size))


def load_patient_views(
    targets_dir: str | Path,
    sites: Sequence[str],
    size: Sequence[int],
    *,
    views: Sequence[str] | None = None,
    patient: str | None = None,
) -> list[View]:
    """The usable views of one patient's targets folder (those ``targets.json`` lists as made).

    Args:
        targets_dir: ``results/targets/{patient}``.
        sites: stage-2 channels, by the ROI site names stored in each npz.
        size: training ``(rows, cols)``.
        views: keep only these view names (a pose subset); None keeps all.

    Raises:
        InputError: a site is not among the npz's ROI sites.
    """
    root = Path(targets_dir)
    summary = json.loads((root / "targets.json").read_text())
    patient = patient or summary.get("patient_id", root.name)
    out = []
    for name in summary.get("views", []) if summary.get("status") == "ok" else []:
        if views is not None and name not in views:
            continue
        with np.load(root / f"{name}.npz") as z:
            names = [str(s) for s in z["roi_site_names"]]
            missing = [s for s in sites if s not in names]
            if missing:
                raise InputError(f"{root / name}.npz: ROI sites {missing} are not among {names}; "
                                 "set train.sites to sites the roi stage measures")
            roi = np.stack([z["roi_sites"][names.index(s)] for s in sites])
            out.append(View(patient, name, standardise(_resize(z["xray"], size)), _resize(z["bone"], size),
                            _resize(roi, size)))
    return out


def load_views(
    targets_dirs: Mapping[str, str | Path],
    sites: Sequence[str],
    size: Sequence[int],
    labels: Mapping[str, np.ndarray],
    *,
    views: Sequence[str] | None = None,
) -> list[View]:
    """Views of every patient in ``targets_dirs`` (patient → folder), with their BMD labels attached."""
    out = []
    for patient, folder in targets_dirs.items():
        for v in load_patient_views(folder, sites, size, views=views, patient=patient):
            v.bmd = labels[patient]
            out.append(v)
    return out


class ViewDataset(Dataset):
    """Tensors of a list of views: ``(xray (1,H,W), bone (1,H,W), roi (S,H,W), bmd (K,), weight (K,))``.

    ``weight`` is seed 004 Eq. 9–10 per BMD column, computed over these views (NaN labels weigh 0).
    """

    def __init__(self, views: Sequence[View]) -> None:
        from bmdpipe.models.regression import sample_weights

        self.views = list(views)
        bmd = np.stack([v.bmd for v in self.views]) if self.views else np.zeros((0, 0), np.float32)
        w = np.zeros_like(bmd)
        for k in range(bmd.shape[1]):
            ok = np.isfinite(bmd[:, k])
            if ok.any():
                w[ok, k] = sample_weights(bmd[ok, k])
        self.bmd = torch.from_numpy(np.nan_to_num(bmd, nan=0.0)).float()
        self.weight = torch.from_numpy(w).float()

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        v = self.views[i]
        return (torch.from_numpy(v.xray)[None], torch.from_numpy(v.bone)[None], torch.from_numpy(v.roi),
                self.bmd[i], self.weight[i])


# --- augmentation -----------------------------------------------------------------


@dataclass(frozen=True)
class Augment:
    """Seed 004 §4.2.7's augmentations (its values are the paper config's).

    Geometric ones move the radiograph and its targets together; brightness
    and contrast change the radiograph only. Ranges are ± (uniform).

    Attributes:
        rotate_deg, shear_deg: degrees.
        translate: fraction of the image size.
        scale: relative (0.3: ×0.7 to ×1.3).
        brightness: added, in SDs of the standardised radiograph.
        contrast: relative factor around the image mean.
        hflip, vflip: random flips with probability 0.5.
    """

    rotate_deg: float = 0.0
    shear_deg: float = 0.0
    translate: float = 0.0
    scale: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    hflip: bool = False
    vflip: bool = False

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "Augment":
        return cls(**(cfg or {}))


def _u(n: int, r: float) -> torch.Tensor:
    return (torch.rand(n) * 2 - 1) * r


def augment(x: torch.Tensor, targets: Sequence[torch.Tensor], aug: Augment) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Random augmentation of a batch (torch's global RNG, so a resumed run repeats it).

    Args:
        x: ``(B, 1, H, W)`` radiographs.
        targets: tensors ``(B, C, H, W)`` moved with ``x`` (zero outside the field).

    Returns:
        ``(x, targets)`` augmented.
    """
    b = x.shape[0]
    rot, shear = _u(b, math.radians(aug.rotate_deg)), _u(b, math.radians(aug.shear_deg))
    scale = 1 + _u(b, aug.scale)
    tx, ty = _u(b, 2 * aug.translate), _u(b, 2 * aug.translate)  # affine_grid spans [-1, 1]
    fx = torch.where(torch.rand(b) < 0.5, -1.0, 1.0) if aug.hflip else torch.ones(b)
    fy = torch.where(torch.rand(b) < 0.5, -1.0, 1.0) if aug.vflip else torch.ones(b)
    cos, sin = torch.cos(rot), torch.sin(rot)
    # output→input map: flip · rotate · shear / scale, then shift
    a = torch.zeros(b, 2, 3)
    a[:, 0, 0] = fx * (cos - sin * torch.tan(shear)) / scale
    a[:, 0, 1] = fx * (-sin) / scale
    a[:, 1, 0] = fy * (sin + cos * torch.tan(shear)) / scale
    a[:, 1, 1] = fy * cos / scale
    a[:, 0, 2], a[:, 1, 2] = tx, ty
    geometric = any((aug.rotate_deg, aug.shear_deg, aug.translate, aug.scale, aug.hflip, aug.vflip))
    if geometric:
        grid = F.affine_grid(a.to(x), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        targets = [F.grid_sample(t, grid.to(t), mode="bilinear", padding_mode="zeros", align_corners=False)
                   for t in targets]
    if aug.contrast or aug.brightness:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        c = (1 + _u(b, aug.contrast)).to(x).view(b, 1, 1, 1)
        br = _u(b, aug.brightness).to(x).view(b, 1, 1, 1)
        x = (x - mean) * c + mean + br
    return x, list(targets)
