"""Held-out BMD agreement per method and BMD column, pooled over the folds (seed 004 Table 2's layout)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bmdpipe.evaluate import metrics

#: Row order of the results table.
METHOD_ORDER = ["ceiling", "decomposition", "decomposition+regression", "baseline"]


def summarise(predictions: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, column): views, patients, PCC, ICC(2,1), MAE, SEE, RMS-CV across poses, bias.

    Args:
        predictions: long table with ``patient_id, view, method, column, truth, pred``
            (units of the column: g/cm² for DXA, mg/cm³ for QCT).
    """
    rows = []
    for (method, column), g in predictions.groupby(["method", "column"], sort=False):
        ok = g.dropna(subset=["truth", "pred"])
        row = {"method": method, "column": column, "n_views": len(ok), "n_patients": ok.patient_id.nunique()}
        if len(ok) >= 3:
            row.update(pcc=metrics.pcc(ok.truth, ok.pred), icc=metrics.icc(ok.truth, ok.pred),
                       mae=metrics.mae(ok.truth, ok.pred), see=metrics.see(ok.truth, ok.pred),
                       bias=metrics.bland_altman(ok.truth, ok.pred)["bias"])
            groups = [p.pred.to_numpy() for _, p in ok.groupby("patient_id") if len(p) > 1]
            row["rms_cv"] = metrics.rms_cv(groups) if groups else np.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    table["_o"] = table.method.map(lambda m: order.get(m, len(order)))
    return table.sort_values(["column", "_o"]).drop(columns="_o").reset_index(drop=True)
