"""Robustness variants: JPEG re-compression of a radiograph, and where their methods sort."""

from __future__ import annotations

import numpy as np

from bmdpipe.evaluate.bmd import method_key
from bmdpipe.evaluate.robustness import jpeg_roundtrip, read_sizes, robustness_summary


def _radiograph() -> np.ndarray:
    """A 12-bit-like smooth image with edges and noise (detector values around 2000)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:144, 0:160]
    body = 1500 + 800 * np.exp(-((xx - 80) / 45.0) ** 2) + 400 * (np.abs(xx - 80) < 10)
    return (body + rng.normal(0, 15, size=body.shape) + 2 * yy).astype(np.float32)


def test_jpeg_loses_more_and_weighs_less_as_quality_falls():
    image = _radiograph()
    results = {q: jpeg_roundtrip(image, q) for q in (100, 50, 10)}
    errors = {q: float(np.abs(d - image).mean()) for q, (d, _) in results.items()}
    sizes = {q: n for q, (_, n) in results.items()}
    assert sizes[100] > sizes[50] > sizes[10] > 0
    assert errors[100] < errors[50] < errors[10]
    # quality 100 is nearly the 8-bit quantisation alone: within a few grey levels of the 0.5-99.5 % range
    step = float(np.subtract(*np.percentile(image, [99.5, 0.5]))) / 255
    assert errors[100] < 2 * step
    decoded, _ = results[50]
    assert decoded.shape == image.shape and decoded.dtype == np.float32
    assert abs(float(decoded.mean()) - float(image.mean())) < 3 * step


def test_file_sizes_pool_over_folds(tmp_path):
    import json

    for k, (kb, raw) in enumerate(((10.0, 40.0), (14.0, 50.0))):
        (tmp_path / f"{k}.json").write_text(json.dumps(robustness_summary({100: kb, 10: kb / 5}, raw)))
    sizes = read_sizes([tmp_path / "0.json", tmp_path / "1.json"])
    assert sizes == {"raw_16bit": 45.0, "100": 12.0, "10": 2.4}


def test_variants_sort_right_after_their_method():
    methods = ["baseline @JPEG10", "decomposition", "baseline", "baseline @JPEG100", "ceiling", "baseline @localiser",
               "decomposition+regression @JPEG50", "decomposition+regression"]
    assert sorted(methods, key=method_key) == [
        "ceiling", "decomposition", "decomposition+regression", "decomposition+regression @JPEG50", "baseline",
        "baseline @localiser", "baseline @JPEG100", "baseline @JPEG10"]
