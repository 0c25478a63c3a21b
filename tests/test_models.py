"""Decomposition GAN modules and losses: shapes, GroupNorm only, losses that vanish when they should, learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from bmdpipe.models.decomposition import (
    Generator,
    MultiscaleDiscriminator,
    ResnetGenerator,
    group_norm,
)
from bmdpipe.models.losses import (
    discriminator_loss,
    feature_matching_loss,
    generator_loss,
    gradient_correlation_loss,
)


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    return Generator.hrnet("hrnet_w18_small_v2", ngf=16)


def test_generator_shapes_and_norms(generator):
    x = torch.randn(2, 1, 128, 64)
    assert generator(x).shape == (2, 1, 128, 64)
    assert generator.features(x).shape == (2, generator.encoder.out_channels, 32, 16)
    assert generator.encoder.out_channels == 18 + 36 + 72 + 144
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in generator.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in generator.modules())
    assert ResnetGenerator(ngf=8, n_blocks=2)(x).shape == (2, 1, 128, 64)


def test_discriminator_scales_and_features():
    d = MultiscaleDiscriminator(in_channels=2, ndf=8)
    out = d(torch.randn(2, 2, 128, 64))
    assert len(out) == 3 and all(len(scale) == 5 for scale in out)
    assert out[0][-1].shape[1] == 1 and out[1][-1].shape[-1] < out[0][-1].shape[-1]


def test_losses_vanish_for_identical_inputs():
    torch.manual_seed(1)
    img = torch.nn.functional.avg_pool2d(torch.randn(2, 1, 32, 32), 3, 1, 1)
    assert float(gradient_correlation_loss(img, img)) == pytest.approx(0.0, abs=1e-5)
    assert float(gradient_correlation_loss(-img, img)) == pytest.approx(2.0, abs=1e-5)
    feats = [[torch.randn(2, 4, 8, 8), torch.randn(2, 1, 4, 4)] for _ in range(3)]
    assert float(feature_matching_loss(feats, feats)) == 0.0
    parts = generator_loss(img, img, feats, feats)
    assert float(parts["l1"]) == 0.0 and float(parts["gc"]) == pytest.approx(0.0, abs=1e-5)
    assert float(discriminator_loss([[torch.ones(1, 1, 2, 2)]], [[torch.zeros(1, 1, 2, 2)]])) == 0.0
    assert group_norm(18).num_groups == 6 and group_norm(144).num_groups == 8


def test_gan_step_reduces_the_generator_loss(generator):
    """A few adversarial steps on one pair lower L1 and GC: the losses and modules train together."""
    torch.manual_seed(2)
    x = torch.randn(2, 1, 64, 64)
    y = torch.nn.functional.avg_pool2d(x.abs(), 5, 1, 2)  # a target the generator can learn
    g = Generator.hrnet("hrnet_w18_small_v2", ngf=8)
    d = MultiscaleDiscriminator(ndf=8)
    opt_g = torch.optim.Adam(g.parameters(), 2e-3)
    opt_d = torch.optim.Adam(d.parameters(), 2e-4)
    first = None
    for _ in range(25):
        fake = g(x)
        loss_d = discriminator_loss(d(torch.cat([x, y], 1)), d(torch.cat([x, fake.detach()], 1)))
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        parts = generator_loss(fake, y, d(torch.cat([x, fake], 1)), d(torch.cat([x, y], 1)))
        opt_g.zero_grad()
        parts["total"].backward()
        opt_g.step()
        first = first or (parts["l1"].item(), parts["gc"].item())
    assert parts["l1"].item() < 0.5 * first[0]
    assert parts["gc"].item() < first[1]
