"""Seed 004 Table 3's image decomposition accuracy (bmdpipe.evaluate.decomposition) on images whose figures are
known in closed form."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bmdpipe.evaluate.decomposition import ACCURACY_COLUMNS, accuracy_rows, image_accuracy, summarise_accuracy

DENSITY = np.array([0.8, 1.0, 1.2, 0.9])  # g/cm², one square vertebra per view
THRESHOLDS = (0.0, 0.3, 0.5, 0.7, 1.1)


def _images(scale: float) -> tuple[np.ndarray, np.ndarray]:
    """``(true, predicted)`` ``(4, 2, 10, 10)``: channel 0 a 4×4 square at DENSITY, predicted at ``scale`` times
    it; channel 1 empty (a site outside the field)."""
    true = np.zeros((len(DENSITY), 2, 10, 10))
    true[:, 0, 3:7, 3:7] = DENSITY[:, None, None]
    return true, scale * true


def test_half_density_prediction_has_the_closed_form_figures():
    true, pred = _images(0.5)
    acc = image_accuracy(pred, true, THRESHOLDS)
    # MSE = (0.5 d)² · 16/100, peak d → 10·log10(1 / (0.25 · 0.16)) = 10·log10(25) dB for every view
    np.testing.assert_allclose(acc["psnr_db"][:, 0], 10 * np.log10(25.0), rtol=1e-9)
    # Dice 1 where the halved square still reaches t, 0 where it does not; t = 1.1 counts only where d reaches it
    # (d 0.8: t 0.3 → 1, 0.5 → 0, 0.7 → 0; d 1.0: 1, 1 (0.5 ≥ 0.5), 0; d 1.2: 1, 1, 0, 0; d 0.9: 1, 0, 0)
    np.testing.assert_allclose(acc["dice"][:, 0], [1 / 3, 2 / 3, 1 / 2, 1 / 3])
    np.testing.assert_allclose(acc["mean_true"][:, 0], 0.16 * DENSITY)
    np.testing.assert_allclose(acc["mean_pred"][:, 0], 0.08 * DENSITY)
    assert np.isnan(acc["psnr_db"][:, 1]).all() and np.isnan(acc["dice"][:, 1]).all()  # an empty target site


def test_summary_separates_shape_from_density():
    patients, views = [f"p{i}" for i in range(4)], ["pa"] * 4
    rows = [accuracy_rows(patients, views, 0, method, ["L1", "L2"], *_images(scale)[::-1], THRESHOLDS)
            for method, scale in (("exact", 1.0), ("half", 0.5))]
    table = pd.concat(rows, ignore_index=True)
    assert list(table.columns) == ACCURACY_COLUMNS and len(table) == 2 * 4 * 2
    summary = summarise_accuracy(table).set_index(["method", "site"])
    exact, half = summary.loc[("exact", "L1")], summary.loc[("half", "L1")]
    assert exact.n_views == 4 and exact.dice == pytest.approx(1.0) and exact.psnr_db > 100
    assert exact.pcc_mean == pytest.approx(1.0) and exact.icc_mean == pytest.approx(1.0)
    assert exact.mean_ratio == pytest.approx(1.0)
    # the halved images rank the patients perfectly (PCC 1) but disagree in value: ICC far below 1, ratio 0.5
    assert half.pcc_mean == pytest.approx(1.0) and half.mean_ratio == pytest.approx(0.5)
    assert half.icc_mean < 0.2, half.icc_mean
    assert half.dice == pytest.approx(np.mean([1 / 3, 2 / 3, 1 / 2, 1 / 3]))
    # the empty site has no intensity spread: no PCC or ICC, rather than an error
    assert np.isnan(summary.loc[("half", "L2"), "pcc_mean"]) and np.isnan(summary.loc[("half", "L2"), "dice"])


def test_mismatched_shapes_are_refused():
    true, pred = _images(1.0)
    with pytest.raises(ValueError, match=r"\(N, S, H, W\)"):
        image_accuracy(pred[:, :1], true, THRESHOLDS)


def test_folders_are_read_and_summarised_as_strict_json(tmp_path):
    """evaluate_bmd's path: every BMD-fit folder's decomposition.tsv (a stage-3 folder has none), pooled, then
    NaN figures (the empty site's) written as null."""
    import json

    from bmdpipe.evaluate.bmd import finite
    from bmdpipe.evaluate.decomposition import read_accuracy

    for fold in (0, 1):
        folder = tmp_path / f"fold{fold}"
        folder.mkdir()
        accuracy_rows([f"p{fold}{i}" for i in range(4)], ["pa"] * 4, fold, "decomposition", ["L1", "L2"],
                      *_images(0.5)[::-1], THRESHOLDS).to_csv(folder / "decomposition.tsv", sep="\t", index=False)
    (tmp_path / "stage3").mkdir()
    rows = read_accuracy([tmp_path / "fold0", tmp_path / "stage3", tmp_path / "fold1"])
    assert len(rows) == 2 * 4 * 2 and sorted(rows.fold.unique()) == [0, 1]
    records = finite(summarise_accuracy(rows).to_dict(orient="records"))
    l1, l2 = records
    assert l1["n_views"] == 8 and l1["mean_ratio"] == pytest.approx(0.5) and l2["pcc_mean"] is None
    json.dumps(records, allow_nan=False)  # strict JSON
    assert list(read_accuracy([tmp_path / "stage3"]).columns) == ACCURACY_COLUMNS
    assert summarise_accuracy(read_accuracy([])).empty
