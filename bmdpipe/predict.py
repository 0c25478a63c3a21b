"""``bmdpipe predict``: a trained model bundle applied to new radiographs, no CT needed.

A *model bundle* (``results/model/``, written by the rule ``export_model``)
holds per fold the stage-2 generator, its BMD fit (threshold and line),
the stage-3 regressor and the crop localiser, plus ``model.json``. For each
radiograph (DICOM or PNG/JPEG/TIFF):

1. it is read as ingestion reads it (MONOCHROME2, modality LUT, no VOI);
2. the fold localisers find the training field (box around T12–L3);
3. the crop goes through every fold's generator (the decomposed ROI image,
   g/cm² per site), BMD fit and stage-3 regressor; the fold models are
   averaged (seed 000 ensembles its fold models the same way);
4. BMD per site (stage 3, seed 004's best method; the decomposition's value
   beside it), T-score with the bundle's reference, WHO class (DXA) or ACR
   class (QCT), and a quality flag with its reasons.

The quality flag follows seed 004 §5.3 (a decomposition that does not look
like bone tells that the BMD is wrong): it is raised when the localiser is
unsure, the fold models place the field differently, the field's height is
not a fraction of the radiograph the training fields had, no pixel of the
decomposed ROI reaches the fit's threshold or its mean lies outside what
the training radiographs gave, the fold models disagree on BMD, or the BMD
is outside the physiological range. Bounds are ``predict`` in config,
copied into the bundle.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from bmdpipe import __version__, tscore
from bmdpipe.errors import InputError
from bmdpipe.io.atomic import atomic_path, write_json
from bmdpipe.samples import column_parts
from bmdpipe.train.bmd_fit import BmdFit
from bmdpipe.train.data import model_input

log = logging.getLogger("bmdpipe")

BUNDLE_FORMAT = "bmdpipe-model/1"
#: QCT classes (ACR 2018 practice parameter, trabecular vBMD, mg/cm³).
QCT_OSTEOPOROSIS, QCT_OSTEOPENIA = 80.0, 120.0
#: Default quality bounds (config ``predict``).
DEFAULT_QUALITY = {"min_localiser_confidence": 0.4, "max_localiser_spread": 0.1, "range_margin": 0.25,
                   "max_fold_sd": {"dxa": 0.1, "qct": 25.0},
                   "physiological": {"dxa": [0.3, 1.8], "qct": [0.0, 350.0]}}
CSV_COLUMNS = ["file", "status", "error", "column", "site", "measure", "unit", "bmd", "bmd_decomposition",
               "bmd_fold_sd", "tscore", "class", "sex", "sex_source", "quality", "reasons", "localiser_confidence",
               "crop_box_rows_cols", "decomposed_image"]


# --- the bundle -------------------------------------------------------------------------


def export_bundle(folds_json: str | os.PathLike[str], fold_dirs: Mapping[int, Mapping[str, str | os.PathLike[str]]],
                  out_dir: str | os.PathLike[str], *, field_size: Sequence[int], train: Mapping[str, Any],
                  tscore_reference: Any, quality: Mapping[str, Any] | None = None) -> dict:
    """Write a model bundle from a run's fold models.

    Args:
        fold_dirs: fold → ``{"generator": .../stage2, "bmd": .../bmd, "regression": ..., "localiser": ...}``.
        field_size: ``targets.size`` (rows, cols) of the training field.
        train: the ``train`` config (sites, image_size).
        quality: ``predict`` config bounds (defaults: :data:`DEFAULT_QUALITY`).

    Returns:
        ``model.json``'s content.
    """
    out = Path(out_dir)
    info = json.loads(Path(folds_json).read_text())
    localisers = []
    for k, dirs in sorted(fold_dirs.items()):
        dest = out / f"fold{k}"
        dest.mkdir(parents=True, exist_ok=True)
        for src, name in ((Path(dirs["generator"]) / "generator.pt", "generator.pt"),
                          (Path(dirs["bmd"]) / "bmd_fit.json", "bmd_fit.json"),
                          (Path(dirs["regression"]) / "model.pt", "regressor.pt"),
                          (Path(dirs["localiser"]) / "model.pt", "localiser.pt")):
            _link_or_copy(src, dest / name)
        localisers.append(json.loads((Path(dirs["localiser"]) / "localiser.json").read_text()))
    meta = {"format": BUNDLE_FORMAT, "bmdpipe_version": __version__, "folds": len(fold_dirs),
            "columns": info["columns"], "sites": list(train["sites"]), "image_size": list(train["image_size"]),
            "field_size": [int(v) for v in field_size], "tscore_reference": tscore_reference,
            "quality": {**DEFAULT_QUALITY, **(quality or {})},
            "trained_on_patients": sum(len(v) for v in info["folds"].values()),
            "localiser_heldout": localisers}
    write_json(out / "model.json", meta)
    return meta


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


class Predictor:
    """A loaded model bundle (every fold's models on ``device``)."""

    def __init__(self, model_dir: str | os.PathLike[str], device: str = "cpu") -> None:
        from bmdpipe.train.decomposition import load_generator
        from bmdpipe.train.localise import load_localiser
        from bmdpipe.train.regression import load_regressor

        root = Path(model_dir)
        meta_path = root / "model.json"
        if not meta_path.exists():
            raise InputError(f"{root}: no model.json; --model must be a bundle written by the pipeline "
                             "(results/model after `snakemake`), not a single fold's folder")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != BUNDLE_FORMAT:
            raise InputError(f"{meta_path}: format {self.meta.get('format')!r}, this bmdpipe reads {BUNDLE_FORMAT}")
        self.device = torch.device(device)
        self.columns: list[str] = list(self.meta["columns"])
        self.folds = []
        for k in range(int(self.meta["folds"])):
            d = root / f"fold{k}"
            gen, _ = load_generator(d / "generator.pt", self.device)
            reg, payload = load_regressor(d / "regressor.pt", self.device)
            fits = [BmdFit.from_dict(f) for f in json.loads((d / "bmd_fit.json").read_text())["fits"]]
            self.folds.append({"generator": gen, "regressor": reg, "norm": payload["norm"], "fits": fits,
                               "localiser": load_localiser(d / "localiser.pt", self.device)})

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> dict[str, Any]:
        """Everything predicted for one ``(rows, cols)`` MONOCHROME2 radiograph.

        Returns:
            ``box``, ``confidence``, ``spread`` (fold localisers' centre spread / box height),
            ``height_fraction`` (box height / radiograph height), ``crop``
            ``(H, W)`` standardised, ``roi`` ``(S, H, W)`` mean decomposed ROI image (g/cm²),
            ``decomposition``, ``regression``, ``feature`` ``(folds, columns)``.
        """
        from bmdpipe.train.localise import locate

        loc = locate([f["localiser"] for f in self.folds], image)
        box = loc["box"]
        x = model_input(image, box, self.meta["field_size"], self.meta["image_size"])
        xt = torch.from_numpy(x)[None, None].to(self.device)
        dec, reg, feat, rois = [], [], [], []
        for f in self.folds:
            roi = f["generator"](xt).clamp_min(0).float().cpu().numpy()  # (1, S, H, W)
            rois.append(roi[0])
            dec.append([fit.apply(roi)[0] for fit in f["fits"]])
            feat.append([fit.feature(roi)[0] for fit in f["fits"]])
            norm = f["norm"]
            pred = f["regressor"](xt).float().cpu().numpy()[0] * np.asarray(norm["sd"]) + np.asarray(norm["mean"])
            reg.append([pred[norm["columns"].index(c)] for c in self.columns])
        return {"box": box, "confidence": loc["confidence"], "spread": loc["spread_px"] / max(box[1] - box[0], 1),
                "height_fraction": (box[1] - box[0]) / image.shape[0],
                "crop": x, "roi": np.mean(rois, axis=0), "decomposition": np.array(dec), "regression": np.array(reg),
                "feature": np.array(feat)}

    def quality_flags(self, result: Mapping[str, Any]) -> list[str]:
        """Why this prediction should not be trusted (empty: it looks like the training radiographs)."""
        q = {**DEFAULT_QUALITY, **self.meta.get("quality", {})}
        flags = []
        if result["confidence"] < q["min_localiser_confidence"]:
            flags.append(f"localiser unsure (confidence {result['confidence']:.2f} < {q['min_localiser_confidence']})")
        if result["spread"] > q["max_localiser_spread"]:
            flags.append(f"fold localisers disagree on the field ({result['spread']:.0%} of its height)")
        ranges = [f["localiser"][1].get("height_fraction_range") for f in self.folds]
        if all(ranges):
            lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
            if not _inside(result["height_fraction"], (lo, hi), q["range_margin"]):
                flags.append(f"field height {result['height_fraction']:.0%} of the radiograph, training fields "
                             f"{lo:.0%}–{hi:.0%} (another anatomy scale or not this body region)")
        for k, col in enumerate(self.columns):
            measure = column_parts(col)[0]
            feats = result["feature"][:, k]
            fits = [f["fits"][k] for f in self.folds]
            if np.any(feats <= 0) and all(fit.train_range is None or fit.train_range[0] > 0 for fit in fits):
                # (a fit whose training images also had no pixel above its threshold is judged by its range)
                flags.append(f"{col}: no decomposed bone above the threshold (does not look like bone)")
            else:
                outside = [ft for ft, fit in zip(feats, fits) if fit.train_range is not None and not
                           _inside(ft, fit.train_range, q["range_margin"])]
                if outside:
                    lo, hi = fits[0].train_range
                    flags.append(f"{col}: decomposed ROI mean {np.mean(feats):.3f} g/cm² outside the training "
                                 f"radiographs' {lo:.3f}–{hi:.3f} (does not look like their bone)")
            bmd = result["regression"][:, k]
            if measure in q["max_fold_sd"] and len(bmd) > 1 and bmd.std() > q["max_fold_sd"][measure]:
                flags.append(f"{col}: fold models disagree (SD {bmd.std():.3g})")
            lo, hi = q["physiological"].get(measure, (-np.inf, np.inf))
            if not lo <= bmd.mean() <= hi:
                flags.append(f"{col}: {bmd.mean():.3g} outside the physiological {lo:g}–{hi:g}")
        return flags


def _inside(value: float, rng: Sequence[float], margin: float) -> bool:
    lo, hi = rng
    pad = margin * (hi - lo)
    return lo - pad <= value <= hi + pad


# --- files ------------------------------------------------------------------------------


def _sex(path: Path, override: str | None) -> tuple[str, str]:
    if override:
        return override, "--sex"
    if not path.name.lower().endswith((".png", ".jpg", ".jpeg", ".tif", ".tiff")):
        import pydicom

        try:
            value = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientSex"]).get("PatientSex", ""))
        except Exception:  # noqa: BLE001 - the image reader reports unreadable files
            value = ""
        if value.upper() in ("F", "M"):
            return value.upper(), "PatientSex (0010,0040)"
    return "F", "unknown: female reference"


def classify(column: str, value: float, sex: str, reference: Any) -> tuple[float, str]:
    """``(T-score, class)``: WHO classes on the T-score for DXA columns; ACR vBMD classes for QCT (no T-score)."""
    measure, site = column_parts(column)
    if measure == "qct":
        return float("nan"), ("osteoporosis" if value < QCT_OSTEOPOROSIS else
                              "osteopenia" if value < QCT_OSTEOPENIA else "normal")
    try:
        t = tscore.t_score(value, site, sex, reference)
    except KeyError:
        return float("nan"), ""
    return t, tscore.who_class(t)


def save_decomposition(result: Mapping[str, Any], sites: Sequence[str], stem: Path) -> str:
    """``stem.png`` (radiograph crop | decomposed ROI per site, 0–2 g/cm² as black–white) and ``stem.npz``
    (``crop`` standardised, ``roi`` ``(S, H, W)`` g/cm², ``box``); returns the PNG's path."""
    from PIL import Image

    crop = result["crop"]
    lo, hi = np.percentile(crop, [1, 99])
    panels = [np.clip((crop - lo) / max(hi - lo, 1e-6), 0, 1)] + [np.clip(r / 2.0, 0, 1) for r in result["roi"]]
    strip = np.concatenate([np.pad(p, 2, constant_values=1.0) for p in panels], axis=1)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(stem.with_suffix(".png")) as tmp:
        Image.fromarray((strip * 255).astype(np.uint8)).save(tmp, format="PNG")
    with atomic_path(stem.with_suffix(".npz")) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, crop=crop, roi=result["roi"], sites=np.array(sites),
                                box=np.asarray(result["box"]))
    return str(stem.with_suffix(".png"))


def predict_files(model: str | os.PathLike[str] | Predictor, files: Sequence[str | os.PathLike[str]],
                  out_csv: str | os.PathLike[str], *, images_dir: str | os.PathLike[str] | None = None,
                  sex: str | None = None, device: str = "cpu", pixel_spacing_mm: float | None = None) -> pd.DataFrame:
    """Predict every file and write ``out_csv`` (one row per file and BMD column, :data:`CSV_COLUMNS`).

    ``model`` is a bundle folder or a loaded :class:`Predictor`. A file that cannot be read gets one
    ``status = error`` row naming the problem; the others go on.
    Decomposed images go to ``images_dir`` (default: ``out_csv`` without suffix + ``_images``).
    No DICOM header value other than PatientSex is read, and none is written.
    """
    from bmdpipe.io.xray import read_xray

    predictor = model if isinstance(model, Predictor) else Predictor(model, device)
    reference = predictor.meta["tscore_reference"]
    images = Path(images_dir) if images_dir else Path(out_csv).with_name(Path(out_csv).stem + "_images")
    rows = []
    for i, f in enumerate(files):
        path = Path(f)
        start = time.perf_counter()
        try:
            # the spacing is not used by the models (the localiser works on the whole image); a PNG has none
            image, _ = read_xray(path, default_pixel_spacing_mm=pixel_spacing_mm or 1.0)
            result = predictor(image)
        except InputError as exc:
            log.error("%s", exc)
            rows.append({"file": str(path), "status": "error", "error": str(exc)})
            continue
        flags = predictor.quality_flags(result)
        s, s_source = _sex(path, sex)
        png = save_decomposition(result, predictor.meta["sites"], images / f"{i:04d}_{path.stem}")
        for k, col in enumerate(predictor.columns):
            measure, site = column_parts(col)
            bmd = float(result["regression"][:, k].mean())
            t, cls = classify(col, bmd, s, reference)
            rows.append({"file": str(path), "status": "ok", "error": "", "column": col, "site": site,
                         "measure": measure, "unit": "mg/cm3" if measure == "qct" else "g/cm2", "bmd": bmd,
                         "bmd_decomposition": float(result["decomposition"][:, k].mean()),
                         "bmd_fold_sd": float(result["regression"][:, k].std()), "tscore": t, "class": cls,
                         "sex": s, "sex_source": s_source, "quality": "flagged" if flags else "ok",
                         "reasons": "; ".join(flags), "localiser_confidence": result["confidence"],
                         "crop_box_rows_cols": " ".join(str(int(v)) for v in result["box"]),
                         "decomposed_image": png})
        log.info("%s: %d columns, quality %s, %.2f s", path, len(predictor.columns), "flagged" if flags else "ok",
                 time.perf_counter() - start)
    table = pd.DataFrame(rows, columns=CSV_COLUMNS)
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.4g")
    return table

