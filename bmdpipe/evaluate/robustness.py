"""Robustness of the trained models on variants of the held-out radiographs.

* JPEG (seed 004 §4.2.4, Fig. 8): each held-out radiograph (the ingested
  full image, as the hospital's file would hold it) is brought to 8 bits
  over its 0.5–99.5 % intensity range and JPEG-compressed at quality q with
  Pillow's libjpeg; the decoded image goes through the same crop, resize and
  standardisation as the training data. Methods ``"{method} @JPEG{q}"``.
* The localised field (``bmdpipe predict``'s path): the crop is where the
  fold's localiser puts it on the whole radiograph instead of where
  registration with the patient's CT put it. Methods ``"{method} @localiser"``.

Every fold's trained models predict BMD from the variants, so bmd.json holds
every figure for them.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from bmdpipe.io.xray import load_xray
from bmdpipe.train.data import View, model_input

#: What separates a method from its variant in a method name: ``"baseline @JPEG50"``.
VARIANT = " @"
#: Suffix of a re-compressed method's name.
JPEG_TAG = "@JPEG"
#: Suffix of a method whose crop the localiser placed.
LOCALISER_TAG = "@localiser"


def jpeg_roundtrip(image: np.ndarray, quality: int) -> tuple[np.ndarray, int]:
    """``image`` → 8 bits (0.5–99.5 % range) → JPEG at ``quality`` → decoded, in the original value scale.

    Returns:
        ``(decoded (rows, cols) float32, JPEG file size in bytes)``.
    """
    lo, hi = np.percentile(image, [0.5, 99.5])
    scale = max(float(hi - lo), 1e-6)
    eight = np.clip(np.round((image - lo) / scale * 255), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(eight).save(buf, format="JPEG", quality=int(quality))
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32)
    return (decoded / 255 * scale + lo).astype(np.float32), len(buf.getvalue())


def whole_radiographs(views: Sequence[View], targets_root: str | os.PathLike[str],
                      xray_root: str | os.PathLike[str]) -> list[tuple[np.ndarray, list[int]]]:
    """Each view's ingested whole radiograph and its registered field ``[r0, r1, c0, c1]`` (read once for
    every variant)."""
    out = []
    for v in views:
        image, _ = load_xray(Path(xray_root) / v.patient / f"{v.view}.nii.gz")
        with np.load(Path(targets_root) / v.patient / f"{v.view}.npz") as z:
            out.append((image, [int(b) for b in z["crop_box_rows_cols"]]))
    return out


def recompressed_views(views: Sequence[View], wholes: Sequence[tuple[np.ndarray, list[int]]], quality: int,
                       field_size: Sequence[int], image_size: Sequence[int]) -> tuple[list[View], float, float]:
    """Copies of ``views`` whose radiograph is re-read from the JPEG-compressed whole image
    (``wholes`` from :func:`whole_radiographs`).

    Returns:
        ``(views, mean JPEG size, mean 16-bit raw size)`` of the whole radiographs, kB.
    """
    out, sizes, raw = [], [], []
    for v, (image, box) in zip(views, wholes):
        decoded, nbytes = jpeg_roundtrip(image, quality)
        sizes.append(nbytes / 1000)
        raw.append(image.size * 2 / 1000)
        out.append(replace(v, xray=model_input(decoded, box, field_size, image_size)))
    if not out:
        return out, float("nan"), float("nan")
    return out, float(np.mean(sizes)), float(np.mean(raw))


def localised_views(views: Sequence[View], wholes: Sequence[tuple[np.ndarray, list[int]]], localisers: Sequence,
                    field_size: Sequence[int], image_size: Sequence[int]) -> tuple[list[View], list[float]]:
    """Copies of ``views`` cropped where ``localisers`` (:func:`bmdpipe.train.localise.load_localiser` pairs)
    place the field; also each view's IoU with the registered field."""
    from bmdpipe.train.localise import box_iou, locate

    out, ious = [], []
    for v, (image, registered) in zip(views, wholes):
        box = locate(localisers, image)["box"]
        out.append(replace(v, xray=model_input(image, box, field_size, image_size)))
        ious.append(box_iou(box, registered))
    return out, ious


def robustness_summary(sizes_kb: dict[int, float], raw_kb: float) -> dict:
    """The JSON beside the predictions: quality → mean file size (kB) and its fraction of the 16-bit raw size."""
    return {"jpeg": {str(q): {"mean_kb": kb, "fraction_of_raw": kb / raw_kb if raw_kb else None}
                     for q, kb in sizes_kb.items()}, "raw_16bit_mean_kb": raw_kb}


def read_sizes(paths: Sequence[str | os.PathLike[str]]) -> dict:
    """Fold summaries (``robustness.json``) → mean kB over folds: ``raw_16bit`` and one entry per quality."""
    per_q: dict[str, list[float]] = {"raw_16bit": []}
    for p in paths:
        d = json.loads(Path(p).read_text())
        if d["raw_16bit_mean_kb"] is not None:
            per_q["raw_16bit"].append(d["raw_16bit_mean_kb"])
        for q, v in d["jpeg"].items():
            per_q.setdefault(q, []).append(v["mean_kb"])
    return {q: float(np.nanmean(v)) if v else None for q, v in per_q.items()}
