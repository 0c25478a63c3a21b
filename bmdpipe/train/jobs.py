"""The training stages as jobs on files: what the workflow's rules and the CLI run.

Layout (ARCHITECTURE.md):

* ``dataset/folds.json``: patient-level folds (:func:`write_folds`);
* ``models/decomposition/fold{k}/stage{1,2}/``: generators (:func:`decomposition_job`);
* ``models/decomposition/fold{k}/bmd/``: ``bmd_fit.json`` and held-out predictions (:func:`bmd_fit_job`);
* ``models/regression/fold{k}/``, ``models/baseline/fold{k}/``: regressors and held-out predictions
  (:func:`regression_job`);
* ``models/chest_bmd/fold{k}/``: seed 000's five models and their held-out predictions
  (:func:`chest_bmd_fold_job`).

Every ``predictions.tsv`` is long: one row per held-out view and BMD column with
``patient_id, view, fold, method, column, truth, pred``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from bmdpipe import __version__
from bmdpipe.io.atomic import atomic_path, write_json
from bmdpipe.samples import load_samples
from bmdpipe.train.bmd_fit import fit_columns
from bmdpipe.train.data import View, bmd_columns, bmd_labels, load_views
from bmdpipe.train.folds import make_folds, split
from bmdpipe.train.loop import resolve_device
from bmdpipe.train.settings import STAGE_VERSION, TrainSettings

PREDICTION_COLUMNS = ["patient_id", "view", "fold", "method", "column", "truth", "pred"]


def usable_patients(targets_dirs: Mapping[str, str | os.PathLike[str]],
                    sites: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Patients whose targets stage made at least one view with every site's stage-2 target; the others, why not."""
    ok, excluded = [], {}
    for patient, folder in targets_dirs.items():
        summary = json.loads((Path(folder) / "targets.json").read_text())
        missing = [s for s in sites if s not in summary.get("roi_sites", [])]
        if summary.get("status") != "ok" or not summary.get("views"):
            excluded[patient] = summary.get("reason") or "no registered view"
        elif missing:
            why = "; ".join(summary.get("warnings", [])) or f"its ROI sites are {summary.get('roi_sites')}"
            excluded[patient] = f"no stage-2 target for {missing}: {why}"
        else:
            ok.append(patient)
    return ok, excluded


def write_folds(targets_dirs: Mapping[str, str | os.PathLike[str]], samples: str | os.PathLike[str],
                settings: TrainSettings, out: str | os.PathLike[str]) -> dict:
    """``folds.json``: the K folds of the usable patients, the BMD columns, the excluded patients.

    Raises:
        ValueError: fewer usable patients than folds, or no BMD column in the sheet.
    """
    sheet = load_samples(samples, check_paths=False)
    columns = bmd_columns(sheet, settings.sites, settings.measures)
    if not columns:
        raise ValueError(f"{samples}: none of the BMD columns {[f'{m}_{s}' for m in settings.measures for s in settings.sites]}"
                         " holds a value; set train.sites and train.measures to columns of the sheet")
    ok, excluded = usable_patients(targets_dirs, settings.sites)
    labels = bmd_labels(sheet, columns)
    for p in list(ok):
        if not np.isfinite(labels[p]).any():
            ok.remove(p)
            excluded[p] = f"no BMD value in {columns}"
    if len(ok) < settings.folds:
        raise ValueError(f"only {len(ok)} patient(s) have training targets and BMD labels, fewer than the "
                         f"{settings.folds} folds of train.folds; left out: {excluded}. Fix those patients (see "
                         "results/qc/patients.tsv), lower train.folds, or set train.enabled: false")
    folds = make_folds(ok, settings.folds, settings.fold_seed)
    payload = {"k": settings.folds, "seed": settings.fold_seed, "folds": folds, "columns": columns,
               "excluded": excluded, "code_version": STAGE_VERSION, "bmdpipe_version": __version__}
    write_json(out, payload)
    return payload


def fold_views(folds_json: str | os.PathLike[str], fold: int, targets_root: str | os.PathLike[str],
               samples: str | os.PathLike[str], settings: TrainSettings) -> tuple[list[View], list[View], list[str]]:
    """``(training views, held-out views, BMD columns)`` of a fold.

    Training views are limited to ``settings.views`` (a pose subset) when set; held-out views keep every pose.
    """
    info = json.loads(Path(folds_json).read_text())
    parts = split(info["folds"], fold)
    labels = bmd_labels(load_samples(samples, check_paths=False), info["columns"])
    root = Path(targets_root)
    train = load_views({p: root / p for p in parts["train"]}, settings.sites, settings.image_size, labels,
                       views=settings.views)
    test = load_views({p: root / p for p in parts["test"]}, settings.sites, settings.image_size, labels)
    return train, test, list(info["columns"])


def prediction_rows(views: Sequence[View], fold: int, method: str, columns: Sequence[str],
                    pred: np.ndarray) -> pd.DataFrame:
    """Long rows for ``pred`` ``(N, K)``; views without a label for a column are left out."""
    rows = []
    for i, v in enumerate(views):
        for k, c in enumerate(columns):
            if np.isfinite(v.bmd[k]):
                rows.append((v.patient, v.view, fold, method, c, float(v.bmd[k]), float(pred[i, k])))
    return pd.DataFrame(rows, columns=PREDICTION_COLUMNS)


def write_table(df: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False, float_format="%.6g")


def bmd_fit_job(generator_path: str | os.PathLike[str], train: Sequence[View], test: Sequence[View],
                columns: Sequence[str], fold: int, settings: TrainSettings,
                out_dir: str | os.PathLike[str], tag: str = "") -> dict:
    """Choose t and fit the lines on the training views; apply them to the held-out views.

    The ``decomposition`` method's t and line are fitted on the generator's images of the training views
    (``decomposition.fit_on: predicted``, so the line absorbs the generator's intensity scale) or on their
    true ROI images (``true``); the ``ceiling`` always uses the true images, fitted on the training views'.

    Writes ``bmd_fit.json`` (both fits per column, with the PCC-vs-t curves), ``predictions.tsv`` (held-out,
    methods ``decomposition`` and ``ceiling``), ``decomposition.tsv`` (held-out image accuracy per view and
    site: :func:`bmdpipe.evaluate.decomposition.accuracy_rows`) and ``examples.npz`` (a few held-out
    radiograph | predicted | true triples for the report). ``tag`` is appended to the method names (a training
    experiment's ``" @{name}"``).
    """
    from bmdpipe.evaluate.decomposition import accuracy_rows
    from bmdpipe.train.decomposition import load_generator, predict

    gen, _ = load_generator(generator_path, resolve_device(settings.device))
    thresholds = settings.decomposition.thresholds
    true_train = np.stack([v.roi for v in train])
    labels_train = np.stack([v.bmd for v in train])
    fit_images = predict(gen, train) if settings.decomposition.fit_on == "predicted" else true_train
    fits = fit_columns(fit_images, labels_train, columns, settings.sites, thresholds)
    ceiling_fits = fit_columns(true_train, labels_train, columns, settings.sites, thresholds)
    pred_images = predict(gen, test)
    true_test = np.stack([v.roi for v in test])
    pred = np.stack([f.apply(pred_images) for f in fits], axis=1)
    ceiling = np.stack([f.apply(true_test) for f in ceiling_fits], axis=1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = pd.concat([prediction_rows(test, fold, "decomposition" + tag, columns, pred),
                       prediction_rows(test, fold, "ceiling" + tag, columns, ceiling)])
    write_table(table, out / "predictions.tsv")
    write_table(accuracy_rows([v.patient for v in test], [v.view for v in test], fold, "decomposition" + tag,
                              settings.sites, pred_images, true_test, thresholds), out / "decomposition.tsv")
    n = min(4, len(test))
    with atomic_path(out / "examples.npz") as tmp:
        np.savez_compressed(tmp, xray=np.stack([v.xray for v in test[:n]]), predicted=pred_images[:n],
                            true=true_test[:n], patient=np.array([v.patient for v in test[:n]]),
                            view=np.array([v.view for v in test[:n]]), sites=np.array(settings.sites))
    summary = {"stage": "bmd_from_decomposition", "status": "ok", "fold": fold, "code_version": STAGE_VERSION,
               "bmdpipe_version": __version__, "fit_on": settings.decomposition.fit_on,
               "fits": [f.to_dict() for f in fits], "ceiling_fits": [f.to_dict() for f in ceiling_fits],
               "n_train_views": len(train), "n_test_views": len(test)}
    write_json(out / "bmd_fit.json", summary)
    return summary


def regression_predictions_job(model_path: str | os.PathLike[str], test: Sequence[View], fold: int, method: str,
                               out: str | os.PathLike[str], *, device: str = "auto") -> pd.DataFrame:
    """Held-out predictions of a stage-3 or baseline model (on ``device``: auto, cpu, cuda), written to ``out``."""
    from bmdpipe.train.regression import load_regressor, predict_bmd

    model, payload = load_regressor(model_path, resolve_device(device))
    columns = payload["norm"]["columns"]
    table = prediction_rows(test, fold, method, columns, predict_bmd(model, payload["norm"], test))
    write_table(table, out)
    return table


def decomposition_fold_job(*, folds: str, fold: int, targets_root: str, samples: str, settings: dict, stage: int,
                           out: str, checkpoints: str, code_version: str, init: str | None = None) -> None:
    """Rule train_decomposition: one GAN stage of one fold, trained on its training views into ``out``.

    Takes only picklable arguments (paths and the rule's train config slice) so that
    :func:`bmdpipe.train.launch.launch` can run it in every torchrun process. Checkpoints go to a
    folder under ``checkpoints`` keyed by the settings, code version, training patients and ``init``.
    """
    from bmdpipe.train.decomposition import train_stage
    from bmdpipe.train.settings import work_dir

    parsed = TrainSettings.from_config(settings)
    train, _, _ = fold_views(folds, fold, targets_root, samples, parsed)
    work = work_dir(checkpoints, fold, stage, settings, code_version, sorted({v.patient for v in train}), str(init))
    train_stage(train, stage, out, work, parsed, init=init, seed=parsed.seed + fold, progress=True)


def regression_fold_job(*, folds: str, fold: int, targets_root: str, samples: str, settings: dict, out: str,
                        checkpoints: str, code_version: str, method: str, generator: str | None = None) -> None:
    """Rules train_regression (``generator`` = the stage-2 ``generator.pt``) and train_baseline (None).

    Trains on the fold's training views, then (rank 0) writes the held-out ``predictions.tsv`` into ``out``.
    Picklable arguments only, as :func:`decomposition_fold_job`.
    """
    from bmdpipe.train.loop import is_main
    from bmdpipe.train.regression import train_regression
    from bmdpipe.train.settings import work_dir

    parsed = TrainSettings.from_config(settings)
    train, test, columns = fold_views(folds, fold, targets_root, samples, parsed)
    work = work_dir(checkpoints, fold, settings, code_version, sorted({v.patient for v in train}), str(generator))
    model = train_regression(train, columns, out, work, parsed, generator=generator, seed=parsed.seed + fold,
                             progress=True)
    if is_main():
        regression_predictions_job(model, test, fold, method, Path(out) / "predictions.tsv", device=parsed.device)


def localiser_fold_job(*, folds: str, fold: int, targets_root: str, samples: str, settings: dict, xray_root: str,
                       aspect: float, out: str, checkpoints: str, code_version: str) -> dict:
    """Rule train_localiser: the crop localiser of one fold, trained on its training patients' registered views.

    Writes ``out/model.pt``, ``metrics.csv``, ``heldout.tsv`` (per held-out view: centre error in mm,
    height error in %, IoU with the registered box, confidence) and ``localiser.json`` (their summary).
    ``samples`` is unused (the localiser needs no BMD) but kept for the shared fold-job arguments.
    """
    from bmdpipe.train.localise import evaluate_localiser, load_localiser_views, summarise_localiser, train_localiser
    from bmdpipe.train.settings import work_dir

    parsed = TrainSettings.from_config(settings)
    loc = parsed.localiser
    parts = split(json.loads(Path(folds).read_text())["folds"], fold)
    train = load_localiser_views(parts["train"], targets_root, xray_root, loc.size)
    test = load_localiser_views(parts["test"], targets_root, xray_root, loc.size)
    work = work_dir(checkpoints, fold, "localiser", settings, code_version, parts["train"])
    model = train_localiser(train, out, work, loc, aspect=aspect, device=parsed.device, seed=parsed.seed + fold,
                            progress=True)
    table = evaluate_localiser(model, test, fold, device=str(resolve_device(parsed.device)))
    write_table(table, Path(out) / "heldout.tsv")
    summary = {"stage": "localiser", "status": "ok", "fold": fold, "code_version": STAGE_VERSION,
               "bmdpipe_version": __version__, "n_train_views": len(train), **summarise_localiser(table)}
    write_json(Path(out) / "localiser.json", summary)
    return summary


def chest_landmarks_fold_job(*, folds: str, fold: int, targets_root: str, samples: str, settings: dict,
                             xray_root: str, out: str, checkpoints: str, code_version: str,
                             landmarks: str | None = None) -> dict:
    """Rule train_chest_landmarks: seed 000's landmark detector of one fold, trained on its training patients'
    views that carry CT-derived landmarks (:mod:`bmdpipe.train.chest`).

    Writes ``out/model.pt``, ``metrics.csv``, ``train.json``, ``heldout.tsv`` (per held-out view and landmark:
    error in mm, confidence) and ``chest_landmarks.json`` (mean and median error, fraction within 5 mm, per
    landmark). A fold whose training patients have no landmarks writes only ``chest_landmarks.json`` with
    status ``skipped`` and the reason. ``samples`` is unused (no BMD) but kept for the shared fold-job arguments.
    ``landmarks`` is the table of points placed by hand (config ``cohort.landmarks``): they replace the CT's.
    """
    from bmdpipe.samples import read_landmark_table
    from bmdpipe.train.chest import evaluate_detector, load_landmark_views, summarise_detector, train_detector
    from bmdpipe.train.settings import work_dir

    parsed = TrainSettings.from_config(settings)
    det = parsed.chest_landmarks
    parts = split(json.loads(Path(folds).read_text())["folds"], fold)
    manual = read_landmark_table(landmarks) if landmarks else {}
    train, test = (load_landmark_views(parts[k], targets_root, xray_root, det.size, manual=manual,
                                       manual_source=str(landmarks)) for k in ("train", "test"))
    summary = {"stage": "chest_landmarks", "status": "ok", "fold": fold, "code_version": STAGE_VERSION,
               "bmdpipe_version": __version__, "n_train_views": len(train),
               "train_patients": sorted({v.patient for v in train}),
               "manual_views": sorted(f"{p}/{v}" for p, v in manual if p in parts["train"] or p in parts["test"])}
    if not train:  # reported, not fatal: the other folds and methods go on
        summary.update(status="skipped", reason="no training patient of this fold has chest landmarks (a supplied "
                       "label map naming the clavicles, ribs, C7 and T12, or points in cohort.landmarks)",
                       n_views=0, n_points=0)
        Path(out).mkdir(parents=True, exist_ok=True)
        write_json(Path(out) / "chest_landmarks.json", summary)
        return summary
    key = {**settings, "landmarks_sha256": hashlib.sha256(Path(landmarks).read_bytes()).hexdigest()} if landmarks \
        else settings  # a changed table does not resume a killed run's checkpoint
    work = work_dir(checkpoints, fold, "chest_landmarks", key, code_version, parts["train"])
    model = train_detector(train, out, work, det, device=parsed.device, seed=parsed.seed + fold, progress=True)
    table = evaluate_detector(model, test, fold, device=str(resolve_device(parsed.device)))
    write_table(table, Path(out) / "heldout.tsv")
    summary.update(summarise_detector(table))
    write_json(Path(out) / "chest_landmarks.json", summary)
    return summary


def chest_bmd_fold_job(*, folds: str, fold: int, targets_root: str, samples: str, settings: dict, xray_root: str,
                       out: str, checkpoints: str, code_version: str, detector: str | None = None) -> dict:
    """Rule train_chest_bmd: seed 000's models (:mod:`bmdpipe.train.chest_bmd`) of one fold.

    ``detector`` is the fold's landmark detector folder (rule train_chest_landmarks); without its ``model.pt``
    (no labelled patient, or the fold's detector was skipped) the ROI models are skipped and say why.

    Writes under ``out``: ``{variant}/model.pt`` (``model_{column}.pt`` per column with ``per_vertebra``) and
    their ``*_metrics.csv``; ``predictions.tsv`` (held-out, methods named as the variants); ``landmarks.tsv``
    (per view the detector's confidence and the low-confidence flag); ``chest_bmd.json`` (per variant: inputs,
    models, seconds, final loss, and for the attentive ones ``local_pcc``, the held-out PCC of each input's local
    regressor per column (:func:`bmdpipe.train.chest_bmd.local_agreement`); skipped variants with the reason).
    """
    from bmdpipe.models.multiroi import VARIANTS
    from bmdpipe.train.chest_bmd import (
        KINDS,
        chest_outputs,
        landmark_table,
        load_chest_model,
        load_chest_views,
        local_agreement,
        summary_row,
        train_chest_model,
    )
    from bmdpipe.train.settings import work_dir

    parsed = TrainSettings.from_config(settings)
    cb = parsed.chest_bmd
    info = json.loads(Path(folds).read_text())
    parts, columns = split(info["folds"], fold), list(info["columns"])
    labels = bmd_labels(load_samples(samples, check_paths=False), columns)
    model_pt = Path(detector) / "model.pt" if detector else None
    variants, skipped = [], {}
    for variant in cb.variants:
        if VARIANTS[variant][0] == "rois" and (model_pt is None or not model_pt.exists()):
            skipped[variant] = ("no landmark detector for this fold (it learns from patients whose supplied label "
                                "maps name the clavicles, ribs, C7 and T12)")
        else:
            variants.append(variant)
    kinds = [k for k in KINDS if any(VARIANTS[v][0] == k for v in variants)]
    device = str(resolve_device(parsed.device))
    uses_detector = "rois" in kinds
    load = dict(targets_root=targets_root, xray_root=xray_root, labels=labels, size=cb.input_size, kinds=kinds,
                detector=model_pt if uses_detector else None, device=device)
    train = [v for v in load_chest_views(parts["train"], **load) if parsed.views is None or v.view in parsed.views]
    test = load_chest_views(parts["test"], **load)
    groups = [[k] for k in range(len(columns))] if cb.per_vertebra else [list(range(len(columns)))]
    root = Path(out)
    tables, rows = [], []
    for variant in variants:
        trained, pred, local = [], np.full((len(test), len(columns)), np.nan), {}
        for idx in groups:
            usable = [v for v in train if np.isfinite(v.bmd[idx]).any()]
            if not usable:
                continue
            path = root / variant / ("model.pt" if not cb.per_vertebra else f"model_{columns[idx[0]]}.pt")
            work = work_dir(checkpoints, fold, variant, idx, settings, code_version, parts["train"])
            trained.append(train_chest_model(usable, variant, columns, idx, path, work, cb, device=device,
                                             seed=parsed.seed + fold, progress=True))
            shutil.rmtree(work, ignore_errors=True)
            if test:
                model, payload = load_chest_model(path, device)
                pred[:, idx], local_pred = chest_outputs(model, payload, test)
                truth = np.stack([v.bmd for v in test])[:, idx]
                for name, by_column in local_agreement(local_pred, truth, variant, payload["norm"]["columns"]).items():
                    local.setdefault(name, {}).update(by_column)
        tables.append(prediction_rows(test, fold, variant, columns, pred))
        rows.append({**summary_row(variant, VARIANTS[variant][0], trained), "local_pcc": local})
    root.mkdir(parents=True, exist_ok=True)
    write_table(pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=PREDICTION_COLUMNS),
                root / "predictions.tsv")
    landmarks = landmark_table([*train, *test], fold, cb.min_landmark_confidence)
    write_table(landmarks, root / "landmarks.tsv")
    summary = {"stage": "chest_bmd", "status": "ok", "fold": fold, "code_version": STAGE_VERSION,
               "bmdpipe_version": __version__, "columns": columns, "n_train_views": len(train),
               "n_test_views": len(test), "input_size": cb.input_size, "per_vertebra": cb.per_vertebra,
               "variants": rows, "skipped": skipped, "landmarks_flagged": int(landmarks.flagged.sum())}
    write_json(root / "chest_bmd.json", summary)
    return summary


def robustness_fold_job(*, folds: str, fold: int, targets_root: str, samples: str, settings: dict, xray_root: str,
                        field_size: Sequence[int], qualities: Sequence[int], generator: str, bmd_fit: str,
                        regressor: str, baseline: str, localiser: str, out: str) -> pd.DataFrame:
    """Rule robustness: a fold's trained models on variants of its held-out radiographs
    (:mod:`bmdpipe.evaluate.robustness`): re-compressed as JPEG at each quality, and cropped where the fold's
    localiser puts the field (``bmdpipe predict``'s path) instead of where registration put it.

    Writes ``out/predictions.tsv`` (methods ``decomposition``, ``decomposition+regression`` and ``baseline``,
    each as ``"{method} @JPEG{q}"`` and ``"{method} @localiser"``) and ``out/robustness.json`` (mean file size
    per quality, the localised fields' IoU with the registered ones).
    """
    from bmdpipe.evaluate.robustness import (
        JPEG_TAG,
        LOCALISER_TAG,
        localised_views,
        recompressed_views,
        robustness_summary,
        whole_radiographs,
    )
    from bmdpipe.train.bmd_fit import BmdFit
    from bmdpipe.train.decomposition import load_generator, predict
    from bmdpipe.train.localise import load_localiser
    from bmdpipe.train.regression import load_regressor, predict_bmd

    parsed = TrainSettings.from_config(settings)
    device = resolve_device(parsed.device)
    _, test, columns = fold_views(folds, fold, targets_root, samples, parsed)
    gen, _ = load_generator(generator, device)
    fits = [BmdFit.from_dict(f) for f in json.loads(Path(bmd_fit).read_text())["fits"]]
    models = {"decomposition+regression": load_regressor(regressor, device),
              "baseline": load_regressor(baseline, device)}

    def rows(views: Sequence[View], tag: str) -> list[pd.DataFrame]:
        images = predict(gen, views)
        out = [prediction_rows(views, fold, f"decomposition {tag}", columns,
                               np.stack([f.apply(images) for f in fits], axis=1))]
        for method, (model, payload) in models.items():
            pred = predict_bmd(model, payload["norm"], views)
            order = [payload["norm"]["columns"].index(c) for c in columns]
            out.append(prediction_rows(views, fold, f"{method} {tag}", columns, pred[:, order]))
        return out

    wholes = whole_radiographs(test, targets_root, xray_root)
    tables, sizes, raw_kb = [], {}, None
    for q in qualities:
        views, sizes[int(q)], raw_kb = recompressed_views(test, wholes, int(q), field_size, parsed.image_size)
        tables += rows(views, f"{JPEG_TAG}{q}")
    views, ious = localised_views(test, wholes, [load_localiser(localiser, device)], field_size, parsed.image_size)
    tables += rows(views, LOCALISER_TAG)
    table = pd.concat(tables, ignore_index=True)
    Path(out).mkdir(parents=True, exist_ok=True)
    write_table(table, Path(out) / "predictions.tsv")
    write_json(Path(out) / "robustness.json", {
        "fold": fold, "n_views": len(test), **robustness_summary(sizes, raw_kb),
        "localiser_iou": {"median": float(np.median(ious)) if ious else None, "values": ious}})
    return table
