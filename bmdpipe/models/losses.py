"""Losses of the decomposition GAN (seed 004 Eq. 1–8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bmdpipe.similarity import gradient_correlation

#: Loss weights of seed 004 §4.2.7 / Eq. 7.
LAMBDA_FM = 10.0
LAMBDA_L1 = 100.0
LAMBDA_GC = 1.0


def gan_loss(outputs: list[list[torch.Tensor]], real: bool) -> torch.Tensor:
    """Least-squares GAN loss (pix2pixHD) over the final maps of every discriminator scale (Eq. 1–2)."""
    target = 1.0 if real else 0.0
    return sum(F.mse_loss(scale[-1], torch.full_like(scale[-1], target)) for scale in outputs) / len(outputs)


def feature_matching_loss(real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]]) -> torch.Tensor:
    """L1 between the discriminators' intermediate features of real and generated pairs (Eq. 3), pix2pixHD weights."""
    n_d = len(real)
    total = torch.zeros((), device=fake[0][0].device)
    for r_scale, f_scale in zip(real, fake):
        n_layers = len(r_scale) - 1
        for r, f in zip(r_scale[:-1], f_scale[:-1]):
            total = total + (4.0 / n_layers) * (1.0 / n_d) * F.l1_loss(f, r.detach())
    return total


def gradient_correlation_loss(fake: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − GC (Eq. 5–6 rescaled to [0, 2]): 0 when the gradients agree perfectly."""
    return (1.0 - gradient_correlation(fake, target)).mean()


def generator_loss(
    fake: torch.Tensor,
    target: torch.Tensor,
    d_fake: list[list[torch.Tensor]],
    d_real: list[list[torch.Tensor]],
    *,
    lambda_fm: float = LAMBDA_FM,
    lambda_l1: float = LAMBDA_L1,
    lambda_gc: float = LAMBDA_GC,
) -> dict[str, torch.Tensor]:
    """The generator's objective (Eq. 7 plus the adversarial term of Eq. 8), with its parts.

    Args:
        fake, target: ``(B, 1, H, W)`` generated and true DRRs.
        d_fake, d_real: discriminator outputs on (radiograph, fake) and (radiograph, target).

    Returns:
        ``{"total", "gan", "fm", "l1", "gc"}``.
    """
    parts = {
        "gan": gan_loss(d_fake, True),
        "fm": feature_matching_loss(d_real, d_fake),
        "l1": F.l1_loss(fake, target),
        "gc": gradient_correlation_loss(fake, target),
    }
    parts["total"] = parts["gan"] + lambda_fm * parts["fm"] + lambda_l1 * parts["l1"] + lambda_gc * parts["gc"]
    return parts


def discriminator_loss(d_real: list[list[torch.Tensor]], d_fake: list[list[torch.Tensor]]) -> torch.Tensor:
    """The discriminators' objective (Eq. 8, inner maximisation as a least-squares loss)."""
    return 0.5 * (gan_loss(d_real, True) + gan_loss(d_fake, False))
