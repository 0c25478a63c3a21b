"""Trained bone segmentation: the Bayesian U-Net (MC dropout) of seed 004, trained on the cohort's labelled patients.

Classes (index: name): 0 background, then one class per vertebra of
:attr:`UNetSettings.vertebrae` (default T12, L1, L2, L3: the DXA sites of
the demo), then ``bone``: every other bone (other vertebrae, ribs,
sternum, clavicles, scapulae, humeri, pelvis, ...), which the stage-1
target (the projection of all bones) needs. Predictions are written in
bmdpipe's scheme (:data:`bmdpipe.segment.BONE_LABELS`): ``vertebra_T12`` …
and ``bone``.

Like Hiasa et al.'s Bayesian U-net (seed 004's segmenter) the network is
2-D: it segments sagittal slices, which show the whole spine with its ribs,
so that a vertebra's level can be read from its context, and which cost a
fraction of 3-D patches on 2 CPU cores. Each input holds
``2 * context_slices + 1`` neighbouring slices as channels (2.5-D).

Everything happens on a *working grid*: axis-aligned (LPS, identity
direction), ``slice_spacing_mm`` between sagittal slices (x) and
``spacing_mm`` in-plane (y, z), covering the CT's box, with y and z padded to
a multiple of the network's stride. The CT is smoothed (anti-aliasing) and
resampled to it; supplied labels by the argmax of their linearly
resampled one-hot maps. Training draws crops of sagittal slices (most
centred near a listed vertebra, in slices weighted by its voxels) with
small affine and intensity changes (MONAI) and left-right flips, and
minimises Dice + cross-entropy through :func:`bmdpipe.train.loop.fit`
(seeded, resumable). Inference runs every whole slice ``mc_samples`` times
with dropout on; the mean softmax is resampled linearly to the CT grid,
where its argmax gives the labels (each vertebra keeps its largest
connected part) and its entropy (nats, 0 … ln C) the uncertainty map.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from bmdpipe.errors import InputError
from bmdpipe.segment import BONE_LABELS, VERTEBRAE
from bmdpipe.train.loop import resolve_device

log = logging.getLogger(__name__)

#: Bump when a change alters the trained model or its predictions (train_segmenter and segment re-run).
STAGE_VERSION = "1"
#: HU window of the network input; HU / 1000 after clipping to it.
HU_WINDOW = (-1000.0, 2000.0)
AIR_HU = -1000.0
#: Normalised intensity above which a sagittal slice holds body (−800 HU); other slices are background.
AIR_BODY = -0.8


@dataclass(frozen=True)
class UNetSettings:
    """Settings of the segmentation U-Net (config ``segment.unet``).

    Attributes:
        vertebrae: vertebrae with a class of their own (others are ``bone``).
        spacing_mm: in-plane (y, z) pixel size of the sagittal slices.
        slice_spacing_mm: distance between sagittal slices (x).
        context_slices: neighbours on each side given as extra input channels.
        channels: feature channels per U-Net level (each level halves the size).
        res_units: residual units per level.
        full_resolution_level: the first U-Net level keeps the slice resolution
            (sharper boundaries, about 3× the cost).
        dropout: dropout probability in every residual unit.
        patch_pixels: training crop ``(z, y)`` in slice pixels (multiples of
            :attr:`multiple`), centred near a listed vertebra in slices drawn for one;
            None trains on whole slices.
        batch_size: slices per step.
        epochs: training epochs.
        steps_per_epoch: optimisation steps per epoch.
        learning_rate: AdamW learning rate (cosine-annealed over the epochs).
        vertebra_slice_fraction: share of training slices drawn from slices that
            hold a listed vertebra, weighted by its voxels there (the rest uniformly).
        mc_samples: stochastic passes at inference (all grids together).
        inference_grids: working grids at inference, offset from each other by a
            fraction of a voxel along every axis (1/n apart); their mean softmax on the CT
            grid places the boundaries finer than one grid's 2 mm pixels. The MC passes
            are spread over them, so the cost stays that of ``mc_samples`` passes.
        largest_component: keep each vertebra's largest connected part (others become ``bone``).
        seed: seeds training and the MC passes.
    """

    vertebrae: tuple[str, ...] = ("T12", "L1", "L2", "L3")
    spacing_mm: float = 2.0
    slice_spacing_mm: float = 2.5
    context_slices: int = 1
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    res_units: int = 2
    full_resolution_level: bool = False
    dropout: float = 0.1
    patch_pixels: tuple[int, int] | None = (112, 112)
    batch_size: int = 8
    epochs: int = 40
    steps_per_epoch: int = 30
    learning_rate: float = 3e-3
    vertebra_slice_fraction: float = 0.8
    mc_samples: int = 8
    inference_grids: int = 2
    largest_component: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [v for v in self.vertebrae if v not in VERTEBRAE]
        if unknown:
            raise InputError(f"segment.unet.vertebrae: unknown vertebra name(s) {unknown}; use C1..C7, T1..T12, L1..L5")
        if len(set(self.vertebrae)) != len(self.vertebrae):
            raise InputError(f"segment.unet.vertebrae lists a vertebra twice: {list(self.vertebrae)}")
        if self.patch_pixels is not None and any(p % self.multiple for p in self.patch_pixels):
            raise InputError(f"segment.unet.patch_pixels {list(self.patch_pixels)} must be multiples of {self.multiple}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "UNetSettings":
        """From a config mapping; keys that are not settings (e.g. ``model``) are ignored."""
        names = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in dict(cfg).items() if k in names}
        for key in ("vertebrae", "channels", "patch_pixels"):
            if kw.get(key) is not None:
                kw[key] = tuple(kw[key])
        return cls(**kw)

    @property
    def class_names(self) -> list[str]:
        """Class index → bmdpipe structure name (index 0 is ``background``)."""
        return ["background"] + [f"vertebra_{v}" for v in self.vertebrae] + ["bone"]

    @property
    def in_channels(self) -> int:
        return 2 * self.context_slices + 1

    @property
    def multiple(self) -> int:
        """Slice sizes must be multiples of this."""
        from bmdpipe.models.segmentation import size_multiple

        return size_multiple(self.channels, self.full_resolution_level)


#: ``segment.unet`` keys that only change inference: not part of a training rule's params.
INFERENCE_KEYS = ("mc_samples", "inference_grids")


def training_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``segment.unet`` config without :data:`INFERENCE_KEYS` (what training depends on)."""
    return {k: v for k, v in dict(cfg).items() if k not in INFERENCE_KEYS}


# --------------------------------------------------------------------------- class maps


def to_classes(bone_labels: np.ndarray, vertebrae: Sequence[str]) -> np.ndarray:
    """:data:`BONE_LABELS` values → U-Net classes (uint8, same shape): listed vertebrae, other bone, background."""
    lut = np.full(max(BONE_LABELS.values()) + 1, len(vertebrae) + 1, dtype=np.uint8)
    lut[0] = 0
    for i, v in enumerate(vertebrae):
        lut[BONE_LABELS[f"vertebra_{v}"]] = i + 1
    return lut[bone_labels]


def from_classes(classes: np.ndarray, vertebrae: Sequence[str]) -> np.ndarray:
    """U-Net classes → :data:`BONE_LABELS` values (uint8, same shape)."""
    lut = np.array([0] + [BONE_LABELS[f"vertebra_{v}"] for v in vertebrae] + [BONE_LABELS["bone"]], dtype=np.uint8)
    return lut[classes]


# --------------------------------------------------------------------------- working grid


def working_grid(ct: sitk.Image, settings: UNetSettings, shift: float = 0.0) -> sitk.Image:
    """An empty reference image: identity direction, spacing ``(slice_spacing_mm, spacing_mm, spacing_mm)``.

    It covers ``ct``'s box; its y and z sizes are rounded up to a multiple of
    :attr:`UNetSettings.multiple`, the extra voxels split evenly on both sides.
    ``shift`` (voxels, |shift| ≤ 0.5) moves the grid along every axis; a shifted grid
    is one voxel larger, so that it still covers the box.
    """
    spacing = np.array([settings.slice_spacing_mm, settings.spacing_mm, settings.spacing_mm])
    size = np.array(ct.GetSize())
    corners = np.array([ct.TransformContinuousIndexToPhysicalPoint([float(c) for c in np.array(ijk) * (size - 1)])
                        for ijk in np.ndindex(2, 2, 2)])
    half = 0.5 * np.abs(np.array(ct.GetDirection()).reshape(3, 3) @ np.array(ct.GetSpacing()))
    lo, hi = corners.min(axis=0) - half, corners.max(axis=0) + half
    n = np.ceil((hi - lo) / spacing).astype(int) + (1 if shift else 0)
    n[1:] = np.ceil(n[1:] / settings.multiple) * settings.multiple
    origin = (lo + hi) / 2 - (n - 1) / 2 * spacing + shift * spacing
    ref = sitk.Image([int(v) for v in n], sitk.sitkFloat32)
    ref.SetSpacing([float(v) for v in spacing])
    ref.SetOrigin([float(v) for v in origin])
    return ref


def to_working(ct: sitk.Image, ref: sitk.Image) -> np.ndarray:
    """The CT on the working grid ``ref``: anti-aliased, resampled, normalised; float32 ``(z, y, x)``.

    Normalisation: HU clipped to :data:`HU_WINDOW`, divided by 1000 (air −1, water 0).
    """
    img = sitk.Cast(ct, sitk.sitkFloat32)
    # Gaussian anti-aliasing where the working grid is coarser than the CT (physical sigma per CT axis)
    target = np.abs(np.array(ct.GetDirection()).reshape(3, 3)).T @ np.array(ref.GetSpacing())
    sigma = [0.4 * math.sqrt(max(t**2 - s**2, 0.0)) for t, s in zip(target, img.GetSpacing())]
    if max(sigma) > 0:
        img = sitk.SmoothingRecursiveGaussian(img, [max(s, 1e-3) for s in sigma])
    out = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(out)
    return (np.clip(arr, *HU_WINDOW) / 1000.0).astype(np.float32)


def labels_to_working(classes: sitk.Image, ref: sitk.Image) -> np.ndarray:
    """A class map (on the CT grid) on the working grid: the argmax of its linearly resampled one-hot maps.

    Returns:
        uint8 ``(z, y, x)``.
    """
    arr = sitk.GetArrayViewFromImage(classes)
    best = best_p = None
    for c in np.unique(arr):
        p = _resampled(arr == c, classes, ref, outside=float(c == 0))
        if best is None:
            best, best_p = np.full(p.shape, c, np.uint8), p
        else:
            better = p > best_p
            best[better], best_p[better] = c, p[better]
    return best


def sagittal_stack(volume: np.ndarray, index: np.ndarray | Sequence[int], context: int) -> np.ndarray:
    """Network inputs of sagittal slices: ``(len(index), 2 * context + 1, Z, Y)`` float32.

    Args:
        volume: working-grid image ``(z, y, x)``; slices beyond the edges are air (−1).
        index: x indices of the centre slices.
        context: neighbours on each side.
    """
    idx = np.asarray(index)[:, None] + np.arange(-context, context + 1)[None, :]
    inside = (idx >= 0) & (idx < volume.shape[2])
    stack = volume[:, :, np.clip(idx, 0, volume.shape[2] - 1)]  # (Z, Y, B, K)
    stack = np.where(inside[None, None], stack, np.float32(-1.0))
    return np.ascontiguousarray(np.moveaxis(stack, (2, 3), (0, 1)), dtype=np.float32)


# --------------------------------------------------------------------------- training


def _pad_to(arr: np.ndarray, size: Sequence[int], value: float) -> np.ndarray:
    pad = [(max(0, (s - a) // 2), max(0, s - a - (s - a) // 2)) for a, s in zip(arr.shape, size)]
    return np.pad(arr, pad, constant_values=value) if any(p != (0, 0) for p in pad) else arr


class SliceDataset(torch.utils.data.Dataset):
    """Random training slices from working-grid volumes; ``length`` slices per epoch.

    Each item draws a seed from torch's global generator (seeded and
    checkpointed by :func:`bmdpipe.train.loop.fit`), so the sequence is
    reproducible and a resumed run continues it. Volumes are padded (y, z) to
    a common size.

    Args:
        volumes: per patient ``(image (z, y, x) float32 normalised, classes (z, y, x) uint8)``.
        settings: context, classes, sampling.
        length: items per epoch.

    Items: ``(image (2 * context + 1, Z, Y) float32, classes (1, Z, Y) int64)``.
    """

    def __init__(self, volumes: Sequence[tuple[np.ndarray, np.ndarray]], settings: UNetSettings, length: int) -> None:
        from monai.transforms import Compose, RandAffined, RandScaleIntensityd, RandShiftIntensityd

        self.settings = settings
        self.length = length
        zy = np.max([v[0].shape[:2] for v in volumes], axis=0)
        self.cases = []
        n_vert = len(settings.vertebrae)
        for image, classes in volumes:
            image = _pad_to(image, (*zy, image.shape[2]), -1.0)
            classes = _pad_to(classes, (*zy, classes.shape[2]), 0)
            per_slice = ((classes >= 1) & (classes <= n_vert)).sum(axis=(0, 1)).astype(np.float64)
            self.cases.append((image, classes, per_slice / per_slice.sum() if per_slice.any() else None))
        self.transform = Compose([
            RandAffined(keys=["image", "label"], prob=0.7, rotate_range=(0.1,), scale_range=(0.08, 0.08),
                        translate_range=(8, 8), mode=("bilinear", "nearest"), padding_mode="border"),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
        ])

    def __len__(self) -> int:
        return self.length

    def _augment(self, item: dict[str, np.ndarray], state: np.random.RandomState) -> dict[str, Any]:
        """The MONAI augmentations, drawing from ``state``, without metadata tracking (3× faster)."""
        from monai.data import get_track_meta, set_track_meta

        self.transform.set_random_state(state=state)
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            return self.transform(item)
        finally:
            set_track_meta(tracking)

    def _crop(self, stack: np.ndarray, label: np.ndarray, rng: np.random.Generator,
              on_vertebra: bool) -> tuple[np.ndarray, np.ndarray]:
        """A ``patch_pixels`` crop: near a random listed-vertebra pixel (± a quarter patch), else anywhere."""
        size = np.array(self.settings.patch_pixels)
        shape = np.array(stack.shape[1:])
        if np.any(shape < size):  # small slices: pad with air / background
            pad = [(0, 0)] + [(0, int(max(0, d))) for d in size - shape]
            stack = np.pad(stack, pad, constant_values=-1.0)
            label = np.pad(label, pad, constant_values=0)
            shape = np.array(stack.shape[1:])
        vert = np.argwhere((label[0] >= 1) & (label[0] <= len(self.settings.vertebrae)))
        if on_vertebra and vert.size:
            centre = vert[rng.integers(len(vert))] + rng.integers(-size // 4, size // 4 + 1)
            start = np.clip(centre - size // 2, 0, shape - size)
        else:
            start = np.array([rng.integers(0, shape[k] - size[k] + 1) for k in range(2)])
        z, y = (slice(int(start[k]), int(start[k] + size[k])) for k in range(2))
        return stack[:, z, y], label[:, z, y]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        rng = np.random.default_rng(seed)
        image, classes, vertebra_weight = self.cases[i % len(self.cases)]
        on_vertebra = vertebra_weight is not None and rng.random() < self.settings.vertebra_slice_fraction
        if on_vertebra:
            x = int(rng.choice(vertebra_weight.size, p=vertebra_weight))
        else:
            x = int(rng.integers(image.shape[2]))
        stack = sagittal_stack(image, [x], self.settings.context_slices)[0]
        label = classes[None, :, :, x]
        if self.settings.patch_pixels is not None:
            stack, label = self._crop(stack, label, rng, on_vertebra)
        if rng.random() < 0.5:  # left-right mirror: the neighbours swap sides
            stack = stack[::-1]
        item = {"image": np.ascontiguousarray(stack), "label": np.ascontiguousarray(label)}
        item = self._augment(item, np.random.RandomState(seed))
        image_t = torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32)
        label_t = torch.as_tensor(np.asarray(item["label"]), dtype=torch.int64)
        return image_t, label_t


def build_network(settings: UNetSettings) -> torch.nn.Module:
    """The (untrained) Bayesian U-Net of ``settings``."""
    from bmdpipe.models.segmentation import bayesian_unet

    return bayesian_unet(len(settings.class_names), settings.channels, settings.dropout, settings.res_units,
                         in_channels=settings.in_channels, spatial_dims=2,
                         full_resolution_level=settings.full_resolution_level)


def fit_unet(volumes: Sequence[tuple[np.ndarray, np.ndarray]], settings: UNetSettings, work_dir: str | os.PathLike[str],
             *, device: str | torch.device = "cpu", progress: bool = False) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """Train the Bayesian U-Net on working-grid volumes.

    Args:
        volumes: per patient ``(image (z, y, x) float32 normalised, classes (z, y, x) uint8)``.
        settings: network and training settings.
        work_dir: where :func:`~bmdpipe.train.loop.fit` keeps ``last.pt`` and
            ``metrics.csv`` (a run resumes from them).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.

    Returns:
        ``(model on device, history)``; the history has one row per epoch
        (``epoch``, ``loss``, ``seconds``).
    """
    from monai.losses import DiceCELoss

    from bmdpipe.train.loop import TrainConfig, TrainState, fit, seed_everything, unwrap, update, wrap_ddp

    dev = resolve_device(device)
    cfg = TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size, seed=settings.seed, num_workers=0)
    seed_everything(settings.seed)
    model = wrap_ddp(build_network(settings), dev)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, settings.epochs))
    state = TrainState({"model": model}, {"model": opt}, {"model": sched}, device=dev)
    # Dice over the whole batch (a slice often lacks a class), without background; plus cross-entropy
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    data = SliceDataset(volumes, settings, settings.steps_per_epoch * settings.batch_size)

    def step(state: TrainState, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        x, y = (t.to(dev) for t in batch)
        loss = loss_fn(model(x).float(), y)
        update(loss, opt, state.scaler)
        return {"loss": float(loss.item())}

    fit(state, data, step, cfg, work_dir, progress=progress)
    return unwrap(model), state.history


def _read_case(case: Mapping[str, Any]) -> tuple[sitk.Image, sitk.Image]:
    """A training case's CT (HU) and its labels in :data:`BONE_LABELS` on the CT grid."""
    from bmdpipe.io.ct import read_ct
    from bmdpipe.segment import labels_from_map, read_label_table
    from bmdpipe.workflow import upstream_failure

    if case.get("upstream"):
        upstream_failure(case["upstream"])
    ct, _ = read_ct(case["ct"])
    lab_path = Path(case["labels"])
    if not lab_path.exists():
        raise InputError(f"{lab_path}: label map not found; check the 'ct_labels' column of the samples sheet")
    if not case.get("label_table"):
        raise InputError(f"{lab_path}: no label table given for this label map (sheet column 'label_table')")
    labels, _ = labels_from_map(sitk.ReadImage(str(lab_path)), read_label_table(case["label_table"]), ct,
                                source=str(lab_path))
    return ct, labels


def prepare_case(ct: sitk.Image, bone_labels: sitk.Image, settings: UNetSettings) -> tuple[np.ndarray, np.ndarray]:
    """A CT and its :data:`BONE_LABELS` map (CT grid) → working-grid ``(image, classes)`` arrays."""
    ref = working_grid(ct, settings)
    classes = sitk.GetImageFromArray(to_classes(sitk.GetArrayViewFromImage(bone_labels), settings.vertebrae))
    classes.CopyInformation(bone_labels)
    return to_working(ct, ref), labels_to_working(classes, ref)


def train_segmenter(cases: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike[str],
                    settings: UNetSettings = UNetSettings(), *, device: str = "cpu",
                    progress: bool = False) -> dict[str, Any]:
    """Train the segmentation U-Net on labelled patients; write the model folder.

    Args:
        cases: per patient ``patient_id``, ``ct`` (ingested ``ct.nii.gz``, a NIfTI or
            a DICOM folder), ``labels`` (label map in any scheme), ``label_table``
            and optionally ``upstream`` (the CT stage's summary JSON; a failed
            upstream stage skips the patient).
        out_dir: model folder: ``model.pt`` (weights and settings),
            ``training.json`` (summary with the loss curve), ``metrics.csv`` and
            ``last.pt`` (the resumable checkpoint).
        settings: network and training settings.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.

    Returns:
        The summary written to ``training.json``.

    Raises:
        InputError: no case could be read (each case's reason is in the message).
    """
    from bmdpipe import __version__
    from bmdpipe.io.atomic import atomic_path, write_json

    out = Path(out_dir)
    start = time.perf_counter()
    volumes, used, skipped = [], [], {}
    voxels = np.zeros(len(settings.class_names), dtype=np.int64)
    for case in cases:
        pid = str(case["patient_id"])
        try:
            ct, labels = _read_case(case)
        except InputError as exc:
            log.warning("training case %s skipped: %s", pid, exc)
            skipped[pid] = str(exc)
            continue
        image, classes = prepare_case(ct, labels, settings)
        voxels += np.bincount(classes.ravel(), minlength=voxels.size)
        volumes.append((image, classes))
        used.append(pid)
    if not volumes:
        reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "no patient has a label map in the sheet"
        raise InputError(f"segmentation U-Net: no usable training patient ({reasons})")
    missing = [n for n, c in zip(settings.class_names, voxels) if c == 0]
    if missing:
        raise InputError(f"segmentation U-Net: class(es) {missing} absent from every training label map "
                         f"(patients {used}); change segment.unet.vertebrae")
    prep_s = time.perf_counter() - start
    log.info("training on %d patients (%s), %d skipped; working grid %.1f mm", len(used), ", ".join(used),
             len(skipped), settings.spacing_mm)
    t0 = time.perf_counter()
    model, history = fit_unet(volumes, settings, out, device=device, progress=progress)
    train_s = time.perf_counter() - t0
    dev = next(model.parameters()).device
    with atomic_path(out / "model.pt") as tmp:
        torch.save({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                    "settings": asdict(settings), "class_names": settings.class_names,
                    "code_version": STAGE_VERSION}, tmp)
    summary = {
        "stage": "train_segmenter", "status": "ok", "code_version": STAGE_VERSION, "bmdpipe_version": __version__,
        "settings": asdict(settings), "class_names": settings.class_names,
        "patients": used, "skipped": skipped,
        "training_voxels_per_class": dict(zip(settings.class_names, voxels.tolist())),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "device": str(dev), "torch_threads": torch.get_num_threads(),
        "loss_per_epoch": [round(float(r.get("loss", float("nan"))), 5) for r in history],
        "prepare_seconds": round(prep_s, 2), "train_seconds": round(train_s, 2),
    }
    write_json(out / "training.json", summary)
    return summary


# --------------------------------------------------------------------------- inference


@dataclass
class Segmenter:
    """A trained U-Net ready for inference (see :func:`load_segmenter`)."""

    model: torch.nn.Module
    settings: UNetSettings
    device: torch.device
    meta: dict[str, Any] = field(default_factory=dict)


def load_segmenter(model_dir: str | os.PathLike[str], *, device: str = "cpu") -> Segmenter:
    """Load ``model.pt`` from a folder written by :func:`train_segmenter`.

    Raises:
        InputError: the folder holds no model (its ``training.json`` reason is repeated when present).
    """
    d = Path(model_dir)
    path = d / "model.pt"
    if not path.exists():
        reason = ""
        if (d / "training.json").exists():
            reason = ": " + json.loads((d / "training.json").read_text()).get("reason", "")
        raise InputError(f"{d}: no trained segmentation model (model.pt){reason}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    settings = UNetSettings.from_config(payload["settings"])
    dev = resolve_device(device)
    model = build_network(settings)
    model.load_state_dict(payload["state_dict"])
    meta = {"model_dir": str(d), "code_version": payload.get("code_version")}
    if (d / "training.json").exists():
        meta["trained_on"] = len(json.loads((d / "training.json").read_text()).get("patients", []))
    return Segmenter(model.to(dev), settings, dev, meta)


def predict(seg: Segmenter, ct: sitk.Image, *, mc_samples: int | None = None, grids: int | None = None,
            batch_slices: int = 16, with_mutual_information: bool = False,
            ) -> tuple[sitk.Image, sitk.Image, dict[str, Any]]:
    """Segment a CT with MC dropout on one or more shifted working grids.

    Args:
        seg: the loaded model.
        ct: CT in HU, any grid and direction.
        mc_samples: stochastic passes, all grids together (default: the model's ``mc_samples``),
            shared out as evenly as they go.
        grids: working grids, shifted by ``1 / grids`` of a voxel from each other along every
            axis (default: the model's ``inference_grids``; at most ``mc_samples``).
        batch_slices: sagittal slices per network call.
        with_mutual_information: also return the mutual information map (nats, float32 on
            the CT grid; the mean of the grids' maps) under ``"mutual_information"`` in the info dict.

    Returns:
        ``(labels, uncertainty, info)``: labels uint8 in :data:`BONE_LABELS` on the CT
        grid, the argmax of the mean softmax of all passes interpolated to the CT grid; uncertainty
        float32 on the CT grid, the predictive entropy (nats) of that mean; info:
        ``seconds``, ``network_seconds``, ``mc_samples`` (passes run), ``grids``,
        ``working_spacing_mm``.
    """
    from bmdpipe.models.segmentation import enable_mc_dropout, mc_dropout_predict

    s = seg.settings
    n = int(mc_samples or s.mc_samples)
    g = max(1, min(n, int(grids or s.inference_grids)))
    t0 = time.perf_counter()
    enable_mc_dropout(seg.model)
    n_classes = len(s.class_names)
    size = ct.GetSize()[::-1]
    prob_ct = np.zeros((n_classes, *size), np.float32)
    mi_ct = np.zeros(size, np.float32) if with_mutual_information else None
    net_s = 0.0
    for gi in range(g):
        passes = n // g + (1 if gi < n % g else 0)
        ref = working_grid(ct, s, shift=(gi + 0.5) / g - 0.5)
        volume = to_working(ct, ref)
        prob = np.zeros((n_classes, *volume.shape), np.float32)
        prob[0] = 1.0  # slices without body: background
        mi = np.zeros(volume.shape, np.float32)
        body = np.flatnonzero((volume > AIR_BODY).any(axis=(0, 1)))
        t1 = time.perf_counter()
        for k, start in enumerate(range(0, body.size, batch_slices)):
            xs = body[start:start + batch_slices]
            x = torch.from_numpy(sagittal_stack(volume, xs, s.context_slices)).to(seg.device)
            with torch.autocast(seg.device.type, enabled=seg.device.type == "cuda"):
                out = mc_dropout_predict(seg.model, x, passes, generator_seed=s.seed + 7919 * gi + k)
            prob[:, :, :, xs] = np.moveaxis(out["probability"].float().cpu().numpy(), 0, -1)
            mi[:, :, xs] = np.moveaxis(out["mutual_information"].float().cpu().numpy(), 0, -1)
        net_s += time.perf_counter() - t1
        for c in range(n_classes):
            prob_ct[c] += passes * _resampled(prob[c], ref, ct)
        if mi_ct is not None:
            mi_ct += _resampled(mi, ref, ct) / g
    prob_ct /= n
    best = np.argmax(prob_ct, axis=0).astype(np.uint8)
    ent = -(prob_ct * np.log(np.clip(prob_ct, 1e-8, None))).sum(axis=0)
    del prob_ct
    if s.largest_component:
        best = keep_largest_vertebra_components(best, len(s.vertebrae))
    labels = sitk.GetImageFromArray(from_classes(best, s.vertebrae))
    labels.CopyInformation(ct)
    unc = sitk.GetImageFromArray(np.clip(ent, 0.0, None).astype(np.float32))
    unc.CopyInformation(ct)
    info: dict[str, Any] = {"mc_samples": n, "grids": g, "working_spacing_mm": list(ref.GetSpacing()),
                            "network_seconds": round(net_s, 2), "seconds": round(time.perf_counter() - t0, 2)}
    if mi_ct is not None:
        info["mutual_information"] = mi_ct
    return labels, unc, info


def _resampled(arr: np.ndarray, grid: sitk.Image, target: sitk.Image, outside: float = 0.0) -> np.ndarray:
    """A map ``(z, y, x)`` on ``grid``'s voxels linearly resampled onto ``target``'s, float32; ``outside``
    where ``target`` reaches beyond ``grid``."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=np.float32))
    img.CopyInformation(grid)
    return sitk.GetArrayFromImage(sitk.Resample(img, target, sitk.Transform(), sitk.sitkLinear, outside,
                                                sitk.sitkFloat32))


def keep_largest_vertebra_components(classes: np.ndarray, n_vertebrae: int) -> np.ndarray:
    """Each vertebra class keeps its largest connected part; other parts become ``bone`` (class ``n_vertebrae + 1``).

    A vertebra is one piece of bone: islands of its class elsewhere (a rib head,
    a neighbour's process) are bone the network misnamed. Works in place on
    ``classes`` (``(z, y, x)`` uint8) and returns it.
    """
    from scipy import ndimage

    for c in range(1, n_vertebrae + 1):
        mask = classes == c
        comp, n = ndimage.label(mask)
        if n > 1:
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            classes[mask & (comp != int(np.argmax(sizes)))] = n_vertebrae + 1
    return classes


# --------------------------------------------------------------------------- evaluation


def evaluate(pred: sitk.Image, truth: sitk.Image, uncertainty: sitk.Image, vertebrae: Sequence[str],
             *, band_mm: float = 5.0) -> dict[str, Any]:
    """Dice per vertebra and how well the uncertainty ranks wrong voxels, on the CT grid.

    Args:
        pred, truth: :data:`BONE_LABELS` maps on the same grid.
        uncertainty: float map on that grid (higher = less sure).
        vertebrae: the vertebra classes (others count as ``bone``).
        band_mm: the AUROC is taken over voxels within this distance of bone
            (truth or predicted), where nearly all errors lie; ``auroc_field``
            is over the whole field.

    Returns:
        ``dice``: vertebra → Dice (vertebrae present in the truth); ``dice_bone``:
        Dice of all bone; ``error_fraction_band``; ``auroc_band``, ``auroc_field``:
        AUROC of the uncertainty as a score for "voxel misclassified" (U-Net classes).
    """
    from scipy import ndimage

    from bmdpipe.evaluate.metrics import auc

    p = to_classes(sitk.GetArrayViewFromImage(pred), vertebrae)
    t = to_classes(sitk.GetArrayViewFromImage(truth), vertebrae)
    u = sitk.GetArrayViewFromImage(uncertainty)
    dice = {}
    for i, v in enumerate(vertebrae):
        a, b = p == i + 1, t == i + 1
        if b.any():
            dice[v] = 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())
    bone_p, bone_t = p > 0, t > 0
    wrong = p != t
    sampling = tuple(reversed(truth.GetSpacing()))
    band = ndimage.distance_transform_edt(~(bone_p | bone_t), sampling=sampling) <= band_mm
    out: dict[str, Any] = {
        "dice": dice,
        "dice_bone": 2.0 * float((bone_p & bone_t).sum()) / float(bone_p.sum() + bone_t.sum()),
        "error_fraction_band": float(wrong[band].mean()),
        "band_mm": band_mm,
    }
    out["auroc_band"] = auc(wrong[band], u[band]) if 0 < wrong[band].sum() < band.sum() else float("nan")
    out["auroc_field"] = auc(wrong, u) if 0 < wrong.sum() < wrong.size else float("nan")
    return out
