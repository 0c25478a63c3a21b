"""Stage-3 regression (seed 004 §3.3) and the conventional direct-regression baseline.

* :class:`RegressionHead`: CoAtNet's transformer stages (S3-TFM_Rel, S4-TFM_Rel):
  each downsamples by 2 and runs pre-norm transformer blocks whose attention
  carries an input-independent relative position bias (timm's
  :class:`~timm.layers.RelPosBias`); it takes the encoder's 1/4-resolution
  features, not CoAtNet's 1/8.
* :class:`Regressor`: inherited encoder + head; the encoder can be frozen for
  the first epochs (seed 004 §4.2.7).
* :func:`sample_weights` and :func:`weighted_l1`: seed 004 Eq. 9–11.
* :func:`conventional_regressor`: a CNN regressing BMD directly from the
  radiograph crop around the ROI (the Hsieh et al. style baseline).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from timm.layers import Mlp, RelPosBias

from bmdpipe.models.decomposition import batchnorm_to_groupnorm


class RelAttention(nn.Module):
    """Multi-head self-attention with a learned relative position bias on a fixed ``grid`` of tokens.

    Shapes:
        ``(B, N = grid_h·grid_w, dim)`` → same.
    """

    def __init__(self, dim: int, heads: int, grid: tuple[int, int]) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.rel_pos = RelPosBias(window_size=grid, num_heads=heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = self.rel_pos((q * self.scale) @ k.transpose(-2, -1))
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, grid: tuple[int, int], mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = RelAttention(dim, heads, grid)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RegressionHead(nn.Module):
    """Transformer stages on the encoder's features, pooled to ``n_outputs`` values.

    Args:
        in_channels: channels of the 1/4-resolution features.
        feature_hw: their ``(h, w)``; each stage halves it (relative bias tables are sized from it).
        dims, depths, heads: per stage.
        n_outputs: BMD values predicted (e.g. one per vertebra, or DXA and QCT).
        pool_norm: a LayerNorm on the pooled ``(B, dims[-1])`` vector before the linear layer (timm's
            classifier heads have one; CoAtNet's head is pool → FC). Off by default: with it, the head
            on the 150-patient benchmark's frozen stage-2 encoder (fold 2, 20 epochs) reached held-out
            PCC 0.06 / 0.07 against DXA T12 / L1 (0.34 / 0.31 on its own training views), without it
            0.49 / 0.49 (0.68 / 0.67); a ridge fit on the same pooled frozen features gives 0.56 / 0.54.
            Heads saved before this flag have it on.

    Shapes:
        ``(B, in_channels, h, w)`` → ``(B, n_outputs)``.
    """

    def __init__(self, in_channels: int, feature_hw: tuple[int, int], n_outputs: int = 1,
                 dims: Sequence[int] = (128, 256), depths: Sequence[int] = (2, 2), heads: Sequence[int] = (4, 8),
                 pool_norm: bool = False) -> None:
        super().__init__()
        h, w = feature_hw
        stages = []
        ch = in_channels
        for dim, depth, nh in zip(dims, depths, heads):
            h, w = (h + 1) // 2, (w + 1) // 2
            stages.append(nn.ModuleDict({
                "down": nn.Conv2d(ch, dim, 3, stride=2, padding=1),
                "blocks": nn.Sequential(*[TransformerBlock(dim, nh, (h, w)) for _ in range(depth)]),
            }))
            ch = dim
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(ch) if pool_norm else nn.Identity()
        self.fc = nn.Linear(ch, n_outputs)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = feats
        for stage in self.stages:
            x = stage["down"](x)
            b, c, h, w = x.shape
            x = stage["blocks"](x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)
        return self.fc(self.norm(x.mean(dim=(2, 3))))


class Regressor(nn.Module):
    """Encoder (inherited from the decomposition generator) + regression head.

    Shapes:
        ``(B, 1, H, W)`` → ``(B, n_outputs)``.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Stop (or restart) training the encoder, as in the first epochs of stage 3."""
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def sample_weights(bmd: np.ndarray) -> np.ndarray:
    """Seed 004 Eq. 9–10: ``w = 1.5 − (d − d_min)/(d_max − d_min)``, ``d = |y − mean(y)|``; in [0.5, 1.5].

    Args:
        bmd: ``(N,)`` training BMDs (the dataset the weights are for).
    """
    y = np.asarray(bmd, dtype=np.float64)
    d = np.abs(y - y.mean())
    span = d.max() - d.min()
    return 1.5 - (d - d.min()) / span if span > 0 else np.ones_like(y)


def weighted_l1(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Seed 004 Eq. 11: mean of ``w·|y − ŷ|``. Shapes ``(B, K)``, ``(B, K)``, ``(B,)`` or ``(B, K)``."""
    if weight.dim() == 1:
        weight = weight[:, None]
    return (weight * (pred - target).abs()).mean()


def conventional_regressor(n_outputs: int = 1, name: str = "resnet18") -> nn.Module:
    """Direct regression CNN on the radiograph crop (timm, one input channel, no pretrained weights, GroupNorm).

    Shapes:
        ``(B, 1, H, W)`` → ``(B, n_outputs)``.
    """
    import timm

    return batchnorm_to_groupnorm(timm.create_model(name, pretrained=False, in_chans=1, num_classes=n_outputs))
