"""Evaluation metrics agree with pingouin, scikit-learn and scipy on random data to 1e-6."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pingouin
import pytest
from scipy import stats
from sklearn.metrics import mean_squared_error, roc_auc_score

from bmdpipe.evaluate import metrics as m


@pytest.fixture
def pairs():
    rng = np.random.default_rng(7)
    truth = rng.normal(0.9, 0.15, 80)
    estimate = 0.1 + 0.85 * truth + rng.normal(0, 0.06, 80)
    return truth, estimate


def test_pcc_and_icc_match_scipy_and_pingouin(pairs):
    truth, estimate = pairs
    assert m.pcc(truth, estimate) == pytest.approx(stats.pearsonr(truth, estimate)[0], abs=1e-6)
    n = len(truth)
    long = pd.DataFrame({"target": np.tile(np.arange(n), 2), "rater": np.repeat(["ref", "est"], n),
                         "score": np.concatenate([truth, estimate])})
    table = pingouin.intraclass_corr(long, targets="target", raters="rater", ratings="score").set_index("Type")
    assert m.icc(truth, estimate) == pytest.approx(table.loc["ICC(A,1)", "ICC"], abs=1e-6)
    assert m.icc(truth, estimate) != pytest.approx(table.loc["ICC(C,1)", "ICC"], abs=1e-4)  # the form matters here


def test_mae_see_and_bland_altman(pairs):
    truth, estimate = pairs
    assert m.mae(truth, estimate) == pytest.approx(np.mean(np.abs(estimate - truth)), abs=1e-12)
    assert m.rmse(truth, estimate) == pytest.approx(np.sqrt(mean_squared_error(truth, estimate)), abs=1e-12)
    assert m.rmse(truth, estimate) > m.mae(truth, estimate)
    fit = stats.linregress(estimate, truth)
    resid = truth - (fit.intercept + fit.slope * estimate)
    assert m.see(truth, estimate) == pytest.approx(np.sqrt((resid**2).sum() / (len(truth) - 2)), abs=1e-6)
    ba = m.bland_altman(truth, estimate)
    d = estimate - truth
    assert ba["bias"] == pytest.approx(d.mean(), abs=1e-12)
    assert ba["loa_upper"] - ba["loa_lower"] == pytest.approx(2 * 1.96 * d.std(ddof=1), abs=1e-9)


def test_auc_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(3)
    positive = rng.random(200) < 0.3
    score = np.round(rng.normal(positive * 0.8, 1.0), 1)  # rounded: many ties
    assert m.auc(positive, score) == pytest.approx(roc_auc_score(positive, score), abs=1e-6)
    with pytest.raises(ValueError):
        m.auc(np.ones(5, bool), np.arange(5))


def test_rms_cv_and_screening():
    assert m.rms_cv([[1.0, 1.1, 0.9], [2.0, 2.0], [3.0]]) == pytest.approx(np.sqrt((0.1**2 + 0) / 2), abs=1e-9)
    true_t = {"L1": np.array([-3.0, -2.6, -1.0, 0.5, -2.0]), "L2": np.array([-2.0, -1.0, -1.0, 0.0, -2.7])}
    pred_t = {"L1": np.array([-2.3, -1.5, -1.2, 0.1, -2.1]), "L2": np.array([-2.2, -0.5, -1.1, 0.2, -2.0])}
    out = m.screening(true_t, pred_t)
    # L1 flex threshold -2.2: predicted positives -2.3 only; true positives -3.0, -2.6
    assert out["vertebra"]["L1"]["flex"] == {"sensitivity": 0.5, "specificity": 1.0}
    assert out["vertebra"]["L1"]["-1.75"] == {"sensitivity": 0.5, "specificity": 2 / 3}
    # patients positive by truth: 0 (L1), 1 (L1), 4 (L2); flex predicts 0 (L1 -2.3, L2 -2.2) and none else
    assert out["patient"]["flex"]["sensitivity"] == pytest.approx(1 / 3)
    assert 0.0 <= out["vertebra"]["L1"]["auc_osteoporosis"] <= 1.0


def test_bootstrap_ci_brackets_the_estimate_and_respects_patients(pairs):
    truth, estimate = pairs
    lo, hi = m.bootstrap_ci(m.pcc, truth, estimate, n_boot=500)
    assert lo < m.pcc(truth, estimate) < hi and hi - lo < 0.1
    groups = np.repeat(np.arange(40), 2)
    lo_g, hi_g = m.bootstrap_ci(m.pcc, truth, estimate, groups=groups, n_boot=500)
    assert lo_g < m.pcc(truth, estimate) < hi_g
