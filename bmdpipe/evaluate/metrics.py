"""Agreement and screening metrics of estimated against reference BMD.

All functions take 1-D arrays (one value per measurement) and return plain
floats or dicts; units are those of the inputs (g/cm² for areal BMD, mg/cm³
for volumetric BMD, T-score units for T-scores).

Forms used (as in seed 004 Table 2 and seed 000 Tables I–III):

* PCC: Pearson's r.
* ICC: ICC(2,1) of Shrout & Fleiss (1979), two-way random effects, absolute
  agreement, single measurement; pingouin's ``ICC(A,1)`` (``ICC2`` before 0.7).
* SEE: standard error of the estimate of the reference regressed on the
  estimate, ``sqrt(Σ residual² / (n − 2))``.
* RMS-CV: root mean square over patients of the coefficient of variation
  (SD with n − 1 over the mean) of repeated estimates (one per pose), as the
  ISCD defines precision.
* Bland–Altman: bias = mean(estimate − reference), limits = bias ± 1.96 SD.
* AUC: the probability that a positive case scores higher than a negative
  one, ties counting half (Mann–Whitney).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import stats


def _pair(reference, estimate) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(reference, dtype=np.float64).ravel()
    x = np.asarray(estimate, dtype=np.float64).ravel()
    if y.shape != x.shape:
        raise ValueError(f"reference and estimate differ in length: {y.size} vs {x.size}")
    if y.size < 3:
        raise ValueError("at least 3 pairs are needed")
    return y, x


def pcc(reference, estimate) -> float:
    """Pearson correlation coefficient."""
    y, x = _pair(reference, estimate)
    return float(stats.pearsonr(y, x)[0])


def icc(reference, estimate) -> float:
    """ICC(2,1): two-way random effects, absolute agreement, single measurement (pingouin's ICC(A,1))."""
    y, x = _pair(reference, estimate)
    data = np.stack([y, x], axis=1)  # (targets n, raters k = 2)
    n, k = data.shape
    grand = data.mean()
    ms_rows = k * ((data.mean(axis=1) - grand) ** 2).sum() / (n - 1)
    ms_cols = n * ((data.mean(axis=0) - grand) ** 2).sum() / (k - 1)
    resid = data - data.mean(axis=1, keepdims=True) - data.mean(axis=0, keepdims=True) + grand
    ms_err = (resid**2).sum() / ((n - 1) * (k - 1))
    return float((ms_rows - ms_err) / (ms_rows + (k - 1) * ms_err + k * (ms_cols - ms_err) / n))


def mae(reference, estimate) -> float:
    """Mean absolute error."""
    y, x = _pair(reference, estimate)
    return float(np.abs(x - y).mean())


def rmse(reference, estimate) -> float:
    """Root-mean-square error (seed 000 Table I's RMSE)."""
    y, x = _pair(reference, estimate)
    return float(np.sqrt(((x - y) ** 2).mean()))


def see(reference, estimate) -> float:
    """Standard error of the estimate of ``reference`` regressed on ``estimate``."""
    y, x = _pair(reference, estimate)
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (intercept + slope * x)
    return float(np.sqrt((resid**2).sum() / (y.size - 2)))


def rms_cv(groups: Sequence[Sequence[float]]) -> float:
    """RMS over groups (patients) of SD/mean of each group's repeated values (poses); groups of one are skipped."""
    cvs = [np.std(g, ddof=1) / np.mean(g) for g in (np.asarray(g, dtype=np.float64) for g in groups) if g.size > 1]
    if not cvs:
        raise ValueError("RMS-CV needs at least one patient with two or more estimates")
    return float(np.sqrt(np.mean(np.square(cvs))))


def bland_altman(reference, estimate) -> dict[str, float]:
    """Bias (estimate − reference), SD of the differences and the 95 % limits of agreement."""
    y, x = _pair(reference, estimate)
    d = x - y
    bias, sd = float(d.mean()), float(d.std(ddof=1))
    return {"bias": bias, "sd": sd, "loa_lower": bias - 1.96 * sd, "loa_upper": bias + 1.96 * sd}


def auc(positive, score) -> float:
    """Area under the ROC curve of ``score`` for boolean ``positive`` (Mann–Whitney, ties count half)."""
    pos = np.asarray(positive, dtype=bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if pos.all() or not pos.any():
        raise ValueError("AUC needs both positive and negative cases")
    ranks = stats.rankdata(s)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def sensitivity_specificity(true_positive, predicted_positive) -> dict[str, float]:
    """Sensitivity (true positive rate) and specificity (true negative rate)."""
    t = np.asarray(true_positive, dtype=bool).ravel()
    p = np.asarray(predicted_positive, dtype=bool).ravel()
    sens = float((t & p).sum() / t.sum()) if t.any() else float("nan")
    spec = float((~t & ~p).sum() / (~t).sum()) if (~t).any() else float("nan")
    return {"sensitivity": sens, "specificity": spec}


#: Seed 000 Table II: one T-score threshold for every vertebra, or "Flex" per vertebra.
UNIFIED_THRESHOLDS = (-1.75, -2.0, -2.25, -2.5)
FLEX_THRESHOLDS = {"L1": -2.2, "L2": -2.1, "L3": -2.0, "L4": -1.9}
OSTEOPOROSIS_T = -2.5
OSTEOPENIA_T = -1.0


def screening(true_t: Mapping[str, np.ndarray], predicted_t: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """Osteoporosis screening from T-scores, per vertebra and per patient (seed 000 Tables II–III).

    Args:
        true_t, predicted_t: vertebra name → ``(n_patients,)`` T-scores, the
            same patients in the same order (NaN where a vertebra is absent).

    Returns:
        ``{"vertebra": {name: {threshold: {sensitivity, specificity}, "auc_osteoporosis", "auc_osteopenia"}},
        "patient": {threshold: {sensitivity, specificity}}}``; thresholds are
        the unified ones (as strings) and ``"flex"``. The truth is always
        T ≤ −2.5 (osteoporosis); a patient is positive when any vertebra is.
    """
    names = [v for v in true_t if v in predicted_t]
    out: dict[str, dict] = {"vertebra": {}, "patient": {}}
    settings = {str(t): {v: t for v in names} for t in UNIFIED_THRESHOLDS}
    settings["flex"] = {v: FLEX_THRESHOLDS.get(v, OSTEOPOROSIS_T) for v in names}
    for v in names:
        t, p = np.asarray(true_t[v], float), np.asarray(predicted_t[v], float)
        ok = ~(np.isnan(t) | np.isnan(p))
        entry: dict[str, object] = {}
        for label, thr in settings.items():
            entry[label] = sensitivity_specificity(t[ok] <= OSTEOPOROSIS_T, p[ok] <= thr[v])
        for key, cut in (("auc_osteoporosis", OSTEOPOROSIS_T), ("auc_osteopenia", OSTEOPENIA_T)):
            positive = t[ok] <= cut
            entry[key] = auc(positive, -p[ok]) if positive.any() and not positive.all() else float("nan")
        out["vertebra"][v] = entry
    for label, thr in settings.items():
        truth = np.zeros(len(next(iter(true_t.values()))), dtype=bool)
        pred = np.zeros_like(truth)
        for v in names:
            t, p = np.asarray(true_t[v], float), np.asarray(predicted_t[v], float)
            truth |= np.nan_to_num(t, nan=np.inf) <= OSTEOPOROSIS_T
            pred |= np.nan_to_num(p, nan=np.inf) <= thr[v]
        out["patient"][label] = sensitivity_specificity(truth, pred)
    return out


def bootstrap_ci(
    metric: Callable[..., float],
    *arrays,
    groups=None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``metric(*arrays)``.

    Args:
        groups: optional ``(n,)`` patient ids: whole patients are resampled,
            so that several radiographs of one patient stay together.

    Returns:
        ``(lower, upper)``.
    """
    data = [np.asarray(a) for a in arrays]
    n = len(data[0])
    rng = np.random.default_rng(seed)
    if groups is None:
        index_sets = [np.array([i]) for i in range(n)]
    else:
        g = np.asarray(groups)
        index_sets = [np.flatnonzero(g == u) for u in dict.fromkeys(g.tolist())]
    values = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(index_sets), len(index_sets))
        idx = np.concatenate([index_sets[i] for i in pick])
        try:
            values.append(metric(*[a[idx] for a in data]))
        except ValueError:  # e.g. a resample with one class only
            continue
    alpha = (1 - level) / 2
    return float(np.nanquantile(values, alpha)), float(np.nanquantile(values, 1 - alpha))
