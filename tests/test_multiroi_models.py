"""Seed 000's model family: shapes, parameter counts against the paper, patches, the joint loss."""

from __future__ import annotations

import pytest
import torch

from bmdpipe.models.multiroi import BaseModel, MultiInput, multiroi_loss, split_patches


def _count(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def test_shapes_and_sizes_like_the_paper():
    crops = torch.randn(2, 15, 1, 64, 64)
    att = MultiInput(15, n_outputs=4, attentive=True)
    global_pred, local = att(crops)
    assert global_pred.shape == (2, 4) and local.shape == (2, 15, 4)
    # paper: VGG16 extractor 14.8M, transformer encoder 7.9M parameters (seed 000 §IV-A)
    assert abs(_count(att.features) - 14.7) < 0.2
    assert abs(_count(att.encoder) - 7.9) < 0.1
    assert abs(_count(att.local_regressors) - 2.1) < 0.15 and abs(_count(att.regressor) - 0.13) < 0.01
    plain = MultiInput(15, n_outputs=4, attentive=False)
    assert plain(crops).shape == (2, 4)
    assert BaseModel(n_outputs=4)(torch.randn(2, 1, 64, 64)).shape == (2, 4)


def test_split_patches_and_loss():
    img = torch.arange(2 * 1 * 9 * 9, dtype=torch.float32).view(2, 1, 9, 9)
    patches = split_patches(img, 3)
    assert patches.shape == (2, 9, 1, 3, 3)
    torch.testing.assert_close(patches[0, 4, 0], img[0, 0, 3:6, 3:6])
    assert split_patches(img, 3, size=8).shape == (2, 9, 1, 8, 8)
    target = torch.tensor([[1.0], [2.0]])
    assert float(multiroi_loss(target, target[:, None].expand(2, 15, 1), target)) == 0.0


def test_regressor_activation_is_recorded_and_old_models_keep_relu():
    """New models train with GELU regressors (ReLU units die under AdamW on the non-negative VGG16 features);
    a model saved before the choice has no ``activation`` in its arch and is rebuilt with ReLU, so it predicts
    exactly as it did."""
    from bmdpipe.models.multiroi import build_chest_model
    from bmdpipe.train.settings import ChestBmdSettings

    arch = {"variant": "MultiROI", "n_outputs": 1, "width": 0.125, "hidden": 8}
    old = build_chest_model(arch)
    assert isinstance(old.regressor[1], torch.nn.ReLU)
    new = build_chest_model({**arch, "activation": ChestBmdSettings().activation})
    assert isinstance(new.regressor[1], torch.nn.GELU)
    crops = torch.randn(3, 15, 1, 32, 32)
    old.eval()
    reloaded = build_chest_model(arch)
    reloaded.load_state_dict(old.state_dict())
    torch.testing.assert_close(reloaded.eval()(crops), old(crops), rtol=0, atol=0)


def test_attentive_pooling_and_dropout():
    """``pooling: token`` regresses from the BMD token's output alone, ``mean`` from the mean of all outputs (seed
    000 Eq. 4); a model saved before either choice rebuilds with the mean and PyTorch's dropout 0.1."""
    from bmdpipe.models.multiroi import build_chest_model

    arch = {"variant": "AttMultiROI", "n_outputs": 2, "width": 0.125, "hidden": 8, "layers": 2, "heads": 8,
            "feedforward": 16}
    old = build_chest_model(arch)
    assert old.pooling == "mean" and old.encoder.layers[0].dropout.p == 0.1
    token = build_chest_model({**arch, "pooling": "token", "dropout": 0.0})
    assert token.encoder.layers[0].dropout.p == 0.0
    token.load_state_dict(old.state_dict())  # same parameters, only the pooling differs
    crops = torch.randn(3, 15, 1, 32, 32)
    old.eval(), token.eval()
    z = {}
    old.encoder.register_forward_hook(lambda m, i, out: z.setdefault("out", out))
    g_mean, local = old(crops)
    assert g_mean.shape == (3, 2) and local.shape == (3, 15, 2)
    torch.testing.assert_close(g_mean, old.regressor(z["out"].mean(dim=1)))
    g_token, _ = token(crops)
    torch.testing.assert_close(g_token, old.regressor(z["out"][:, 0]))
    with pytest.raises(ValueError, match="pooling"):
        build_chest_model({**arch, "pooling": "max"})
