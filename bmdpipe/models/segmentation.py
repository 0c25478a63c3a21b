"""Bayesian U-Net for bone segmentation: a MONAI 3-D U-Net with dropout, run with Monte-Carlo dropout.

Seed 004 builds its bone masks with the Bayesian U-net of Hiasa et al. (IEEE
TMI 2020): a U-Net with dropout that stays on at inference; the mean of N
stochastic softmax outputs is the prediction and their spread the
uncertainty. Here the network is :class:`monai.networks.nets.UNet` with
residual units and dropout in every unit; like Hiasa's network it is 2-D
(here on sagittal slices, a few neighbouring slices as input channels). No
I/O in this module.
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.nets import UNet


def bayesian_unet(n_classes: int, channels: Sequence[int] = (16, 32, 64, 128, 256), dropout: float = 0.1,
                  num_res_units: int = 2, *, in_channels: int = 1, spatial_dims: int = 2, norm: str = "batch",
                  full_resolution_level: bool = False) -> UNet:
    """A U-Net with dropout: ``in_channels`` inputs (normalised HU), ``n_classes`` output logits.

    Args:
        n_classes: classes including background.
        in_channels: input channels (e.g. neighbouring slices).
        spatial_dims: 2 (slices) or 3 (volumes).
        norm: ``"batch"`` (learns fastest here; eval statistics at MC inference) or ``"instance"``.
        full_resolution_level: the first level works at the input resolution (sharper
            boundaries, about 3× the cost of halving it at once).
        channels: feature channels per level; every level halves the resolution (the
            first keeps it when ``full_resolution_level``), so input sizes must be
            multiples of :func:`size_multiple`.
        dropout: dropout probability in every residual unit (kept on for MC inference).
        num_res_units: residual units per level.

    Returns:
        A module mapping ``(B, in_channels, *spatial)`` to logits ``(B, n_classes, *spatial)``.
    """
    return UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=n_classes, channels=tuple(channels),
                strides=_strides(len(channels), full_resolution_level), num_res_units=num_res_units, dropout=dropout,
                norm=norm)


def _strides(levels: int, full_resolution_level: bool) -> tuple[int, ...]:
    return ((1,) if full_resolution_level else (2,)) + (2,) * (levels - 2)


def size_multiple(channels: Sequence[int], full_resolution_level: bool = False) -> int:
    """Input sizes must be multiples of this for :func:`bayesian_unet` with these settings."""
    out = 1
    for s in _strides(len(channels), full_resolution_level):
        out *= s
    return out


def enable_mc_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Evaluation mode except the dropout layers, which keep sampling (in place; returns ``model``)."""
    model.eval()
    for m in model.modules():
        if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d, torch.nn.Dropout3d)):
            m.train()
    return model


def entropy(p: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Shannon entropy in nats of the probabilities ``p`` along ``dim``."""
    return -(p * torch.log(p.clamp_min(eps))).sum(dim=dim)


@torch.no_grad()
def mc_dropout_predict(model: torch.nn.Module, x: torch.Tensor, n_samples: int = 10,
                       generator_seed: int | None = 0) -> dict[str, torch.Tensor]:
    """Monte-Carlo dropout: ``n_samples`` stochastic passes with dropout on.

    Args:
        model: a network whose dropout layers are active (:func:`enable_mc_dropout`).
        x: input ``(B, in_channels, *spatial)`` on the model's device.
        n_samples: stochastic passes (≥ 1).
        generator_seed: seeds torch's RNG for the passes (restored afterwards), so the
            result is reproducible; None draws from the current state.

    Returns:
        ``probability``: mean softmax ``(B, C, *spatial)``; ``entropy``: predictive entropy
        of that mean, nats ``(B, *spatial)``; ``mutual_information``: entropy minus the
        mean per-sample entropy (the epistemic part), nats ``(B, *spatial)``. All float32
        on ``x``'s device.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        mean = None
        mean_entropy = None
        for _ in range(n_samples):
            p = torch.softmax(model(x).float(), dim=1)
            h = entropy(p, dim=1)
            mean = p if mean is None else mean + p
            mean_entropy = h if mean_entropy is None else mean_entropy + h
    mean = mean / n_samples
    mean_entropy = mean_entropy / n_samples
    total = entropy(mean, dim=1)
    return {"probability": mean, "entropy": total, "mutual_information": (total - mean_entropy).clamp_min(0.0)}
