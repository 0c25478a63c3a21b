"""Seed 000's models (Wang et al., lumbar BMD from chest radiographs), all on a shared VGG16 extractor.

* :class:`BaseModel`: the whole image → VGG16 → global average pooling → 2-layer regressor.
* :class:`MultiInput` with ``attentive=False``: N inputs (3×3 patches, or 14 ROIs
  + the whole image) → shared VGG16 → concatenated features → regressor
  (MultiPatch, MultiROI).
* :class:`MultiInput` with ``attentive=True``: the same features with learned
  position embeddings and a learnable BMD token → transformer encoder (6
  layers) → the *mean* of the output embeddings → global regressor; one local
  regressor per input, used in the training loss only (AttMultiPatch,
  AttMultiROI, the proposed model).

Inputs: ``(B, N, 1, S, S)`` crops (S = 256 in the paper); outputs ``(B, K)`` BMD
values; attentive models also return the local predictions ``(B, N, K)``.

Where the paper is inconsistent: it states D = 512 (the VGG16 width) and
k = 6 heads, but 512 is not divisible by 6; ``heads = 8`` is used (64 per
head). Its Eq. 4 averages the adjusted embeddings, including the BMD token,
which is what :meth:`MultiInput.forward` does.

``width`` scales every VGG16 layer's channels (1 = torchvision's 64…512, D = 512); the demo uses a
narrow VGG16 (same 13 convolutions and 5 poolings) so that the five variants train on 2 CPU cores.
:data:`VARIANTS` names the five models and their inputs; :func:`build_chest_model` builds one from its
description.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

VGG_WIDTH = 512

#: Seed 000's five models: name → (inputs: ``whole`` image, 3×3 ``patches`` or 14 ``rois`` + the whole image,
#: number of inputs, attentive fusion).
VARIANTS = {
    "Base": ("whole", 1, False),
    "MultiPatch": ("patches", 9, False),
    "AttMultiPatch": ("patches", 9, True),
    "MultiROI": ("rois", 15, False),
    "AttMultiROI": ("rois", 15, True),
}


def feature_width(width: float = 1.0) -> int:
    """Channels of the last VGG16 block (D): ``512 × width``."""
    return max(1, int(round(VGG_WIDTH * width)))


def vgg16_features(in_channels: int = 1, width: float = 1.0, batch_norm: bool = False) -> nn.Module:
    """torchvision's VGG16 convolutional part (configuration D), no pretrained weights, first layer for
    ``in_channels``, every layer's channels × ``width``; ``batch_norm`` as torchvision's ``vgg16_bn``.

    Shapes:
        ``(B, in_channels, S, S)`` → ``(B, D)`` after global average pooling, D = :func:`feature_width`.
    """
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers([v if v == "M" else max(1, int(round(v * width))) for v in cfgs["D"]], batch_norm=batch_norm)
    first = features[0]
    features[0] = nn.Conv2d(in_channels, first.out_channels, first.kernel_size, first.stride, first.padding)
    return nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten())


#: The attentive models' global feature (:class:`MultiInput`).
POOLINGS = ("mean", "token")

#: The regressors' activations: seed 000's ReLU, and GELU (the default of :class:`ChestBmdSettings`).
ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU}


def regressor(in_features: int, n_outputs: int, hidden: int = 256, activation: str = "relu") -> nn.Module:
    """Two linear layers with an activation between (seed 000 §III-D: ReLU).

    The pooled VGG16 features are all ≥ 0, so AdamW moves a hidden unit's weights together and a ReLU unit
    can go silent on every input; measured on the 150-patient benchmark (fold 0, MultiROI, lr 1e-3) 58 of
    its 64 units never fired on its training views, and on a synthetic set all 64 (a constant prediction).
    GELU keeps a gradient below 0; the same synthetic case reaches held-out PCC 0.88.
    """
    return nn.Sequential(nn.Linear(in_features, hidden), ACTIVATIONS[activation](), nn.Linear(hidden, n_outputs))


class BaseModel(nn.Module):
    """Whole image → BMD. Shapes: ``(B, 1, S, S)`` (or ``(B, 1, 1, S, S)``) → ``(B, K)``."""

    def __init__(self, n_outputs: int = 1, *, width: float = 1.0, hidden: int = 256, batch_norm: bool = False,
                 activation: str = "relu") -> None:
        super().__init__()
        self.features = vgg16_features(width=width, batch_norm=batch_norm)
        self.regressor = regressor(feature_width(width), n_outputs, hidden, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.regressor(self.features(x.flatten(1, 2) if x.dim() == 5 else x))


class MultiInput(nn.Module):
    """MultiPatch / MultiROI (plain concatenation) and their attentive variants.

    Args:
        n_inputs: 9 (3×3 patches) or 15 (14 ROIs + whole image).
        attentive: transformer fusion with a BMD token instead of concatenation.
        layers, heads: transformer encoder size (6 layers; 8 heads, see module docstring).
        feedforward: MLP width; 256 gives the paper's 7.9M encoder parameters (§IV-A).
        activation: the regressors' (:data:`ACTIVATIONS`; why GELU: :func:`regressor`).
        dropout: the transformer layers' dropout (seed 000 gives none; 0.1 is PyTorch's default).
        pooling: the global feature: ``mean`` of the output embeddings, BMD token included (seed 000 Eq. 4), or
            ``token``, the BMD token's output alone (as a ViT's class token).
    """

    def __init__(self, n_inputs: int, n_outputs: int = 1, *, attentive: bool, layers: int = 6, heads: int = 8,
                 feedforward: int = 256, width: float = 1.0, hidden: int = 256, batch_norm: bool = False,
                 activation: str = "relu", dropout: float = 0.1, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
        self.attentive = attentive
        self.pooling = pooling
        self.dim = d = feature_width(width)
        self.features = vgg16_features(width=width, batch_norm=batch_norm)
        if attentive:
            self.bmd_token = nn.Parameter(torch.zeros(1, 1, d))
            self.pos_embed = nn.Parameter(torch.randn(1, n_inputs + 1, d) * 0.02)
            layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=feedforward, dropout=dropout,
                                               activation="gelu", batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.regressor = regressor(d, n_outputs, hidden, activation)
            self.local_regressors = nn.ModuleList(regressor(d, n_outputs, hidden, activation) for _ in range(n_inputs))
        else:
            self.regressor = regressor(d * n_inputs, n_outputs, hidden, activation)

    def forward(self, crops: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        b, n = crops.shape[:2]
        f = self.features(crops.flatten(0, 1)).view(b, n, self.dim)
        if not self.attentive:
            return self.regressor(f.flatten(1))
        z = torch.cat([self.bmd_token.expand(b, -1, -1), f], dim=1) + self.pos_embed
        z = self.encoder(z)
        global_pred = self.regressor(z.mean(dim=1) if self.pooling == "mean" else z[:, 0])
        local = torch.stack([reg(f[:, i]) for i, reg in enumerate(self.local_regressors)], dim=1)
        return global_pred, local


def split_patches(image: torch.Tensor, n: int = 3, size: int | None = None) -> torch.Tensor:
    """``(B, 1, H, W)`` → ``(B, n·n, 1, size, size)``: non-overlapping n×n patches, each resized to ``size``."""
    b, c, h, w = image.shape
    ph, pw = h // n, w // n
    patches = image[:, :, : ph * n, : pw * n].unfold(2, ph, ph).unfold(3, pw, pw)  # B C n n ph pw
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b * n * n, c, ph, pw)
    if size is not None:
        patches = F.interpolate(patches, size=(size, size), mode="bilinear", align_corners=False)
    return patches.view(b, n * n, c, *patches.shape[-2:])


def multiroi_loss(global_pred: torch.Tensor, local_pred: torch.Tensor | None, target: torch.Tensor,
                  local_weight: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """L2 on the global prediction plus the mean L2 of the local ones (seed 000 §III-D; training only).

    Shapes: ``global_pred`` and ``target`` ``(B, K)``, ``local_pred`` ``(B, N, K)`` (None: the plain models);
    ``mask`` ``(B, K)`` weighs each label (0 where the sheet has none; None: all 1).
    """
    mask = torch.ones_like(target) if mask is None else mask
    denom = mask.sum().clamp_min(1.0)
    loss = ((global_pred - target) ** 2 * mask).sum() / denom
    if local_pred is not None:
        loss = loss + local_weight * ((local_pred - target[:, None]) ** 2 * mask[:, None]).sum() / (
            denom * local_pred.shape[1])
    return loss


def build_chest_model(arch: dict) -> nn.Module:
    """One of :data:`VARIANTS` from ``{"variant", "n_outputs", "width", "hidden", "batch_norm", "activation",
    "layers", "heads", "feedforward", "dropout", "pooling"}`` (the last five for the attentive ones; no
    ``activation``: ReLU; no ``dropout`` / ``pooling``: 0.1 / ``mean``, what models saved before them used)."""
    kind, n_inputs, attentive = VARIANTS[arch["variant"]]
    common = {"width": arch["width"], "hidden": arch["hidden"], "batch_norm": arch.get("batch_norm", False),
              "activation": arch.get("activation", "relu")}  # models saved before the choice: ReLU
    if kind == "whole":
        return BaseModel(arch["n_outputs"], **common)
    extra = {**{k: arch[k] for k in ("layers", "heads", "feedforward")}, "dropout": arch.get("dropout", 0.1),
             "pooling": arch.get("pooling", "mean")} if attentive else {}  # saved before the choice: 0.1, mean
    return MultiInput(n_inputs, arch["n_outputs"], attentive=attentive, **common, **extra)
