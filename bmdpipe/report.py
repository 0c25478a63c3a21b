"""The HTML report: one self-contained page (every image embedded as a PNG data URI).

Sections, each present when the run produced its inputs:

1. Cohort: patients, radiographs per pose, sex, age, the BMD label columns.
2. Quality control: status counts per stage, every failed or flagged row with its reason, every patient
   the training folds left out, calibration fits, registration similarity, and the QC images of the
   first patients (calibration, segmentation, ROI, registration, targets).
3. Training curves per fold: GAN losses per stage, stage-3 and baseline losses.
4. Results in seed 004 Table 2's layout (every method × BMD column: PCC, ICC, MAE, SEE, RMS-CV with
   patient-level bootstrap 95 % CIs), screening from T-scores, per-pose results, JPEG re-compression and
   the training experiments (pose subset, uncalibrated CT) as robustness, scatter and Bland–Altman plots, decomposition examples (radiograph | predicted | target).
5. The crop localiser of ``bmdpipe predict``: held-out field errors per fold.
6. Seed 000's chest landmark detector: held-out landmark errors per fold.
7. Seed 000's five models: its Tables I–III beside seed 004's methods on the same held-out patients, and its
   Figs. 5 (fit line, Bland–Altman), 7 (patients by osteoporotic vertebrae) and 8 (cross-vertebra differences).

:func:`build_report` reads only a finished ``results/`` folder; nothing here trains or predicts.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from bmdpipe import __version__, tscore
from bmdpipe.evaluate import metrics
from bmdpipe.evaluate.bmd import (SEED000_METHODS, cross_vertebra_errors, method_key, patient_level_bins, patient_means,
                                  seed000_table, table_sites)
from bmdpipe.evaluate.robustness import JPEG_TAG, LOCALISER_TAG, VARIANT
from bmdpipe.io.atomic import atomic_path

#: QC images per patient, in pipeline order: (caption, path pattern under results/).
QC_IMAGES = (
    ("calibration", "calibration/{p}/qc.png"),
    ("segmentation", "segment/{p}/qc.png"),
    ("DXA ROI", "roi/{p}/qc.png"),
    ("registration", "register/{p}/qc.png"),
    ("targets (first view)", "targets/{p}/{view}_qc.png"),
    ("seed 000 landmarks and ROIs (first view)", "targets/{p}/{view}_chest.png"),
)

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;line-height:1.4}
h1{border-bottom:2px solid #345}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:90%}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#eef}
td:first-child,th:first-child{text-align:left}
.fail{color:#a00}.ok{color:#070}.note{color:#555;font-size:90%}
figure{display:inline-block;margin:.5em;vertical-align:top}figcaption{font-size:85%;color:#444}
img{max-width:100%}
"""


def _png(fig) -> str:
    """A matplotlib figure as a data URI (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _file_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _img(uri: str, caption: str, width: int | None = None) -> str:
    style = f' style="width:{width}px"' if width else ""
    return (f'<figure><img src="{uri}" alt="{html.escape(caption)}"{style}>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(df: pd.DataFrame, float_format: str = "{:.3f}") -> str:
    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, (float, np.floating)):
            return "" if not np.isfinite(v) else float_format.format(v)
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in df.itertuples(index=False))
    return f"<table><tr>{head}</tr>{body}</table>"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cohort_section(samples: pd.DataFrame) -> str:
    """Patients, radiographs per pose, sex, age and the label columns of the samples sheet."""
    first = samples.drop_duplicates("patient_id")
    parts = [f"<p>{first.patient_id.nunique()} patients, {len(samples)} radiographs.</p>"]
    rows = [("radiographs per pose", ", ".join(f"{v}: {n}" for v, n in samples.view.value_counts().sort_index().items()))]
    if "sex" in first:
        rows.append(("sex", ", ".join(f"{s}: {n}" for s, n in first.sex.value_counts().sort_index().items())))
    if "age" in first and pd.to_numeric(first.age, errors="coerce").notna().any():
        age = pd.to_numeric(first.age, errors="coerce").dropna()
        rows.append(("age (years)", f"median {age.median():.0f}, range {age.min():.0f}–{age.max():.0f}"))
    parts.append(_table(pd.DataFrame(rows, columns=["", "value"])))
    labels = [c for c in first.columns if c.startswith(("dxa_", "qct_"))]
    if labels:
        values = first[labels].apply(pd.to_numeric, errors="coerce")
        summary = pd.DataFrame({"column": labels, "unit": ["g/cm²" if c.startswith("dxa") else "mg/cm³" for c in labels],
                                "n": values.notna().sum().to_numpy(), "mean": values.mean().to_numpy(),
                                "sd": values.std().to_numpy()})
        parts.append("<p>BMD labels (one value per patient):</p>" + _table(summary))
    return "".join(parts)


def qc_section(results: Path, samples: pd.DataFrame, *, max_patients: int = 4) -> str:
    """Status counts per stage, every failure and exclusion with its reason, fits, QC images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = []
    qc_path = results / "qc" / "patients.tsv"
    if qc_path.exists():
        qc = pd.read_csv(qc_path, sep="\t", keep_default_na=False)
        counts = qc.groupby(["stage", "status"]).size().unstack(fill_value=0).reset_index()
        parts.append("<h3>Status per stage</h3>" + _table(counts))
        bad = qc[qc.status != "ok"]
        parts.append("<h3>Failed or flagged (every row)</h3>")
        parts.append(_table(bad[["patient_id", "view", "stage", "status", "reason"]]) if len(bad)
                     else "<p class=ok>None: every stage succeeded for every patient.</p>")
    folds = _read_json(results / "dataset" / "folds.json")
    if folds is not None:
        excluded = pd.DataFrame(sorted(folds.get("excluded", {}).items()), columns=["patient_id", "reason"])
        parts.append("<h3>Patients left out of training</h3>")
        parts.append(_table(excluded) if len(excluded) else "<p class=ok>None.</p>")
    patients = list(dict.fromkeys(samples.patient_id))
    cal = [c for p in patients if (c := _read_json(results / "calibration" / p / "calibration.json"))
           and c.get("status") == "ok" and c.get("slope_hu_per_mg_cm3") is not None]
    reg = [r for p in patients for f in sorted((results / "register" / p).glob("*.json")) if (r := _read_json(f))
           and r.get("similarity") is not None]
    if cal or reg:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3))
        if cal:
            axes[0].scatter([c["slope_hu_per_mg_cm3"] for c in cal], [c["intercept_hu"] for c in cal], s=12)
            axes[0].set(xlabel="slope (HU per mg/cm³ HA)", ylabel="intercept (HU)",
                        title=f"phantom calibration fits (n={len(cal)}, min R² "
                              f"{min(c['r2'] for c in cal):.4f})")
        if reg:
            sim = np.array([r["similarity"] for r in reg])
            bound = reg[0].get("min_similarity")
            axes[1].hist(sim, bins=20)
            if bound is not None:
                axes[1].axvline(bound, color="r", ls="--", label=f"flag below {bound}")
                axes[1].legend()
            axes[1].set(xlabel="gradient correlation", ylabel="radiographs",
                        title=f"registration similarity (n={len(sim)})")
        parts.append("<h3>Calibration and registration</h3>" + _img(_png(fig), "calibration fits and registration"))
    rows = []
    for p in patients[:max_patients]:
        views = list(samples[samples.patient_id == p].view)
        images = [_img(_file_png(path), f"{p}: {caption}", width=220) for caption, pattern in QC_IMAGES
                  if (path := results / pattern.format(p=p, view=views[0] if views else "")).exists()]
        if images:
            rows.append(f"<div>{''.join(images)}</div>")
    if rows:
        parts.append(f"<h3>QC images of the first {len(rows)} patients</h3>" + "".join(rows))
    return "".join(parts)


def training_section(results: Path) -> str:
    """Loss curves per fold: GAN stages (generator total and discriminator), stage 3 and the baseline."""
    import matplotlib.pyplot as plt

    models = results / "models"
    panels = []
    for stage in (1, 2):
        curves = {f.parent.parent.name: pd.read_csv(f) for f in sorted(models.glob(f"decomposition/fold*/stage{stage}/metrics.csv"))}
        if curves:
            panels.append((f"GAN stage {stage}", curves, ["loss_g_total", "loss_d"]))
    for kind in ("regression", "baseline"):
        curves = {}
        for fold in sorted((models / kind).glob("fold*")):
            frames = [pd.read_csv(f).assign(phase=f.stem.removeprefix("metrics_")) for f in sorted(fold.glob("metrics_*.csv"))]
            if frames:
                df = pd.concat(frames, ignore_index=True)
                df["epoch"] = np.arange(1, len(df) + 1)
                curves[fold.name] = df
        if curves:
            panels.append(("stage 3 (frozen, then tuned)" if kind == "regression" else "baseline", curves, ["loss"]))
    if not panels:
        return ""
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3), squeeze=False)
    for ax, (title, curves, keys) in zip(axes[0], panels):
        for fold, df in curves.items():
            for key in keys:
                if key in df:
                    ax.plot(df.epoch, df[key], "o-", ms=2, label=f"{fold} {key}")
        ax.set(title=title, xlabel="epoch", ylabel="training loss")
        ax.legend(fontsize=6)
    return _img(_png(fig), "training losses per fold")


def _fmt_ci(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("value") is None:
        return "–"
    lo, hi = entry.get("ci95") or (None, None)
    ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
    return f"{entry['value']:.3f}{ci}"


def results_section(results: Path) -> str:
    """Seed 004 Table 2's layout, screening, per-pose results, scatter and Bland–Altman plots, examples."""
    import matplotlib.pyplot as plt

    figures = _read_json(results / "metrics" / "bmd.json")
    pred_path = results / "metrics" / "predictions.tsv"
    if figures is None or not pred_path.exists():
        return ""
    predictions = pd.read_csv(pred_path, sep="\t")
    every = sorted(figures["methods"], key=method_key)
    methods = [m for m in every if VARIANT not in m]  # the robustness variants get their own table
    columns = list(dict.fromkeys(predictions.column))
    parts = ["<p class=note>Held-out folds pooled; 95 % CIs from a bootstrap over patients. "
             "ICC is ICC(2,1), absolute agreement. <b>ceiling</b> is the BMD fitted on the true ROI image "
             "(seed 004 Table 2's GT row): the best any decomposition can do on these labels.</p>"]
    for column in columns:
        rows = []
        for m in methods:
            col = figures["methods"][m]["columns"].get(column)
            if not col:
                continue
            a = col["agreement"]
            rows.append([m, col["n_views"], _fmt_ci(a.get("pcc")), _fmt_ci(a.get("icc")), _fmt_ci(a.get("mae")),
                         _fmt_ci(a.get("see")), "–" if col.get("rms_cv") is None else f"{100 * col['rms_cv']:.2f} %",
                         _fmt_ci(a.get("bias"))])
        unit = "g/cm²" if column.startswith("dxa") else "mg/cm³"
        parts.append(f"<h3>{html.escape(column)} ({unit})</h3>")
        parts.append(_table(pd.DataFrame(rows, columns=["method", "views", "PCC", "ICC", "MAE", "SEE", "RMS-CV",
                                                        "bias"])))
    parts.append(decomposition_accuracy_table(figures))
    screen_rows = []
    for m in methods:
        s = figures["methods"][m].get("screening")
        if not s:
            continue
        for site, v in s["vertebra"].items():
            screen_rows.append([m, site, v.get("n_patients"), v.get("n_osteoporosis"),
                                _fmt_ci({"value": v.get("auc_osteoporosis"), "ci95": v.get("auc_osteoporosis_ci95")}),
                                v.get("auc_osteopenia"), v["-2.5"]["sensitivity"], v["-2.5"]["specificity"],
                                v["flex"]["sensitivity"], v["flex"]["specificity"]])
        screen_rows.append([m, "patient (any site)", s["n_patients"], "", "", np.nan,
                            s["patient"]["-2.5"]["sensitivity"], s["patient"]["-2.5"]["specificity"],
                            s["patient"]["flex"]["sensitivity"], s["patient"]["flex"]["specificity"]])
    if screen_rows:
        parts.append(f"<h3>Osteoporosis screening from T-scores (reference: {html.escape(str(figures.get('tscore_reference')))})</h3>")
        parts.append(_table(pd.DataFrame(screen_rows, columns=[
            "method", "site", "patients", "osteoporotic", "AUC osteoporosis", "AUC osteopenia",
            "sens T≤−2.5", "spec T≤−2.5", "sens Flex", "spec Flex"])))
    pose_rows = [[m, c, view, p["n_views"], p.get("pcc"), p.get("mae"), p.get("bias")]
                 for m in methods for c, col in figures["methods"][m]["columns"].items()
                 for view, p in col.get("per_pose", {}).items()]
    if pose_rows:
        parts.append("<h3>Robustness: per pose (seed 004 §4.2.3)</h3>")
        poses = pd.DataFrame(pose_rows, columns=["method", "column", "pose", "views", "PCC", "MAE", "bias"])
        parts.append(_table(poses))
    parts.append(robustness_table(figures, every))
    parts.append(experiments_table(figures))
    main = next((c for c in columns if c.startswith("dxa_")), columns[0] if columns else None)
    if main is not None:
        fig, axes = plt.subplots(2, len(methods), figsize=(3.2 * len(methods), 6.2), squeeze=False)
        for i, m in enumerate(methods):
            g = predictions[(predictions.method == m) & (predictions.column == main)].dropna(subset=["truth", "pred"])
            ax = axes[0, i]
            ax.scatter(g.truth, g.pred, s=8)
            if len(g):
                lims = [min(g.truth.min(), g.pred.min()), max(g.truth.max(), g.pred.max())]
                ax.plot(lims, lims, "k--", lw=0.8)
            ax.set(title=m, xlabel=f"{main} label", ylabel="predicted")
            bland_altman_axes(axes[1, i], g.truth.to_numpy(), g.pred.to_numpy(), s=8)
            axes[1, i].set(xlabel="mean of label and prediction", ylabel="prediction − label")
        parts.append(f"<h3>Scatter and Bland–Altman plots ({html.escape(main)})</h3>"
                     + _img(_png(fig), f"{main}: scatter (top) and Bland–Altman (bottom) per method"))
    examples = results / "models" / "decomposition" / "fold0" / "bmd" / "examples.npz"
    if examples.exists():
        with np.load(examples) as z:
            n = min(3, len(z["xray"]))
            fig, axes = plt.subplots(n, 3, figsize=(7, 2.4 * n), squeeze=False)
            for r in range(n):
                site_sum_p, site_sum_t = z["predicted"][r].sum(0), z["true"][r].sum(0)
                vmax = max(float(site_sum_t.max()), 1e-6)
                for c, (img, title) in enumerate(((z["xray"][r], "radiograph"), (site_sum_p, "predicted (g/cm²)"),
                                                  (site_sum_t, "target (g/cm²)"))):
                    axes[r, c].imshow(img, cmap="gray", vmin=None if c == 0 else 0, vmax=None if c == 0 else vmax)
                    axes[r, c].set_axis_off()
                    axes[r, c].set_title(f"{z['patient'][r]} {z['view'][r]}: {title}", fontsize=7)
        parts.append("<h3>Decomposition examples (held-out fold 0, ROI sites summed)</h3>"
                     + _img(_png(fig), "radiograph | predicted ROI image | target ROI image"))
    return "".join(parts)


def decomposition_accuracy_table(figures: Mapping[str, Any]) -> str:
    """Seed 004 Table 3's image decomposition accuracy of each generator (bmd.json's ``decomposition_accuracy``):
    how close the held-out ROI images are to their targets, per site."""
    rows = figures.get("decomposition_accuracy") or []
    if not rows:
        return ""
    df = pd.DataFrame(rows)[["method", "site", "n_views", "psnr_db", "dice", "pcc_mean", "icc_mean", "mean_ratio"]]
    # a training experiment's generator ("decomposition @pa_only") is named by its training, as in experiments_table
    parts = df.pop("method").str.partition(VARIANT)
    df.insert(0, "training", parts[2].where(parts[2] != "", "as configured"))
    df.insert(0, "method", parts[0])
    df.columns = ["method", "training", "site", "views", "mean PSNR (dB)", "mean Dice", "PCC mean intensity",
                  "ICC mean intensity", "predicted / target intensity"]
    return ("<h3>Image decomposition accuracy (seed 004 Table 3)</h3><p class=note>Held-out predicted ROI images "
            "against their targets, folds pooled. PSNR's peak is each target image's maximum; Dice is averaged over "
            "the BMD fit's thresholds; the mean intensity is the site image's mean (g/cm²). A generator that draws "
            "the bone in the right place at the wrong density has a high Dice and a low intensity PCC.</p>"
            + _table(df))


def robustness_table(figures: Mapping[str, Any], methods: list[str]) -> str:
    """Seed 004 Fig. 8 as a table, beside bmdpipe predict's path: PCC and MAE of each method on the held-out
    radiographs as registered, cropped by the localiser, and re-compressed as JPEG."""
    tagged = [m for m in methods if LOCALISER_TAG in m or JPEG_TAG in m]
    if not tagged:
        return ""
    sizes = figures.get("jpeg_file_kb", {})
    qualities = sorted({int(m.split(JPEG_TAG)[1]) for m in tagged if JPEG_TAG in m}, reverse=True)
    variants = [("registered field", "")]
    if any(LOCALISER_TAG in m for m in tagged):
        variants.append(("localised field", f" {LOCALISER_TAG}"))
    for q in qualities:
        kb = sizes.get(str(q))
        variants.append((f"JPEG {q}" + (f" ({kb:.0f} kB)" if kb else ""), f" {JPEG_TAG}{q}"))
    rows = []
    for base in dict.fromkeys(m.split(VARIANT)[0] for m in tagged):
        for column in figures["methods"].get(base, {}).get("columns", {}):
            row = [base, column]
            for _, tag in variants:
                a = figures["methods"].get(base + tag, {}).get("columns", {}).get(column, {}).get("agreement", {})
                row += [_fmt_ci(a.get("pcc")), (a.get("mae") or {}).get("value")]
            rows.append(row)
    header = ["method", "column"] + [f"{k} {label}" for label, _ in variants for k in ("PCC", "MAE")]
    raw = sizes.get("raw_16bit")
    note = ("<p class=note>The same fold models on their held-out radiographs: cropped where registration with the "
            "CT put the field (the main table), where the fold's localiser puts it (what bmdpipe predict does "
            "without CT), and re-compressed as 8-bit JPEG before cropping; sizes are the mean JPEG file of a whole "
            "radiograph" + (f" (16-bit raw: {raw:.0f} kB)" if raw else "") + ".</p>")
    return ("<h3>Robustness: localised field and JPEG re-compression (seed 004 §4.2.4, Fig. 8)</h3>" + note
            + _table(pd.DataFrame(rows, columns=header)))


def describe_experiment(spec: Mapping[str, Any]) -> str:
    """A training experiment's change in words (``{"views": [...], "calibration": ...}``)."""
    parts = []
    if spec.get("views"):
        parts.append("trained on poses " + ", ".join(spec["views"]) + " only")
    if spec.get("calibration"):
        parts.append(f"targets from {spec['calibration']}-calibrated CT"
                     + (" (uncalibrated CT)" if spec["calibration"] == "phantomless" else ""))
    return "; ".join(parts)


def experiments_table(figures: Mapping[str, Any]) -> str:
    """Seed 004 Table 4 and §4.2.5: the decomposition chain trained as configured and in every training
    experiment, on the same held-out folds: PCC, ICC, MAE, SEE, RMS-CV and the PCC of each pose."""
    experiments = figures.get("experiments") or {}
    if not experiments:
        return ""
    methods = figures["methods"]
    bases = [m for m in ("ceiling", "decomposition", "decomposition+regression")
             if any(f"{m}{VARIANT}{name}" in methods for name in experiments)]
    rows = []
    for column in dict.fromkeys(c for m in bases for c in methods.get(m, {}).get("columns", {})):
        poses = sorted({v for m in methods.values() for v in m["columns"].get(column, {}).get("per_pose", {})})
        for base in bases:
            for name, training in [("main", "as configured"), *((n, describe_experiment(s))
                                                                  for n, s in experiments.items())]:
                col = methods.get(base if name == "main" else f"{base}{VARIANT}{name}", {}).get("columns", {}).get(column)
                if not col:
                    continue
                a = col["agreement"]
                rows.append([column, base, name, training, col["n_views"], _fmt_ci(a.get("pcc")), _fmt_ci(a.get("icc")),
                             (a.get("mae") or {}).get("value"), (a.get("see") or {}).get("value"),
                             "–" if col.get("rms_cv") is None else f"{100 * col['rms_cv']:.2f} %",
                             "; ".join(f"{v} {col['per_pose'][v]['pcc']:.3f}" if col["per_pose"].get(v, {}).get("pcc")
                                       is not None else f"{v} –" for v in poses)])
    if not rows:
        return ""
    note = ("<p class=note>The decomposition chain (GAN stages 1 and 2, BMD fit, stage 3) trained again on the same "
            "folds with one change, scored on the same held-out radiographs of every pose (seed 004 Table 4: "
            "training on a subset of poses; §4.2.5: training with uncalibrated CT).</p>")
    return ("<h3>Robustness: training experiments (seed 004 §4.2.3, §4.2.5)</h3>" + note
            + _table(pd.DataFrame(rows, columns=["column", "method", "training", "change", "views", "PCC", "ICC", "MAE",
                                                 "SEE", "RMS-CV", "PCC per pose"])))


def localiser_section(results: Path) -> str:
    """Held-out errors of the crop localiser (bmdpipe predict's field finder) against the registered field."""
    rows = []
    for path in sorted((results / "models" / "localiser").glob("fold*/localiser.json")):
        d = _read_json(path) or {}
        if d.get("n_views"):
            rows.append([d["fold"], d["n_train_views"], d["n_views"], d["centre_error_mm_median"],
                         d["centre_error_mm_p95"], d["height_error_pct_median_abs"], d["iou_median"],
                         d["iou_at_least_0.5"], d["confidence_median"]])
    if not rows:
        return ""
    return ("<p class=note>bmdpipe predict finds the training field on a radiograph without CT with a heatmap "
            "U-Net per fold; here each fold's model on its held-out radiographs, against the field from "
            "2D-3D registration. The bundle for predict is results/model.</p>"
            + _table(pd.DataFrame(rows, columns=["fold", "training views", "held-out views", "centre error mm (median)",
                                                 "centre error mm (95 %)", "|height error| % (median)", "IoU (median)",
                                                 "IoU ≥ 0.5", "confidence (median)"])))


def chest_landmarks_section(results: Path) -> str:
    """Held-out errors of seed 000's landmark detector against the landmarks projected from the CT."""
    rows = []
    for path in sorted((results / "models" / "chest_landmarks").glob("fold*/chest_landmarks.json")):
        d = _read_json(path) or {}
        if d.get("n_points"):
            rows.append([d["fold"], d["n_train_views"], d["n_views"], d["n_points"], d["error_mm_mean"],
                         d["error_mm_median"], d["within_5_mm"], d["confidence_median"], ""])
        elif d:
            rows.append([d.get("fold"), d.get("n_train_views", 0), 0, 0, None, None, None, None,
                         d.get("reason", "no held-out view with landmarks")])
    if not rows:
        return ""
    return ("<p class=note>Seed 000 §III-B's 16 landmarks (3 per clavicle, 4 along each side of the rib cage, C7, "
            "T12), found on the CT's bone labels and projected through each radiograph's registered pose, learned "
            "by a heatmap U-Net per fold from the patients with supplied label maps; here each fold's detector on "
            "its held-out radiographs (the landmarks on their detector). The crops are drawn in the QC images "
            "(seed 000 landmarks and ROIs).</p>"
            + _table(pd.DataFrame(rows, columns=["fold", "training views", "held-out views", "landmarks",
                                                 "error mm (mean)", "error mm (median)", "within 5 mm",
                                                 "confidence (median)", "note"])))


#: Seed 004's methods that seed 000's models (SEED000_METHODS) are compared with.
COMPARED_METHODS = ("decomposition", "decomposition+regression", "baseline")


def bland_altman_axes(ax, truth: np.ndarray, pred: np.ndarray, **scatter) -> dict[str, float]:
    """Bland–Altman plot of ``pred`` against ``truth`` on ``ax``: the points, the bias and the ±1.96 SD limits
    (:func:`bmdpipe.evaluate.metrics.bland_altman`, returned; empty with fewer than 3 pairs, no lines)."""
    ax.scatter((truth + pred) / 2, pred - truth, **scatter)
    if len(truth) < 3:
        return {}
    ba = metrics.bland_altman(truth, pred)
    for y, style in ((ba["bias"], "-"), (ba["loa_lower"], "--"), (ba["loa_upper"], "--")):
        ax.axhline(y, color="r", ls=style, lw=0.8)
    return ba


def featured_method(methods: Sequence[str]) -> str | None:
    """The seed 000 model its figures show: AttMultiROI (the paper's), else the first variant trained."""
    return "AttMultiROI" if "AttMultiROI" in methods else (methods[0] if methods else None)


def seed000_figures(results: Path, samples: pd.DataFrame, reference: Any, methods: Sequence[str]) -> str:
    """Seed 000 Figs. 5, 7 and 8 for :func:`featured_method` on the held-out patients: fit line and Bland–Altman
    plot at L1 (or the first DXA site), patients by number of osteoporotic vertebrae with the share classified
    right at the Flex thresholds, and cross-vertebra DXA differences beside the prediction error by sex and age."""
    import matplotlib.pyplot as plt

    method = featured_method(methods)
    pred_path = results / "metrics" / "predictions.tsv"
    if method is None or not pred_path.exists():
        return ""
    predictions = pd.read_csv(pred_path, sep="\t")
    patients = samples.drop_duplicates("patient_id").set_index("patient_id")
    table = patient_means(predictions, method, patients)
    sites = table_sites(table)
    if table.empty or not sites:
        return ""
    parts = []
    site = "L1" if "L1" in sites else sites[0]
    g = predictions[(predictions.method == method) & (predictions.column == f"dxa_{site}")].dropna(
        subset=["truth", "pred"])
    if len(g) >= 3:
        x, y = g.truth.to_numpy(), g.pred.to_numpy()
        slope, intercept = np.polyfit(x, y, 1)
        r2 = float(np.corrcoef(x, y)[0, 1] ** 2)
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
        axes[0].scatter(x, y, s=10)
        lims = np.array([min(x.min(), y.min()), max(x.max(), y.max())])
        axes[0].plot(lims, lims, "k:", lw=0.8, label="identity")
        axes[0].plot(lims, slope * lims + intercept, "r-", lw=1,
                     label=f"y = {slope:.2f} x + {intercept:.2f}, R² = {r2:.3f}")
        axes[0].legend(fontsize=7)
        axes[0].set(xlabel=f"DXA {site} (g/cm²)", ylabel=f"{method} (g/cm²)")
        ba = bland_altman_axes(axes[1], x, y, s=10)
        outside = int(((y - x < ba["loa_lower"]) | (y - x > ba["loa_upper"])).sum())
        axes[1].set(xlabel="mean of DXA and prediction (g/cm²)", ylabel="prediction − DXA (g/cm²)",
                    title=f"bias {ba['bias']:+.3f}, SD {ba['sd']:.3f}; {outside} of {len(x)} beyond ±1.96 SD")
        axes[1].title.set_fontsize(8)
        fig.tight_layout()
        parts.append(f"<h3>Seed 000 Fig. 5: {html.escape(method)} at {html.escape(site)}</h3>"
                     + _img(_png(fig), f"{method}, {site}, each held-out radiograph: linear fit (A = {slope:.2f}, "
                            f"B = {intercept:.2f}, R² = {r2:.3f}) and Bland–Altman plot"))
    bins = patient_level_bins(table, reference)
    if bins.patients.sum():
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(bins.bin, bins.patients, color="0.85", edgecolor="0.4", label="patients")
        ax.bar(bins.bin, bins.correct, color="tab:blue", label="classified right (Flex)")
        for i, r in bins.iterrows():
            if r.patients:
                ax.annotate(f"{100 * r.fraction:.0f} %", (i, r.patients), ha="center", va="bottom", fontsize=7)
        ax.set(ylabel="held-out patients", xlabel="osteoporotic vertebrae (N: none)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        parts.append(f"<h3>Seed 000 Fig. 7: patient-level classification ({html.escape(method)}, Flex "
                     "thresholds)</h3>" + _img(_png(fig), "patients by number of vertebrae with true T ≤ −2.5; "
                                               "shaded: true negatives (N) and true positives (P1…)")
                     + _table(bins))
    errors = cross_vertebra_errors(table)
    if len(sites) >= 2 and errors.patients.iloc[0]:
        pairs = [c for c in errors.columns if c.startswith("|")]
        maes = [c for c in errors.columns if c.startswith("MAE ")]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
        shown = errors[errors.patients > 0]
        for ax, cols, title in ((axes[0], pairs, "cross-vertebra |DXA difference|"),
                                (axes[1], maes, f"{method} mean absolute error")):
            for c in cols:
                ax.plot(shown.group, shown[c], marker="o", label=c)
            ax.set(title=title, ylabel="g/cm²")
            ax.tick_params(axis="x", labelrotation=45, labelsize=7)
            ax.legend(fontsize=6)
        fig.tight_layout()
        parts.append("<h3>Seed 000 Fig. 8: cross-vertebra BMD differences and prediction error</h3>"
                     + _img(_png(fig), "mean absolute DXA difference between vertebrae (left) beside the mean "
                            "absolute prediction error per vertebra (right), by sex and age group")
                     + _table(errors))
    if parts:
        parts.insert(0, "<p class=note>Figures for the paper's model on held-out patients (each patient's radiographs "
                        "averaged, except Fig. 5); on a small cohort they show the method's behaviour, not its "
                        "accuracy.</p>")
    return "".join(parts)


def chest_bmd_section(results: Path, samples: pd.DataFrame) -> str:
    """Seed 000's models: Table I (R, RMSE, AUC per vertebra and their average, every variant beside seed 004's
    methods on the same held-out patients), Tables II and III (sensitivity and specificity at the unified
    T-score thresholds and Flex, per vertebra and per patient), and what each fold trained or skipped."""
    figures = _read_json(results / "metrics" / "bmd.json") or {"methods": {}}
    methods = figures["methods"]
    ours = [m for m in SEED000_METHODS if m in methods]
    folds = [d for d in (_read_json(p) for p in sorted((results / "models" / "chest_bmd").glob("fold*/chest_bmd.json")))
             if d]
    if not ours and not folds:
        return ""
    parts = ["<p class=note>Seed 000's models (Wang et al.): Base on the whole image; MultiPatch and AttMultiPatch "
             "on its 3 × 3 patches; MultiROI and AttMultiROI on the 14 ROIs cut at the fold's detected landmarks plus "
             "the whole image; the Att- variants fuse the VGG16 features with a transformer encoder and a BMD token. "
             "Same folds and held-out patients as seed 004's methods, listed below them for comparison.</p>"]
    compared = [*ours, *(m for m in COMPARED_METHODS if m in methods)]
    table = seed000_table(figures, compared)
    if not table.empty:
        parts.append("<h3>Seed 000 Table I: vertebra-level R, RMSE (g/cm²) and osteoporosis AUC</h3>" + _table(table))
    screen_rows = []
    for m in compared:
        s = methods[m].get("screening")
        if not s:
            continue
        labels = [k for k in s["patient"]]
        for site, v in [*s["vertebra"].items(), ("patient (any)", s["patient"])]:
            screen_rows.append([m, site, *(f"{v[k]['sensitivity']:.2f} / {v[k]['specificity']:.2f}"
                                           if v.get(k) and v[k].get("sensitivity") is not None
                                           and v[k].get("specificity") is not None else "–" for k in labels)])
    if screen_rows:
        parts.append("<h3>Seed 000 Tables II and III: sensitivity / specificity at T-score thresholds (per vertebra; "
                     "per patient: positive when any vertebra is)</h3>"
                     + _table(pd.DataFrame(screen_rows, columns=["method", "vertebra",
                                                                 *(f"T ≤ {k}" if k != "flex" else "Flex"
                                                                   for k in labels)])))
    parts.append(seed000_figures(results, samples, figures.get("tscore_reference", tscore.DEFAULT_REFERENCE), ours))
    fold_rows = []
    for d in folds:
        for v in d.get("variants", []):
            fold_rows.append([d["fold"], v["variant"], d["n_train_views"], d["n_test_views"], v["models"],
                              v["seconds"], ""])
        for variant, why in (d.get("skipped") or {}).items():
            fold_rows.append([d["fold"], variant, d["n_train_views"], d["n_test_views"], 0, None, why])
    if fold_rows:
        flagged = sum(d.get("landmarks_flagged", 0) for d in folds)
        parts.append(f"<h3>Training per fold</h3><p class=note>{flagged} radiograph(s) of these folds had a landmark "
                     "found with low confidence (landmarks.tsv): their ROIs may be cut at the wrong place.</p>"
                     + _table(pd.DataFrame(fold_rows, columns=["fold", "variant", "training views", "held-out views",
                                                               "models", "seconds", "skipped because"]), "{:.1f}"))
    parts.append(local_agreement_table(folds))
    return "".join(parts)


def local_agreement_table(folds: Sequence[dict]) -> str:
    """The attentive models' local regressors, input by input: held-out PCC with each DXA column, mean over the
    folds (``local_pcc`` of each fold's chest_bmd.json). Seed 000 assumes every chest bone carries BMD; this shows
    which inputs do on the cohort at hand."""
    rows = pd.DataFrame([(f"{v['variant']} {column}", name, r) for d in folds for v in d.get("variants", [])
                         for name, by_column in (v.get("local_pcc") or {}).items()
                         for column, r in by_column.items() if column.startswith("dxa_") and r is not None],
                        columns=["model", "input", "pcc"])
    if rows.empty:
        return ""
    table = rows.pivot_table(index="input", columns="model", values="pcc", aggfunc="mean", sort=False)
    table = table.rename_axis(columns=None).reset_index()
    return ("<h3>What each input tells alone</h3><p class=note>Held-out PCC between the attentive models' local "
            "regressor of each input and DXA, mean over the folds. Seed 000 trains them as a regulariser and assumes "
            "that every chest bone carries BMD; inputs near 0 carry none on this cohort (in the virtual cohort only "
            "the vertebrae T12-L3 change with BMD, SIMULATOR.md §2.2).</p>" + _table(table))


def build_report(results: str | Path, samples: pd.DataFrame, out: str | Path, *, title: str = "bmdpipe report",
                 max_qc_patients: int = 4) -> Path:
    """Write the self-contained report page for a finished ``results/`` folder to ``out`` (atomically).

    Args:
        results: the workflow's ``results/`` folder.
        samples: the validated samples sheet (its identifying paths are not written; only ids, views,
            sex, age and the label columns).
        out: the HTML file.
    """
    import matplotlib

    matplotlib.use("Agg")
    results = Path(results)
    sections: Iterable[tuple[str, str]] = (
        ("Cohort", cohort_section(samples)),
        ("Quality control", qc_section(results, samples, max_patients=max_qc_patients)),
        ("Training curves", training_section(results)),
        ("Results", results_section(results)),
        ("Crop localiser for bmdpipe predict", localiser_section(results)),
        ("Seed 000: chest landmarks", chest_landmarks_section(results)),
        ("Seed 000: BMD from chest radiographs", chest_bmd_section(results, samples)),
    )
    body = "".join(f"<h2>{name}</h2>{content}" for name, content in sections if content)
    page = (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class=note>bmdpipe {__version__}. Every figure is computed from this run's results/ folder.</p>"
            f"{body}</body></html>")
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return Path(out)
