"""Settings of the training stages (config ``train``; every key in schemas/config.schema.yaml)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

#: Bump when a change to the training code changes what it learns (the training rules re-run).
STAGE_VERSION = "1"
#: Bump when a change to stage 3's model changes what it learns (train_regression re-runs, the others do not).
#: 2: the head's linear layer reads the pooled features without a LayerNorm in front.
REGRESSION_VERSION = "2"
#: Stage 3's code version (its rules' ``code_version`` and its train.json): the training code's and its model's.
REGRESSION_CODE_VERSION = f"{STAGE_VERSION}+regression{REGRESSION_VERSION}"


@dataclass(frozen=True)
class DecompositionSettings:
    """The hierarchical GAN (seed 004 §3.2, §4.2.7).

    Attributes:
        generator: ``hrnet`` (HRNet encoder + pix2pixHD decoder) or ``resnet`` (seed 004 Table 3's baseline).
        encoder: timm HRNet name.
        ngf, ndf: generator decoder / discriminator widths.
        n_layers, num_d: PatchGAN depth and number of scales.
        stage1_epochs, stage2_epochs: epochs per stage.
        stage2_from_scratch: the ablation: stage 2 without stage 1's weights.
        lr, weight_decay: AdamW (betas 0.5, 0.999 as pix2pixHD).
        restart_epochs: first period of the cosine warm restarts, epochs.
        lambda_fm, lambda_l1, lambda_gc: loss weights (seed 004: 10, 100, 1).
        thresholds: candidate thresholds t, g/cm², for BMD from the predicted ROI image.
        fit_on: ``predicted`` (the generator's images of the training views) or ``true`` (their true ROI
            images): what t and the BMD line are fitted on.
    """

    generator: str = "hrnet"
    encoder: str = "hrnet_w18_small"
    ngf: int = 16
    ndf: int = 16
    n_layers: int = 3
    num_d: int = 3
    stage1_epochs: int = 10
    stage2_epochs: int = 10
    stage2_from_scratch: bool = False
    lr: float = 2e-4
    weight_decay: float = 1e-2
    restart_epochs: int = 10
    lambda_fm: float = 10.0
    lambda_l1: float = 100.0
    lambda_gc: float = 1.0
    thresholds: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2)
    fit_on: str = "predicted"

    def arch(self, out_channels: int) -> dict[str, Any]:
        return {"kind": self.generator, "encoder": self.encoder, "ngf": self.ngf, "out_channels": out_channels}


@dataclass(frozen=True)
class RegressionSettings:
    """Stage 3 (seed 004 §3.3): inherited encoder + transformer head; encoder frozen, then tuned.

    Attributes:
        dims, depths, heads: per transformer stage of the head.
        frozen_epochs: epochs with the encoder frozen, at ``lr``.
        tune_epochs: then end-to-end at ``tune_lr``.
    """

    dims: tuple[int, ...] = (64, 128)
    depths: tuple[int, ...] = (1, 1)
    heads: tuple[int, ...] = (2, 4)
    frozen_epochs: int = 10
    tune_epochs: int = 5
    lr: float = 5e-4
    tune_lr: float = 5e-5
    weight_decay: float = 1e-2
    restart_epochs: int = 10


@dataclass(frozen=True)
class BaselineSettings:
    """Conventional direct regression from the radiograph crop (seed 004's Hsieh et al.-style comparison)."""

    model: str = "resnet18"
    epochs: int = 20
    lr: float = 5e-4
    weight_decay: float = 1e-2
    restart_epochs: int = 10


@dataclass(frozen=True)
class LocaliserSettings:
    """The crop localiser of ``bmdpipe predict`` (:mod:`bmdpipe.train.localise`): a heatmap U-Net on the whole radiograph.

    Attributes:
        size: the radiograph is letterboxed to ``size × size`` pixels (a multiple of 2^(levels-1)).
        channels: U-Net feature channels per level.
        sigma_px: SD of the target Gaussians, grid pixels.
        foreground_weight: squared errors weigh ``1 + foreground_weight × target`` (see
            :func:`bmdpipe.models.landmarks.heatmap_loss`).
        epochs, batch_size, lr, weight_decay, restart_epochs: AdamW with cosine warm restarts.
        augment: :class:`bmdpipe.train.data.Augment` keys (image and heatmaps move together).
        prior_sigma_px: seed 000's landmark detector only (:func:`bmdpipe.train.chest.detect`): each
            landmark is the peak of its map times a Gaussian of this SD (grid pixels) around its mean place
            on the training radiographs; 0 = the plain peak.
    """

    size: int = 96
    channels: tuple[int, ...] = (8, 16, 32, 64)
    sigma_px: float = 3.0
    foreground_weight: float = 20.0
    epochs: int = 100
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    restart_epochs: int = 100
    augment: dict[str, Any] = field(default_factory=lambda: {
        "rotate_deg": 8, "scale": 0.1, "translate": 0.08, "brightness": 0.3, "contrast": 0.3, "hflip": True})
    prior_sigma_px: float = 0.0


@dataclass(frozen=True)
class ChestBmdSettings:
    """Seed 000's five models (:mod:`bmdpipe.train.chest_bmd`), trained on the shared folds.

    Attributes:
        variants: which of :data:`bmdpipe.models.multiroi.VARIANTS` to train.
        input_size: side of every input (whole image, patch, ROI), pixels (seed 000: 256).
        width: VGG16 channel multiplier (1: torchvision's 64…512).
        hidden: width of the two-layer regressors.
        batch_norm: VGG16 with batch normalisation (torchvision's ``vgg16_bn``): trains from scratch in few epochs.
        activation: the regressors' hidden activation, ``gelu`` or seed 000's ``relu`` (whose units die under
            AdamW on the non-negative VGG16 features: :func:`bmdpipe.models.multiroi.regressor`).
        layers, heads, feedforward: the attentive models' transformer encoder (seed 000: 6 layers).
        dropout, pooling: the attentive models' transformer dropout and global feature
            (:class:`bmdpipe.models.multiroi.MultiInput`). Defaults: no dropout (seed 000 gives none) and the BMD
            token's output (``token``; seed 000 Eq. 4 takes the ``mean`` of the outputs). Measured on the
            150-patient benchmark (3 folds, 60 epochs), AttMultiROI's held-out PCC vs DXA L1 per fold (pooled):
            0.16 / 0.22 / 0.39 (0.21) with PyTorch's 0.1 and the mean, 0.45 / 0.30 / 0.41 (0.33) with 0 and the
            mean, 0.37 / 0.61 / 0.46 (0.48) with 0 and the token; on the synthetic set of tests/test_chest_bmd.py
            (48 held-out views, 3 seeds) 0.53-0.70 with 0.1 and the mean, 0.70-0.83 with 0 and the token.
        local_weight: weight of the local regressors' L2 in the loss (training only).
        per_vertebra: one model per BMD column, as seed 000 (one per vertebra); False: one model with a
            head per column.
        epochs, batch_size, lr, weight_decay, restart_epochs: AdamW with cosine warm restarts (seed 000 used SGD
            at 1e-4 for 100 epochs, too slow to converge at demo size).
        attentive_lr: the attentive variants' learning rate (None: ``lr``). At lr 1e-3 AttMultiROI underfits its
            own training views (150-patient benchmark, fold 0, 60 epochs: training PCC vs DXA L1 0.58; 0.91 at
            3e-4).
        augment: :class:`bmdpipe.train.data.Augment` keys, applied to each input. Geometric only, as seed 000
            §III-E (scaling, rotation, translation, flip): a random brightness or contrast on the standardised
            input scrambles the bone's brightness, which is the signal. Measured on the 150-patient benchmark,
            fold 0, MultiROI at demo size (15 epochs), held-out PCC vs DXA T12 / L1: 0.22 / 0.26 with
            brightness and contrast 0.2, 0.34 / 0.33 without.
        min_landmark_confidence: a radiograph whose lowest landmark heatmap peak is below this is flagged in
            ``landmarks.tsv`` (its ROIs may be cut at the wrong place).
    """

    variants: tuple[str, ...] = ("Base", "MultiPatch", "AttMultiPatch", "MultiROI", "AttMultiROI")
    input_size: int = 32
    width: float = 0.125
    hidden: int = 64
    batch_norm: bool = True
    activation: str = "gelu"
    layers: int = 6
    heads: int = 8
    feedforward: int = 128
    dropout: float = 0.0
    pooling: str = "token"
    local_weight: float = 1.0
    per_vertebra: bool = False
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 4e-4
    restart_epochs: int = 30
    attentive_lr: float | None = None
    augment: dict[str, Any] = field(default_factory=lambda: {
        "rotate_deg": 5, "scale": 0.1, "translate": 0.05, "hflip": True})
    min_landmark_confidence: float = 0.4


@dataclass(frozen=True)
class TrainSettings:
    """What every training stage shares.

    Attributes:
        folds: K of the patient-level K-fold split; ``fold_seed`` fixes it.
        sites: the stage-2 channels (ROI sites) and BMD sites.
        measures: BMD kinds from the sheet (``dxa``, ``qct``): columns ``{measure}_{site}`` that exist.
        image_size: training ``(rows, cols)``; the targets are area-averaged to it.
        views: train on these poses only (seed 004 §4.2.3); None: all. Test folds keep every pose.
        batch_size: per process.
        seed: of weights and batches (the fold number is added).
        device: ``auto``, ``cpu`` or ``cuda``; AMP on CUDA when ``amp``.
        processes: DistributedDataParallel processes per training job, under torchrun
            (:mod:`bmdpipe.train.launch`): one per GPU with ``device`` cuda; gloo processes on the CPU.
            ``batch_size`` is per process.
        augment: :class:`bmdpipe.train.data.Augment` keys.
    """

    folds: int = 3
    fold_seed: int = 0
    sites: tuple[str, ...] = ("L1", "L2", "L3")
    measures: tuple[str, ...] = ("dxa", "qct")
    image_size: tuple[int, int] = (128, 128)
    views: tuple[str, ...] | None = None
    batch_size: int = 4
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    processes: int = 1
    augment: dict[str, Any] = field(default_factory=dict)
    decomposition: DecompositionSettings = DecompositionSettings()
    regression: RegressionSettings = RegressionSettings()
    baseline: BaselineSettings = BaselineSettings()
    localiser: LocaliserSettings = LocaliserSettings()
    chest_landmarks: LocaliserSettings = LocaliserSettings()  # seed 000's detector (bmdpipe.train.chest)
    chest_bmd: ChestBmdSettings = ChestBmdSettings()  # seed 000's models (bmdpipe.train.chest_bmd)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "TrainSettings":
        cfg = dict(cfg or {})
        subs = {"decomposition": DecompositionSettings, "regression": RegressionSettings, "baseline": BaselineSettings,
                "localiser": LocaliserSettings, "chest_landmarks": LocaliserSettings,
                "chest_bmd": ChestBmdSettings}
        for key, kind in subs.items():
            cfg[key] = kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in (cfg.get(key) or {}).items()})
        for key in ("sites", "measures", "image_size", "views"):
            if cfg.get(key) is not None:
                cfg[key] = tuple(cfg[key])
        return cls(**cfg)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def work_dir(root: str | Path, *parts: Any) -> Path:
    """Checkpoint folder of a training job, keyed by a hash of ``parts`` (settings, code version, patients).

    A killed job resumes from here; a job with other settings starts afresh in its own folder.
    Snakemake deletes a rule's output before re-running it, so checkpoints cannot live there.
    """
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return Path(root) / hashlib.sha256(blob).hexdigest()[:16]
