"""bmdpipe.evaluate.bmd.evaluate: every held-out figure per method, checked against scipy, scikit-learn and
direct computation on a synthetic prediction table."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from bmdpipe import tscore
from bmdpipe.evaluate import metrics
from bmdpipe.evaluate.bmd import evaluate


@pytest.fixture(scope="module")
def table():
    """40 patients × 3 poses, DXA at T12 and L1 and QCT at L1; a good method and a poor one."""
    rng = np.random.default_rng(3)
    rows, sexes = [], {}
    for i in range(40):
        patient = f"p{i:02d}"
        sexes[patient] = "F" if i % 3 else "M"
        l1 = rng.normal(0.82, 0.15)
        truth = {"dxa_L1": l1, "dxa_T12": 0.95 * l1 + rng.normal(0, 0.03), "qct_L1": 150 * l1 + rng.normal(0, 10)}
        for view in ("pa", "rot", "tilt"):
            for column, y in truth.items():
                scale = 150 if column.startswith("qct") else 1
                rows.append((patient, view, 0, "decomposition", column, y, y + rng.normal(0, 0.05) * scale))
                rows.append((patient, view, 0, "baseline", column, y, 0.8 * scale + rng.normal(0, 0.1) * scale))
    df = pd.DataFrame(rows, columns=["patient_id", "view", "fold", "method", "column", "truth", "pred"])
    return df, sexes


def test_agreement_matches_direct_computation_and_cis_bracket_it(table):
    df, sexes = table
    out = evaluate(df, sexes, n_boot=300)
    json.dumps(out, allow_nan=False)  # strict JSON
    assert list(out["methods"]) == ["decomposition", "baseline"]
    for method in ("decomposition", "baseline"):
        for column in ("dxa_L1", "dxa_T12", "qct_L1"):
            g = df[(df.method == method) & (df.column == column)]
            col = out["methods"][method]["columns"][column]
            assert col["n_views"] == 120 and col["n_patients"] == 40
            a = col["agreement"]
            assert a["pcc"]["value"] == pytest.approx(stats.pearsonr(g.truth, g.pred)[0], abs=1e-12)
            assert a["mae"]["value"] == pytest.approx(np.abs(g.pred - g.truth).mean(), abs=1e-12)
            assert a["rmse"]["value"] == pytest.approx(np.sqrt(((g.pred - g.truth) ** 2).mean()), abs=1e-12)
            assert a["bias"]["value"] == pytest.approx((g.pred - g.truth).mean(), abs=1e-12)
            for name, v in a.items():
                lo, hi = v["ci95"]
                assert lo <= v["value"] <= hi and lo < hi, (method, column, name, v)
            groups = [p.pred.to_numpy() for _, p in g.groupby("patient_id")]
            assert col["rms_cv"] == pytest.approx(metrics.rms_cv(groups), rel=1e-12)
            for view in ("pa", "rot", "tilt"):
                p = g[g.view == view]
                assert col["per_pose"][view]["n_views"] == 40
                assert col["per_pose"][view]["pcc"] == pytest.approx(stats.pearsonr(p.truth, p.pred)[0], abs=1e-12)
    good = out["methods"]["decomposition"]["columns"]["dxa_L1"]["agreement"]["pcc"]
    poor = out["methods"]["baseline"]["columns"]["dxa_L1"]["agreement"]["pcc"]
    assert good["ci95"][0] > 0.8 and poor["ci95"][0] < 0.5


def test_screening_uses_patient_means_and_sex_matched_t_scores(table):
    df, sexes = table
    out = evaluate(df, sexes, n_boot=200, reference="biology_direct_2025")
    screen = out["methods"]["decomposition"]["screening"]
    assert set(screen["vertebra"]) == {"L1", "T12"} and screen["n_patients"] == 40  # QCT columns are not screened
    g = df[(df.method == "decomposition") & (df.column == "dxa_L1")].groupby("patient_id")[["truth", "pred"]].mean()
    t_true = np.array([tscore.t_score(v, "L1", sexes[p], "biology_direct_2025") for p, v in g.truth.items()])
    t_pred = np.array([tscore.t_score(v, "L1", sexes[p], "biology_direct_2025") for p, v in g.pred.items()])
    positive = t_true <= -2.5
    assert 3 <= positive.sum() <= 37
    l1 = screen["vertebra"]["L1"]
    assert l1["n_osteoporosis"] == positive.sum()
    assert l1["auc_osteoporosis"] == pytest.approx(roc_auc_score(positive, -t_pred), abs=1e-12)
    assert l1["auc_osteoporosis_ci95"][0] <= l1["auc_osteoporosis"] <= l1["auc_osteoporosis_ci95"][1]
    predicted = t_pred <= -2.0
    assert l1["-2.0"]["sensitivity"] == pytest.approx((positive & predicted).sum() / positive.sum())
    assert l1["-2.0"]["specificity"] == pytest.approx((~positive & ~predicted).sum() / (~positive).sum())
    assert set(screen["patient"]) == {"-1.75", "-2.0", "-2.25", "-2.5", "flex"}


def test_seed000_table_lists_r_rmse_auc_per_vertebra_and_their_means(table):
    """Seed 000 Table I: the figures are evaluate()'s, DXA sites only, rows in the order asked, means over sites."""
    from bmdpipe.evaluate.bmd import seed000_table

    df, sexes = table
    out = evaluate(df, sexes, n_boot=0)
    rows = seed000_table(out, ["baseline", "absent", "decomposition"]).set_index("method")
    assert list(rows.index) == ["baseline", "decomposition"]
    assert list(rows.columns) == ["L1 R", "L1 RMSE", "L1 AUC", "T12 R", "T12 RMSE", "T12 AUC",
                                  "mean R", "mean RMSE", "mean AUC"]  # no QCT column
    for method in rows.index:
        for site in ("L1", "T12"):
            g = df[(df.method == method) & (df.column == f"dxa_{site}")]
            assert rows.loc[method, f"{site} R"] == pytest.approx(stats.pearsonr(g.truth, g.pred)[0], abs=1e-12)
            assert rows.loc[method, f"{site} RMSE"] == pytest.approx(np.sqrt(((g.pred - g.truth) ** 2).mean()))
            auc = out["methods"][method]["screening"]["vertebra"][site]["auc_osteoporosis"]
            assert rows.loc[method, f"{site} AUC"] == pytest.approx(auc)
        for name in ("R", "RMSE", "AUC"):
            assert rows.loc[method, f"mean {name}"] == pytest.approx(
                (rows.loc[method, f"L1 {name}"] + rows.loc[method, f"T12 {name}"]) / 2)
    assert rows.loc["decomposition", "mean R"] > 0.9 > 0.3 > rows.loc["baseline", "mean R"]
    assert seed000_table(out, ["absent"]).empty


def test_unknown_sex_and_too_few_pairs_give_none_not_errors(table):
    df, sexes = table
    few = df[df.patient_id.isin(["p00", "p01"])]
    out = evaluate(few, {"p00": "F"}, n_boot=50)
    col = out["methods"]["decomposition"]["columns"]["dxa_L1"]
    assert col["n_views"] == 6 and col["agreement"]["pcc"]["value"] is not None
    assert col["per_pose"]["pa"]["pcc"] is None  # 2 views of one pose
    assert out["methods"]["decomposition"]["screening"]["n_patients"] == 1  # p01's sex unknown
    json.dumps(out, allow_nan=False)


def test_seed000_figures_count_patients_and_errors_by_hand():
    """Seed 000 Figs. 7 and 8 on four patients whose T-scores and errors are worked out by hand."""
    from bmdpipe.evaluate.bmd import cross_vertebra_errors, patient_level_bins, patient_means

    ref = tscore.reference_table("seed000")["F"]
    at = {site: (lambda t, s=site: ref[s][0] + t * ref[s][1]) for site in ("T12", "L1")}  # T-score → g/cm²
    # (truth T at T12, L1), (predicted T at T12, L1): Flex is -2.2 at L1, -2.5 at T12 (no Flex entry)
    cases = {"a": ((-1.0, -1.0), (-1.0, -1.0)),  # N, predicted negative: right
             "b": ((-1.0, -1.0), (-1.0, -2.3)),  # N, L1 below Flex: wrong
             "c": ((-3.0, -1.0), (-2.4, -2.1)),  # P1, nothing below its Flex threshold: missed
             "d": ((-3.0, -3.0), (-1.0, -2.25))}  # P2, L1 below -2.2: found
    rows = []
    for patient, (truth, pred) in cases.items():
        for view, noise in (("pa", 0.01), ("rot", -0.01)):  # two views average to the prediction above
            for k, site in enumerate(("T12", "L1")):
                rows.append((patient, view, 0, "AttMultiROI", f"dxa_{site}", at[site](truth[k]),
                             at[site](pred[k]) + noise))
    predictions = pd.DataFrame(rows, columns=["patient_id", "view", "fold", "method", "column", "truth", "pred"])
    patients = pd.DataFrame({"sex": ["F"] * 4, "age": [55, 65, 75, 85]}, index=list(cases))
    table = patient_means(predictions, "AttMultiROI", patients)
    bins = patient_level_bins(table, "seed000").set_index("bin")
    assert bins.patients.to_dict() == {"N": 2, "P1": 1, "P2": 1}
    assert bins.correct.to_dict() == {"N": 1, "P1": 0, "P2": 1}
    errors = cross_vertebra_errors(table).set_index("group")
    diff = [abs(at["L1"](truth[1]) - at["T12"](truth[0])) for truth, _ in cases.values()]
    mae = [abs(at["L1"](pred[1]) - at["L1"](truth[1])) for truth, pred in cases.values()]
    assert errors.loc["all", "|T12−L1|"] == pytest.approx(np.mean(diff))
    assert errors.loc["all", "MAE L1"] == pytest.approx(np.mean(mae))
    assert errors.loc["age: 70–79", "MAE L1"] == pytest.approx(mae[2]) and errors.loc["age: ≥ 80", "patients"] == 1
    assert errors.loc["sex: M", "patients"] == 0 and np.isnan(errors.loc["sex: M", "MAE L1"])
