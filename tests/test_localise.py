"""The crop localiser of `bmdpipe predict`: heatmap coding, letterbox geometry, and learning a box on synthetic images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bmdpipe.models.landmarks import decode_heatmaps, gaussian_heatmaps, position_prior
from bmdpipe.train.localise import (
    LocaliserView,
    box_iou,
    box_points,
    evaluate_localiser,
    letterbox,
    locate,
    load_localiser,
    points_box,
    summarise_localiser,
    train_localiser,
)
from bmdpipe.train.settings import LocaliserSettings


def test_heatmaps_decode_to_their_sub_pixel_points():
    pts = torch.tensor([[[10.3, 20.7], [40.0, 5.25]], [[0.6, 63.2], [31.5, 31.5]]])
    maps = gaussian_heatmaps(pts, (64, 64), sigma=2.0)
    assert maps.shape == (2, 2, 64, 64) and float(maps.max()) <= 1.0
    got, conf = decode_heatmaps(maps)
    inside = torch.tensor([[True, True], [False, True]])  # (0.6, 63.2) sits on the border: a cut Gaussian
    assert torch.allclose(got[inside], pts[inside], atol=0.02)
    assert (got - pts).abs().max() < 2.0  # a Gaussian cut by the border pulls its centre of mass inwards
    assert conf.min() > 0.8
    flat, conf_flat = decode_heatmaps(torch.full((1, 1, 16, 16), 0.05))
    assert float(conf_flat) == pytest.approx(0.05)


def test_position_prior_picks_the_peak_where_the_landmark_belongs():
    """Two look-alike peaks on one map: the higher far one wins plainly, the lower near one under the prior;
    the point and the confidence still come from the network's own map."""
    far, near = torch.tensor([[[10.0, 12.0]]]), torch.tensor([[[40.0, 44.0]]])
    maps = torch.cat([gaussian_heatmaps(far, (64, 64), 2.0) + 0.7 * gaussian_heatmaps(near, (64, 64), 2.0)] * 2, dim=1)
    plain, conf = decode_heatmaps(maps)
    assert torch.allclose(plain[0, 0], far[0, 0], atol=0.05) and float(conf[0, 0]) == pytest.approx(1.0, abs=1e-3)
    mean = torch.tensor([[36.0, 40.0], [float("nan"), float("nan")]])  # landmark 1: no prior
    weights = position_prior(mean, (64, 64), sigma=10.0)
    assert weights.shape == (1, 2, 64, 64) and bool((weights[0, 1] == 1).all())
    got, conf = decode_heatmaps(maps, weights=weights)
    assert torch.allclose(got[0, 0], near[0, 0], atol=0.05) and float(conf[0, 0]) == pytest.approx(0.7, abs=1e-3)
    assert torch.allclose(got[0, 1], far[0, 0], atol=0.05)  # no prior: the plain peak


def test_letterbox_and_box_geometry_round_trip():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(144, 160)).astype(np.float32)
    grid, lb = letterbox(image, 64)
    assert grid.shape == (64, 64)
    assert abs(float(grid[lb.oy:, :].mean())) < 0.2 and grid[:lb.oy].std() == 0  # padding is zero
    rc = rng.uniform(0, 140, size=(5, 2))
    assert np.allclose(lb.from_grid(lb.to_grid(rc)), rc)
    box = (30, 90, 50, 110)
    assert points_box(box_points(box), 1.0, image.shape) == box
    assert box_iou(box, box) == pytest.approx(1.0)
    assert box_iou(box, (30, 90, 80, 140)) == pytest.approx(30 * 60 / (2 * 3600 - 30 * 60))


def _synthetic_views(n: int, seed: int, size: int) -> list[LocaliserView]:
    """Noisy radiograph-like images of varying shape with a bright vertical band (the 'spine') whose box is known."""
    rng = np.random.default_rng(seed)
    views = []
    for i in range(n):
        h, w = int(rng.integers(100, 150)), int(rng.integers(100, 150))
        yy, xx = np.mgrid[0:h, 0:w]
        image = rng.normal(0, 0.3, size=(h, w)) + 0.5 * np.sin(xx / 9.0)
        side = rng.uniform(0.3, 0.45) * min(h, w)
        r0, c0 = rng.uniform(0.1 * h, h - side - 0.1 * h), rng.uniform(0.1 * w, w - side - 0.1 * w)
        band = (yy >= r0) & (yy < r0 + side) & (np.abs(xx - (c0 + side / 2)) < side / 5)
        image = (image + 3.0 * band).astype(np.float32)
        box = np.array([r0, r0 + side, c0, c0 + side])
        grid, lb = letterbox(image, size)
        views.append(LocaliserView(f"p{seed}_{i}", "pa", grid, lb.to_grid(box_points(box)), box, (h, w), (2.0, 2.0), lb))
    return views


def test_localiser_learns_where_the_box_is(tmp_path):
    """Trained on 48 synthetic images, it places held-out boxes with IoU well above chance and is sure of them."""
    settings = LocaliserSettings(size=64, channels=(8, 16, 32), epochs=25, batch_size=8, lr=3e-3, restart_epochs=25,
                                 augment={"translate": 0.05, "brightness": 0.2})
    torch.set_num_threads(2)
    model_path = train_localiser(_synthetic_views(48, 0, 64), tmp_path / "model", tmp_path / "work", settings,
                                 aspect=1.0, device="cpu", seed=0)
    table = evaluate_localiser(model_path, _synthetic_views(12, 1, 64), fold=0)
    summary = summarise_localiser(table)
    assert summary["iou_median"] > 0.6, summary
    assert summary["centre_error_mm_median"] < 8.0, summary  # 4 px of 2 mm on a ~125 px image
    assert summary["confidence_median"] > 0.4, summary
    # on pure noise it is much less sure
    models = [load_localiser(model_path)]
    noise = locate(models, np.random.default_rng(5).normal(size=(120, 130)).astype(np.float32))
    assert noise["confidence"] < summary["confidence_median"]
    assert (tmp_path / "model" / "metrics.csv").exists() and not (tmp_path / "work").exists()
