"""Image similarity measures shared by registration and the decomposition loss (torch, differentiable)."""

from __future__ import annotations

import torch


def _standardize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    flat = x.flatten(1)
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / (flat.norm(dim=1, keepdim=True) + eps)


def ncc(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Normalized cross-correlation.

    Args:
        moving: ``(B, C, H, W)``.
        fixed: ``(1, C, H, W)`` or ``(B, C, H, W)``.

    Returns:
        ``(B,)`` in [-1, 1].
    """
    return (_standardize(moving) * _standardize(fixed.expand_as(moving))).sum(dim=1)


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central-difference gradients along columns (x) and rows (y) of ``(B, C, H, W)``; each ``(B, C, H-2, W-2)``."""
    gx = (x[..., 1:-1, 2:] - x[..., 1:-1, :-2]) / 2
    gy = (x[..., 2:, 1:-1] - x[..., :-2, 1:-1]) / 2
    return gx, gy


def gradient_correlation(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Gradient correlation (Penney et al. 1998; seed 004 Eq. 6 divided by 2): mean NCC of the x and y gradients.

    Args:
        moving: ``(B, C, H, W)``.
        fixed: ``(1, C, H, W)`` or ``(B, C, H, W)``.

    Returns:
        ``(B,)`` in [-1, 1].
    """
    mx, my = image_gradients(moving)
    fx, fy = image_gradients(fixed)
    return 0.5 * (ncc(mx, fx) + ncc(my, fy))
