"""Stage-3 regression head, encoder freezing, seed 004's sample weights, the conventional baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bmdpipe.models.decomposition import HRNetEncoder, build_generator
from bmdpipe.models.regression import (
    RegressionHead,
    Regressor,
    conventional_regressor,
    sample_weights,
    weighted_l1,
)
from bmdpipe.train.regression import load_regressor, save_regressor


def test_sample_weights_follow_eq_10():
    y = np.array([0.5, 0.7, 0.75, 0.8, 1.1])
    w = sample_weights(y)
    d = np.abs(y - y.mean())
    assert w[np.argmax(d)] == pytest.approx(0.5) and w[np.argmin(d)] == pytest.approx(1.5)
    np.testing.assert_allclose(w, 1.5 - (d - d.min()) / (d.max() - d.min()))
    pred, target = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [0.0]])
    assert float(weighted_l1(pred, target, torch.tensor([1.5, 0.5]))) == pytest.approx((1.5 + 1.0) / 2)


def test_regressor_shapes_freezing_and_learning():
    torch.manual_seed(0)
    encoder = HRNetEncoder("hrnet_w18_small_v2")
    head = RegressionHead(encoder.out_channels, (16, 8), n_outputs=2, dims=(32, 64), depths=(1, 1), heads=(2, 4))
    model = Regressor(encoder, head)
    x = torch.randn(4, 1, 64, 32)
    assert model(x).shape == (4, 2)
    model.freeze_encoder(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    target = torch.tensor([[0.6, 0.9], [0.8, 1.0], [1.0, 1.2], [0.7, 0.8]])
    target = (target - target.mean(0)) / target.std(0)  # standardised, as train_regression does
    before = [p.clone() for p in encoder.parameters()]
    losses = []
    for _ in range(60):
        loss = weighted_l1(model(x), target, torch.ones(4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.equal(a, b) for a, b in zip(before, encoder.parameters()))
    assert losses[-1] < 0.3 * losses[0]
    model.freeze_encoder(False)
    assert all(p.requires_grad for p in encoder.parameters())


def test_regressor_saved_before_pool_norm_loads_with_its_layernorm(tmp_path):
    torch.manual_seed(0)
    gen_arch = {"kind": "hrnet", "encoder": "hrnet_w18_small_v2", "ngf": 8, "out_channels": 1}
    generator = build_generator(gen_arch)
    old_head = {"dims": [16, 32], "depths": [1, 1], "heads": [2, 4]}
    arch = {"kind": "stage3", "generator": gen_arch, "feature_hw": [8, 8], "n_outputs": 1, "head": old_head}
    model = Regressor(generator.encoder, RegressionHead(generator.feature_channels, (8, 8), 1, **old_head,
                                                         pool_norm=True))
    save_regressor(model, arch, {"columns": ["dxa_L1"], "mean": [0.8], "sd": [0.1]}, tmp_path / "model.pt")
    loaded, payload = load_regressor(tmp_path / "model.pt")
    assert isinstance(loaded.head.norm, torch.nn.LayerNorm) and payload["arch"]["head"]["pool_norm"] is True
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_conventional_baseline():
    net = conventional_regressor(n_outputs=3)
    assert net(torch.randn(2, 1, 64, 64)).shape == (2, 3)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
