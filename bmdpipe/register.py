"""2D-3D registration of a radiograph to its CT (seed 004 Fig. 3, after Otake et al. 2012).

Intensity-based: DRRs of the CT (:mod:`bmdpipe.drr`) are compared with the
radiograph by gradient correlation (Penney et al. 1998; or normalized
cross-correlation), and the six pose parameters are searched with CMA-ES
(the ``cmaes`` package), coarse to fine: a coarse grid search of the
in-plane shift on a small detector and a block-averaged CT, then CMA-ES at
each finer level starting from the previous optimum. Each CMA-ES generation
is rendered as one batch of poses.

A registration whose final similarity is below ``min_similarity`` is
reported as failed; its pair must not be used for training.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from cmaes import CMA

from bmdpipe.drr import (
    Camera,
    Pose,
    auto_n_samples,
    downsample_for_detector,
    project_points,
    render,
    volume_from_sitk,
)
from bmdpipe.similarity import gradient_correlation, ncc

#: Bump when a change to this stage changes its outputs (the rule re-runs).
STAGE_VERSION = "1"


SIMILARITIES = {"gc": gradient_correlation, "ncc": ncc}


# --- settings and result ----------------------------------------------------------


@dataclass(frozen=True)
class Level:
    """One resolution level of the search.

    Attributes:
        detector_factor: detector coarsening factor (1 = the radiograph's own pixels).
        sigma_rot_deg, sigma_trans_mm: CMA-ES initial step sizes.
        generations: CMA-ES generations at this level.
    """

    detector_factor: float
    sigma_rot_deg: float
    sigma_trans_mm: float
    generations: int


@dataclass(frozen=True)
class RegistrationSettings:
    """How to register (config ``register``).

    Attributes:
        similarity: ``"gc"`` (gradient correlation) or ``"ncc"``.
        levels: coarse to fine.
        population: CMA-ES population (poses rendered per batch).
        search_shift_mm: half-width of the coarse grid search of the in-plane
            shift (x and z), mm; 0 skips it.
        search_step_mm: step of that grid, mm.
        max_rot_deg, max_trans_mm: bounds of the pose change from the
            initial pose; the optimum at a bound is reported.
        min_similarity: below this final similarity the registration fails.
        ray_oversample: ray samples per smallest voxel size (1 = one sample per voxel).
        seed: CMA-ES seed.
    """

    similarity: str = "gc"
    levels: tuple[Level, ...] = (
        Level(8.0, 3.0, 8.0, 12),
        Level(4.0, 1.5, 4.0, 12),
        Level(2.0, 0.6, 1.5, 10),
    )
    population: int = 12
    search_shift_mm: float = 40.0
    search_step_mm: float = 10.0
    max_rot_deg: float = 15.0
    max_trans_mm: float = 80.0
    min_similarity: float = 0.3
    ray_oversample: float = 1.0
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "RegistrationSettings":
        cfg = dict(cfg)
        if "levels" in cfg:
            cfg["levels"] = tuple(Level(**lv) for lv in cfg["levels"])
        return cls(**cfg)


@dataclass
class RegistrationResult:
    """Outcome of :func:`register`.

    Attributes:
        pose: the estimated pose.
        similarity: final similarity at the finest level.
        evaluations: DRRs rendered.
        seconds: wall time.
        status: ``"ok"`` or ``"failed"``; reason says why it failed.
        history: per level: detector shape, best similarity, evaluations.
    """

    pose: Pose
    similarity: float
    evaluations: int
    seconds: float
    status: str
    reason: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["pose"] = asdict(self.pose)
        return out


# --- the search -------------------------------------------------------------------


def _resize(image: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(image, size=shape, mode="area") if image.shape[-2:] != shape else image


def _apply(base: Pose, delta: np.ndarray) -> Pose:
    return Pose.from_vector(base.as_vector() + delta, base.orientation)


def register(
    ct_hu: sitk.Image,
    radiograph: np.ndarray,
    camera: Camera,
    init: Pose,
    settings: RegistrationSettings = RegistrationSettings(),
    *,
    device: torch.device | str | None = None,
) -> RegistrationResult:
    """Find the pose of ``radiograph`` relative to ``ct_hu``.

    Args:
        ct_hu: CT in HU (SimpleITK, any geometry).
        radiograph: ``(rows, cols)`` MONOCHROME2 image (bright = attenuating),
            the size of ``camera.shape``.
        camera: the radiograph's detector geometry.
        init: starting pose (from the DICOM geometry: SID and view).
        settings: search settings.
        device: torch device (default CUDA when present).

    Returns:
        The result; ``status == "failed"`` when the final similarity is below
        ``settings.min_similarity``.
    """
    start = time.perf_counter()
    if radiograph.shape != tuple(camera.shape):
        raise ValueError(f"radiograph shape {radiograph.shape} differs from the camera {camera.shape}")
    sim_fn = SIMILARITIES[settings.similarity]
    fixed_full = torch.as_tensor(np.ascontiguousarray(radiograph), dtype=torch.float32)[None, None]
    sid = float(np.linalg.norm(init.translation_mm))
    best = np.zeros(6)
    evaluations = 0
    history: list[dict[str, Any]] = []
    subject = fixed = cam = None
    n_samples = 0
    best_sim = -math.inf

    def evaluate(deltas: Sequence[np.ndarray]) -> np.ndarray:
        nonlocal evaluations
        poses = [_apply(init, d) for d in deltas]
        with torch.no_grad():
            drr = render(subject, cam, poses, n_samples=n_samples)
            values = sim_fn(drr, fixed.to(drr.device)).double().cpu().numpy()
        evaluations += len(poses)
        return np.nan_to_num(values, nan=-1.0)

    bounds_half = np.array([settings.max_rot_deg] * 3 + [settings.max_trans_mm] * 3)
    for i, level in enumerate(settings.levels):
        cam = camera.scaled(level.detector_factor)
        fixed = _resize(fixed_full, cam.shape)
        subject = volume_from_sitk(downsample_for_detector(ct_hu, cam, sid), device=device)
        n_samples = auto_n_samples(subject, settings.ray_oversample)
        if i == 0 and settings.search_shift_mm > 0:
            steps = np.arange(-settings.search_shift_mm, settings.search_shift_mm + 1e-6, settings.search_step_mm)
            grid = [np.array([0, 0, 0, dx, 0, dz]) for dx, dz in itertools.product(steps, steps)]
            values = np.concatenate([evaluate(grid[k : k + 32]) for k in range(0, len(grid), 32)])
            best = grid[int(np.argmax(values))].astype(np.float64)
            best_sim = float(values.max())
            history.append({"level": "grid", "shape": list(cam.shape), "best_similarity": best_sim, "evaluations": len(grid)})
        scale = np.array([level.sigma_rot_deg] * 3 + [level.sigma_trans_mm] * 3)
        lo, hi = (-bounds_half - best) / scale, (bounds_half - best) / scale
        mean = np.zeros(6)
        opt = CMA(mean=mean, sigma=1.0, bounds=np.stack([np.minimum(lo, -1e-3), np.maximum(hi, 1e-3)], axis=1),
                  population_size=settings.population, seed=settings.seed + i)
        level_best, level_x = evaluate([best])[0], np.zeros(6)
        used = 1
        for _ in range(level.generations):
            xs = [opt.ask() for _ in range(opt.population_size)]
            values = evaluate([best + x * scale for x in xs])
            used += len(xs)
            opt.tell([(x, -v) for x, v in zip(xs, values)])
            k = int(np.argmax(values))
            if values[k] > level_best:
                level_best, level_x = float(values[k]), xs[k]
        best = best + level_x * scale
        best_sim = float(level_best)
        history.append({"level": i, "shape": list(cam.shape), "best_similarity": best_sim, "evaluations": used})

    pose = _apply(init, best)
    status, reason = "ok", ""
    at_bound = np.abs(best) >= 0.999 * bounds_half
    if best_sim < settings.min_similarity:
        status = "failed"
        reason = (f"final {settings.similarity} similarity {best_sim:.3f} is below the bound {settings.min_similarity}: "
                  "the radiograph and the CT may not match (another patient or body part), or the start pose is far off")
    elif at_bound.any():
        status = "failed"
        names = np.array(["rot_z", "rot_x", "rot_y", "shift_x", "shift_y", "shift_z"])[at_bound]
        reason = f"the optimum lies on the search bound ({', '.join(names)}); the pose is outside the search range"
    return RegistrationResult(pose, best_sim, evaluations, time.perf_counter() - start, status, reason, history)


def mean_projection_distance(
    points_ras_mm: np.ndarray, camera: Camera, estimated: Pose, true: Pose, isocenter_mm: Sequence[float]
) -> float:
    """Mean distance between the detector projections of 3-D points under two poses, mm at the isocentre plane.

    Args:
        points_ras_mm: ``(N, 3)`` points (e.g. on the target vertebrae), RAS mm.
    """
    a = project_points(points_ras_mm, camera, estimated, isocenter_mm)
    b = project_points(points_ras_mm, camera, true, isocenter_mm)
    pitch = np.array(camera.pixel_spacing_mm)
    sid = float(np.linalg.norm(true.translation_mm))
    return float(np.linalg.norm((a - b) * pitch, axis=1).mean() * sid / camera.sdd_mm)
