"""Held-out BMD agreement per method and BMD column, pooled over the folds (seed 004 Table 2's layout)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from bmdpipe import tscore
from bmdpipe.evaluate import metrics
from bmdpipe.samples import column_parts

#: Row order of the results table; other methods follow in name order.
#: Seed 000's models, named as :data:`bmdpipe.models.multiroi.VARIANTS` (their held-out method names).
SEED000_METHODS = ("Base", "MultiPatch", "AttMultiPatch", "MultiROI", "AttMultiROI")
METHOD_ORDER = ["ceiling", "decomposition", "decomposition+regression", "baseline", *SEED000_METHODS]
#: Columns of bmd.tsv taken from each column's agreement figures.
TABLE_FIGURES = ("pcc", "icc", "mae", "see", "bias")


def method_key(method: str) -> tuple:
    """Sort key putting methods in :data:`METHOD_ORDER` (unknown ones after them by name), each method's
    robustness variants (``"baseline @JPEG50"``) right after it: the localised field, then JPEG by falling quality."""
    base, _, variant = method.partition(" @")
    if not variant:
        rank: tuple = (0,)
    elif variant.startswith("JPEG") and variant[4:].isdigit():
        rank = (2, -int(variant[4:]))
    else:
        rank = (1, variant)
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), base, rank)


def table(figures: dict[str, Any]) -> pd.DataFrame:
    """bmd.tsv from :func:`evaluate`'s result: one row per (method, column) with views, patients, PCC, ICC(2,1),
    MAE, SEE, bias and RMS-CV across poses (seed 004 Table 2's layout), sorted by column, then method."""
    rows = []
    for method in sorted(figures["methods"], key=method_key):
        for column, col in figures["methods"][method]["columns"].items():
            rows.append({"method": method, "column": column, "n_views": col["n_views"],
                         "n_patients": col["n_patients"],
                         **{name: col["agreement"][name]["value"] for name in TABLE_FIGURES},
                         "rms_cv": col["rms_cv"]})
    names = ("method", "column", "n_views", "n_patients", *TABLE_FIGURES, "rms_cv")
    out = pd.DataFrame(rows, columns=names).astype({name: float for name in (*TABLE_FIGURES, "rms_cv")})
    return out.sort_values("column", kind="stable").reset_index(drop=True)


def summarise(predictions: pd.DataFrame) -> pd.DataFrame:
    """:func:`table` of ``predictions`` (long: ``patient_id, view, method, column, truth, pred``; units of the
    column, g/cm² for DXA, mg/cm³ for QCT) without CIs or screening."""
    return table(evaluate(predictions, {}, n_boot=0))


#: Agreement figures with patient-level bootstrap CIs: name → f(truth, pred) (units of the column).
AGREEMENT = {
    "pcc": metrics.pcc,
    "icc": metrics.icc,
    "mae": metrics.mae,
    "rmse": metrics.rmse,
    "see": metrics.see,
    "bias": lambda y, x: metrics.bland_altman(y, x)["bias"],
    "loa_lower": lambda y, x: metrics.bland_altman(y, x)["loa_lower"],
    "loa_upper": lambda y, x: metrics.bland_altman(y, x)["loa_upper"],
}


def _with_ci(func, *arrays, groups, n_boot: int, seed: int) -> dict[str, Any]:
    try:
        value = func(*arrays)
    except ValueError:
        return {"value": None, "ci95": [None, None]}
    lo, hi = metrics.bootstrap_ci(func, *arrays, groups=groups, n_boot=n_boot, seed=seed) if n_boot else (None, None)
    return {"value": value, "ci95": [lo, hi]}


def _per_patient_t(g: pd.DataFrame, column: str, sexes: Mapping[str, str], reference) -> pd.DataFrame:
    """Per patient (views averaged): true and predicted T-scores of one DXA column; patients of unknown sex dropped."""
    site = column_parts(column)[1]
    means = g[g.column == column].groupby("patient_id")[["truth", "pred"]].mean()
    rows = {}
    for patient, r in means.iterrows():
        sex = sexes.get(patient)
        if sex not in ("F", "M"):
            continue
        rows[patient] = (tscore.t_score(r.truth, site, sex, reference), tscore.t_score(r.pred, site, sex, reference))
    return pd.DataFrame.from_dict(rows, orient="index", columns=["true_t", "pred_t"])


def evaluate(predictions: pd.DataFrame, sexes: Mapping[str, str], *, reference: Any = tscore.DEFAULT_REFERENCE,
             n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Every held-out figure per method: agreement with CIs, per pose, and T-score screening.

    Args:
        predictions: long table ``patient_id, view, method, column, truth, pred`` (g/cm² for ``dxa_*``,
            mg/cm³ for ``qct_*``), pooled over the folds.
        sexes: patient_id → ``"F"``/``"M"`` (the sheet's ``sex``), for the T-score reference.
        reference: T-score reference (:func:`bmdpipe.tscore.reference_table`).
        n_boot: bootstrap resamples of whole patients (several poses stay together); 0 = no CIs.

    Returns:
        ``{"methods": {method: {"columns": {column: {n_views, n_patients, agreement: {name: {value, ci95}},
        rms_cv, per_pose: {view: {n_views, pcc, mae, bias}}}}, "screening": {site: ..., "patient": ...}}}``
        plus the forms used. Screening (DXA columns only) averages each patient's views, then T-scores
        both truth and prediction with the same reference; see :func:`bmdpipe.evaluate.metrics.screening`.
        Figures that cannot be computed (fewer than 3 pairs, one class only) are None; so is the screening
        without a DXA column or a patient of known sex.
    """
    out: dict[str, Any] = {
        "forms": {"icc": "ICC(2,1) absolute agreement (pingouin ICC2)", "see": "reference regressed on estimate",
                  "rms_cv": "RMS over patients of SD/mean across poses", "ci95": "percentile bootstrap over patients",
                  "screening": "patient mean over views; truth positive at T <= -2.5; patient positive when any site is"},
        "tscore_reference": reference, "bootstrap": {"n": n_boot, "seed": seed, "level": 0.95}, "methods": {}}
    for method in sorted(predictions.method.unique(), key=method_key):
        gm = predictions[predictions.method == method].dropna(subset=["truth", "pred"])
        entry: dict[str, Any] = {"columns": {}}
        for column, g in gm.groupby("column", sort=False):
            col: dict[str, Any] = {"n_views": len(g), "n_patients": int(g.patient_id.nunique())}
            groups = g.patient_id.to_numpy()
            col["agreement"] = {name: _with_ci(f, g.truth.to_numpy(), g.pred.to_numpy(), groups=groups,
                                               n_boot=n_boot, seed=seed) for name, f in AGREEMENT.items()}
            repeated = [p.pred.to_numpy() for _, p in g.groupby("patient_id") if len(p) > 1]
            col["rms_cv"] = metrics.rms_cv(repeated) if repeated else None
            col["per_pose"] = {}
            for view, p in g.groupby("view"):
                pose = {"n_views": len(p)}
                for name in ("pcc", "mae", "bias"):
                    pose[name] = _with_ci(AGREEMENT[name], p.truth.to_numpy(), p.pred.to_numpy(), groups=None,
                                          n_boot=0, seed=seed)["value"]
                col["per_pose"][view] = pose
            entry["columns"][column] = col
        dxa = [c for c in entry["columns"] if c.startswith("dxa_")]
        per_site = {column_parts(c)[1]: _per_patient_t(gm, c, sexes, reference) for c in dxa}
        patients = sorted(set().union(*(t.index for t in per_site.values())))
        entry["screening"] = None  # no DXA column, or no patient of known sex
        if patients:
            true_t = {s: t.true_t.reindex(patients).to_numpy() for s, t in per_site.items()}
            pred_t = {s: t.pred_t.reindex(patients).to_numpy() for s, t in per_site.items()}
            screen = metrics.screening(true_t, pred_t)
            for site, t in per_site.items():
                positive = (t.true_t <= tscore.OSTEOPOROSIS_T).to_numpy()
                screen["vertebra"][site]["auc_osteoporosis_ci95"] = _with_ci(
                    metrics.auc, positive, -t.pred_t.to_numpy(), groups=None, n_boot=n_boot, seed=seed)["ci95"]
                screen["vertebra"][site]["n_patients"] = len(t)
                screen["vertebra"][site]["n_osteoporosis"] = int(positive.sum())
            screen["n_patients"] = len(patients)
            entry["screening"] = screen
        out["methods"][method] = entry
    return finite(out)


def seed000_table(figures: Mapping[str, Any], methods: Sequence[str]) -> pd.DataFrame:
    """Seed 000 Table I from :func:`evaluate`'s result: per method, for each DXA site the held-out R (PCC), RMSE
    (g/cm²) and osteoporosis AUC (patient means over views, T ≤ −2.5), then their means over the sites.

    Args:
        figures: :func:`evaluate`'s result (or bmd.json).
        methods: rows, in order; methods absent from ``figures`` are left out.

    Returns:
        Columns ``method``, ``{site} R``, ``{site} RMSE``, ``{site} AUC`` per DXA site (in the order the methods'
        figures list their columns), ``mean R``, ``mean RMSE``, ``mean AUC`` (over the sites with a finite figure);
        a figure that could not be computed is NaN. Empty when no method has a DXA column.
    """
    entries = {m: figures["methods"][m] for m in methods if m in figures["methods"]}
    sites = list(dict.fromkeys(column_parts(c)[1] for e in entries.values() for c in e["columns"]
                               if c.startswith("dxa_")))
    if not sites:
        return pd.DataFrame()
    rows = []
    for method, entry in entries.items():
        vertebra = (entry.get("screening") or {}).get("vertebra") or {}
        row: dict[str, Any] = {"method": method}
        for site in sites:
            agreement = entry["columns"].get(f"dxa_{site}", {}).get("agreement", {})
            row[f"{site} R"] = (agreement.get("pcc") or {}).get("value")
            row[f"{site} RMSE"] = (agreement.get("rmse") or {}).get("value")
            row[f"{site} AUC"] = vertebra.get(site, {}).get("auc_osteoporosis")
        rows.append(row)
    out = pd.DataFrame(rows).astype({c: float for c in rows[0] if c != "method"})
    for name in ("R", "RMSE", "AUC"):
        out[f"mean {name}"] = out[[f"{site} {name}" for site in sites]].mean(axis=1)
    return out


def finite(value: Any) -> Any:
    """NaN and infinities → None, numpy scalars → Python numbers, so the result is strict JSON."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _level(site: str) -> tuple:
    """Sort key of a vertebra name from the head down (C7, T12, L1, L2, ...); other names after them."""
    region = "CTLS".find(site[:1])
    return (region, int(site[1:])) if region >= 0 and site[1:].isdigit() else (9, site)


def patient_means(predictions: pd.DataFrame, method: str, patients: pd.DataFrame) -> pd.DataFrame:
    """One row per held-out patient of ``method``: each DXA column's truth and prediction averaged over the
    patient's views (g/cm²), with ``sex`` and ``age`` from ``patients`` (indexed by patient_id).

    Returns:
        Columns ``sex``, ``age`` and ``truth_{site}``, ``pred_{site}`` per DXA site (e.g. ``truth_L1``), indexed
        by patient_id; a site a patient lacks is NaN.
    """
    g = predictions[(predictions.method == method) & predictions.column.str.startswith("dxa_")]
    g = g.dropna(subset=["truth", "pred"])
    means = g.groupby(["patient_id", "column"])[["truth", "pred"]].mean().unstack("column")
    means.columns = [f"{kind}_{column_parts(column)[1]}" for kind, column in means.columns]
    means = means[sorted(means.columns, key=lambda c: (_level(column_parts(c)[1]), c))]
    info = patients.reindex(means.index)[["sex", "age"]]
    return pd.concat([info, means], axis=1)


def table_sites(table: pd.DataFrame) -> list[str]:
    """The DXA sites of a :func:`patient_means` table, in its column order (``truth_T12`` → ``T12``)."""
    return [column_parts(c)[1] for c in table.columns if c.startswith("truth_")]


def patient_level_bins(table: pd.DataFrame, reference: Any = tscore.DEFAULT_REFERENCE) -> pd.DataFrame:
    """Seed 000 Fig. 7: patients by their number of osteoporotic vertebrae (true T ≤ −2.5), and how many of each
    bin the method classifies right at the Flex thresholds (a patient is positive when any vertebra is).

    Args:
        table: :func:`patient_means`; patients of unknown sex (no T-score) or missing a site are left out.

    Returns:
        One row per bin, ``N`` (no osteoporotic vertebra) then ``P1``, ``P2``, …: ``patients``, ``correct``
        (true negatives in ``N``, true positives in the ``P`` bins) and ``fraction`` correct.
    """
    sites = table_sites(table)
    rows = table[table.sex.isin(["F", "M"])].dropna(subset=[f"{k}_{s}" for s in sites for k in ("truth", "pred")])
    n_osteo, positive = [], []
    for _, r in rows.iterrows():
        t_true = [tscore.t_score(r[f"truth_{s}"], s, r.sex, reference) for s in sites]
        t_pred = [tscore.t_score(r[f"pred_{s}"], s, r.sex, reference) for s in sites]
        n_osteo.append(sum(t <= tscore.OSTEOPOROSIS_T for t in t_true))
        positive.append(any(t <= metrics.FLEX_THRESHOLDS.get(s, tscore.OSTEOPOROSIS_T) for s, t in zip(sites, t_pred)))
    n_osteo, positive = np.asarray(n_osteo, dtype=int), np.asarray(positive, dtype=bool)
    out = []
    for k in range(len(sites) + 1):
        sel = n_osteo == k
        correct = int((~positive[sel]).sum() if k == 0 else positive[sel].sum())
        out.append({"bin": "N" if k == 0 else f"P{k}", "patients": int(sel.sum()), "correct": correct,
                    "fraction": correct / sel.sum() if sel.any() else np.nan})
    return pd.DataFrame(out)


#: Age groups of seed 000 Fig. 8, years (lower bound inclusive).
AGE_GROUPS = ((0, 60, "< 60"), (60, 70, "60–69"), (70, 80, "70–79"), (80, 200, "≥ 80"))


def cross_vertebra_errors(table: pd.DataFrame) -> pd.DataFrame:
    """Seed 000 Fig. 8: by sex and by age group, the mean absolute DXA difference between every pair of vertebrae
    (how far one vertebra's BMD tells another's: a bound on estimating lumbar BMD from other bones) beside the
    method's mean absolute error per vertebra, both g/cm².

    Args:
        table: :func:`patient_means`.

    Returns:
        One row per group (``group`` "sex: F", "age: 60–69", …, and "all") with ``patients``, ``|A−B|`` per pair
        of sites and ``MAE A`` per site.
    """
    sites = table_sites(table)
    groups = [("all", np.ones(len(table), dtype=bool))]
    groups += [(f"sex: {s}", (table.sex == s).to_numpy()) for s in ("F", "M")]
    age = pd.to_numeric(table.age, errors="coerce").to_numpy()
    groups += [(f"age: {name}", (age >= lo) & (age < hi)) for lo, hi, name in AGE_GROUPS]
    rows = []
    for name, sel in groups:
        g = table[sel]
        row: dict[str, Any] = {"group": name, "patients": int(len(g))}
        for i, a in enumerate(sites):
            for b in sites[i + 1:]:
                row[f"|{a}−{b}|"] = float((g[f"truth_{a}"] - g[f"truth_{b}"]).abs().mean()) if len(g) else np.nan
        for a in sites:
            row[f"MAE {a}"] = float((g[f"pred_{a}"] - g[f"truth_{a}"]).abs().mean()) if len(g) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)
