"""Virtual patients and cohorts on disk: DICOM CT series, DICOM DX radiographs, truth, samples sheet.

Layout under ``out_dir``::

    ct/{pid}/CT0001.dcm ...        DICOM CT series (HU, with phantom unless cfg phantom is False)
    xray/{pid}_{view}.dcm          DICOM DX radiograph per view
    labels/{pid}.nii.gz            bone label map, only for patients listed with labels in the sheet
    labels/structures.csv          its value → name table
    truth/{pid}.json               the record, derived truth (aBMD, vBMD, QCT, per-view ROIs and stats;
                                   ``l1_dxa_g_cm2``: L1's DRR averaged as DXA does, V3/V4/V18)
    truth/{pid}.npz                bone DRRs (g/cm²) per view, ``bone_drr_{view}`` (rows, cols) float32, and
                                   L1's alone, ``l1_drr_{view}`` (seed 004's ROI target)
    truth/labels_{base}[_e{seed}].nii.gz  label map of each base anatomy or elastic variant of it (the
                                   patients' CT grids; see truth/{pid}.json "labels")
    samples.tsv                    the samples sheet (paths relative to out_dir)
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

from bmdpipe import physics
from bmdpipe.io.atomic import atomic_path, write_json
from bmdpipe.simulate import render
from bmdpipe.simulate.base import BaseAnatomy, load_base, variant
from bmdpipe.simulate.defaults import fill_config
from bmdpipe.simulate.sampling import derive, sample_patient, t_score

#: Bump when a change alters the simulated files.
SIMULATOR_VERSION = "2"
#: Fixed study date of every simulated file (dates are not data here; fixed for reproducibility).
STUDY_DATE = "20260101"


# --------------------------------------------------------------------------- ids and records

def patient_ids(cfg: dict[str, Any]) -> list[str]:
    """``sim000``, ``sim001``, ... for ``cfg["n_patients"]`` patients."""
    n = int(cfg["n_patients"])
    return [patient_id(i, n) for i in range(n)]


def patient_id(index: int, n_patients: int) -> str:
    """Id of patient ``index`` in a cohort of ``n_patients``: ``sim`` + zero-padded index (≥ 3 digits)."""
    width = max(3, len(str(max(n_patients, index + 1) - 1)))
    return f"sim{index:0{width}d}"


def patient_record(cfg: dict[str, Any], index: int) -> dict[str, Any]:
    """The record of patient ``index``: :func:`sample_patient` on ``default_rng([seed, index])`` plus model settings."""
    cfg = fill_config(cfg) if "dxa_model" not in cfg else cfg
    record = sample_patient(np.random.default_rng([int(cfg["seed"]), int(index)]), cfg)
    record["patient_id"] = patient_id(index, int(cfg["n_patients"]))
    record["model"] = {
        "resolution": dict(cfg["resolution"]),
        "cross_calibration": cfg["dxa_model"]["cross_calibration"],
        "scale_range": list(cfg["scale_range"]),
        "t_score_reference": cfg["dxa_model"]["reference"],
        "simulator_version": SIMULATOR_VERSION,
    }
    return record


def _model_cfg(record: dict[str, Any]) -> dict[str, Any]:
    m = record["model"]
    return {"dxa_model": {"cross_calibration": m["cross_calibration"]}, "scale_range": m["scale_range"]}


# --------------------------------------------------------------------------- one patient

def render_patient(record: dict[str, Any], base: BaseAnatomy, *, device: str = "cpu",
                   trabecular_factor: float = 1.0, noise: bool = True, with_ct: bool = True,
                   on_ct: Callable[[np.ndarray, tuple[float, float, float]], None] | None = None) -> dict[str, Any]:
    """Everything of one patient in memory (no I/O): images, CT, truth.

    Args:
        record: from :func:`patient_record` / :func:`sample_patient` (+ ``model``).
        base: the record's base anatomy.
        device: torch device of rendering and detector physics.
        trabecular_factor, noise: validation experiments only (V7/V8): scale all trabecular
            mineral, switch quantum noise off.
        with_ct: also simulate the CT (and QCT calibration).
        on_ct: called with ``(hu, spacing)`` as soon as the CT exists, before the radiographs are
            rendered (lets a caller write the CT while the views render).

    Returns:
        ``views``: per view ``stored`` (uint16 (rows, cols)), ``bits``, ``photometric``,
        ``bone_drr`` (float32 (rows, cols), g/cm²), ``l1_drr`` (the same of L1's mineral alone; None
        without L1), ``soft`` (g/cm²), ``log``, ``processed``
        ((rows, cols) float32 in [0, 1]) and ``stats``; ``ct`` (HU (z, y, x) float32) and
        ``truth`` (JSON-ready dict).
    """
    import torch

    dev = torch.device(device)
    base = variant(base, record["habitus"].get("elastic"))
    derived = derive(record, base, _model_cfg(record))
    maps = render.patient_maps(record, base, derived["trabecular_scale"], trabecular_factor=trabecular_factor)
    res = record["model"]["resolution"]
    v2w = render.voxel_to_world(base, maps["spacing"])
    center = render._cached(base)["body_center_ijk"].copy()
    if maps["mirrored"]:
        center[0] = base.shape[2] - 1 - center[0]
    iso = v2w[:3, :3] @ center + v2w[:3, 3]
    truth = _truth(record, base, maps, derived)
    out: dict[str, Any] = {"truth": truth, "maps": maps}
    if with_ct:
        ct_out = render.ct_volume(record, base, maps)
        out["ct"] = ct_out["hu"]
        if on_ct is not None:
            on_ct(ct_out["hu"], maps["spacing"])
        if "rods" in ct_out and "roi_l1" in ct_out:
            cal = render.calibrate_qct(ct_out, base)
            cal["slope_true_hu_per_mg_cm3"] = physics.ha_slope(record["ct"]["energy_kev"])
            truth["qct"] = cal
    view_names = list(record["views"])
    cams = [render.view_camera(record["views"][v], res, iso, dev) for v in view_names]
    with torch.no_grad():
        a_w, a_ha = render.line_integrals(maps, base, cams, float(res["ray_step_mm"]), dev)
        # L1's mineral alone (seed 004's ROI target; its ROI mean is V4's estimate of the true aBMD)
        a_l1 = (render.vertebra_drr(maps, base, cams, float(res["ray_step_mm"]), dev, "L1")
                if "L1" in base.vertebrae else None)
        views: dict[str, Any] = {}
        for i, v in enumerate(view_names):
            view, cam = record["views"][v], cams[i]
            sig = render.detector_signal(a_w[i], a_ha[i], view, cam, noise=noise)
            processed = render.display_processing(sig["log"], view["display"], cam["pitch"])
            proc_np = processed.cpu().numpy().astype(np.float32)
            stored, bits, photometric = render.encode(proc_np, view["display"])
            boxes = render.roi_boxes(base, maps, cam)
            bone = a_ha[i].cpu().numpy().astype(np.float32)
            l1 = a_l1[i].cpu().numpy().astype(np.float32) if a_l1 is not None else None
            log = sig["log"].cpu().numpy()
            stats = _view_stats(sig, boxes, bone, log, stored, bits, photometric, view, l1)
            views[v] = {"stored": stored, "bits": bits, "photometric": photometric, "bone_drr": bone,
                        "l1_drr": l1, "soft": a_w[i].cpu().numpy().astype(np.float32), "log": log, "processed": proc_np,
                        "stats": stats, "geometry": _geometry(cam, iso)}

    out["views"] = views
    truth["views"] = {v: {"stats": views[v]["stats"], "geometry": views[v]["geometry"]} for v in view_names}
    truth["voxel_to_world_ras"] = v2w.tolist()
    return out


def _geometry(cam: dict[str, Any], iso: np.ndarray) -> dict[str, Any]:
    return {"sdd_mm": cam["sdd"], "sid_mm": cam["sid"], "pixel_spacing_mm": cam["pitch"],
            "shape_rows_cols": list(cam["shape"]), "isocenter_ras_mm": [float(v) for v in iso],
            "camera_to_world_ras": cam["rt_inv"][0].double().cpu().numpy().tolist(),
            "intrinsic": cam["k"].tolist()}


def _view_stats(sig: dict[str, Any], boxes: dict[str, list[int]], bone: np.ndarray, log: np.ndarray,
                stored: np.ndarray, bits: int, photometric: str, view: dict[str, Any],
                l1: np.ndarray | None = None) -> dict[str, Any]:
    spr = sig["spr"].cpu().numpy()
    rel = sig["relative"].cpu().numpy()
    n0 = view["acquisition"]["n0_native"]
    # processed image in MONOCHROME2 terms as a reader would see it, scaled to [0, 1]
    mono2 = stored.astype(np.float64) / (2**bits - 1)
    if view["display"]["monochrome1"]:
        mono2 = 1.0 - mono2
    stats: dict[str, Any] = {"roi_boxes": boxes}
    for name, box in boxes.items():
        stats[name] = {
            "bone_drr_mean_g_cm2": render.roi_mean(bone, box),
            "log_mean": render.roi_mean(log, box),
            "processed_mean": render.roi_mean(mono2, box),
            "spr": render.roi_mean(spr, box),
            "quanta_native_pixel": n0 * render.roi_mean(rel, box),
        }
    if l1 is not None and "L1" in boxes:
        stats["L1"]["l1_drr_mean_g_cm2"] = render.roi_mean(l1, boxes["L1"])
        stats["L1"]["l1_dxa_g_cm2"] = render.dxa_mean(l1, boxes["L1_body"])
    return stats


def _truth(record: dict[str, Any], base: BaseAnatomy, maps: dict[str, Any], derived: dict[str, Any]) -> dict[str, Any]:
    """True aBMD (from the patient's own map), vBMD, T-scores, clinical labels per vertebra."""
    verts: dict[str, Any] = {}
    k = record["habitus"]["body_scale"]
    rh = maps["rho_ha"]
    for vi, v in enumerate(base.vertebrae):
        roi = maps["qct_roi"] == vi + 1
        vmask = maps["vert_index"] == vi + 1
        z0, z1, x0, x1 = base.meta["vertebrae"][v]["body_box_zx"]
        if maps["mirrored"]:
            nx = base.shape[2]
            x0, x1 = nx - x1, nx - x0
        proj = (rh * vmask).sum(axis=1)[z0:z1, x0:x1] * (base.spacing[1] / 10.0) * k
        sel = proj > 0.05
        area = float(sel.sum()) * base.dxa_pixel_cm2 * k * k
        abmd = float(proj[sel].mean()) if sel.any() else 0.0
        dxa = record["dxa_g_cm2"][v]
        verts[v] = {
            "dxa_g_cm2": dxa,
            "t_score": t_score(dxa, v, record["sex"], record["model"]["t_score_reference"]) if v in ("T12", "L1", "L2", "L3", "L4") else None,
            "abmd_true_g_cm2": abmd,
            "abmd_target_g_cm2": derived["abmd_target"][v],
            "bmc_g": abmd * area,
            "area_cm2": area,
            "vbmd_true_mg_cm3": float(rh[roi].mean() * 1000.0),
            "trabecular_scale": derived["trabecular_scale"][v],
            "scale_clipped": derived["scale_clipped"][v],
            "truncated_in_base": base.meta["vertebrae"][v]["truncated"],
        }
    return {"vertebrae": verts}


def simulate_patient(record: dict[str, Any], base: BaseAnatomy, out_dir: str | os.PathLike[str],
                     *, device: str = "cpu") -> dict[str, Any]:
    """Simulate one patient from its record and write its files under ``out_dir`` (layout: module docstring).

    Deterministic: the same record gives byte-identical files (UIDs included).

    Returns:
        The truth dict written to ``truth/{pid}.json``.
    """
    import SimpleITK as sitk

    from bmdpipe.io.dicom_write import seeded_uids, write_ct_series, write_radiograph

    out = Path(out_dir)
    pid = record["patient_id"]
    t0 = time.perf_counter()
    identity = {"StudyDate": STUDY_DATE, **record.get("identity", {})}
    writer: dict[str, Any] = {}

    def ct_image(hu: np.ndarray, spacing: tuple[float, float, float]):
        img = sitk.GetImageFromArray(hu)
        img.SetSpacing(spacing)
        img.SetOrigin(base.origin)
        img.SetDirection(base.direction)
        return img

    def write_ct(img) -> None:
        try:
            write_ct_series(img, out / "ct" / pid, identity=identity, series_description="CHEST",
                            kvp=record["ct"]["kvp"], uid=seeded_uids(f"{namespace}-ct"))
        except BaseException as exc:  # re-raised in the caller's thread
            writer["error"] = exc

    def start_ct_writer(hu: np.ndarray, spacing: tuple[float, float, float]) -> None:
        # the DICOM writer is pure Python; torch rendering releases the GIL: overlap them
        writer["image"] = ct_image(hu, spacing)
        writer["thread"] = threading.Thread(target=write_ct, args=(writer["image"],), daemon=True)
        writer["thread"].start()

    # UIDs are a function of the record: the same record gives byte-identical files
    namespace = f"bmdpipe-sim-{SIMULATOR_VERSION}-{pid}-{record['base']}-{_record_digest(record)}"
    xray_uid = seeded_uids(f"{namespace}-xray")
    try:
        sim = render_patient(record, base, device=device, on_ct=start_ct_writer)
    finally:
        if "thread" in writer:
            writer["thread"].join()
    if "error" in writer:
        raise writer["error"]
    img = writer["image"]
    spacing = sim["maps"]["spacing"]
    for v, res in sim["views"].items():
        view = record["views"][v]
        geo = res["geometry"]
        write_radiograph(
            res["stored"], out / "xray" / f"{pid}_{v}.dcm",
            pixel_spacing_mm=(geo["pixel_spacing_mm"], geo["pixel_spacing_mm"]),
            sdd_mm=geo["sdd_mm"], sid_mm=geo["sid_mm"], identity=identity,
            photometric=res["photometric"], bits_stored=res["bits"], kvp=view["acquisition"]["kvp"],
            view_position="PA", extra={"BodyPartExamined": "CHEST"}, uid=xray_uid,
        )
    maps = sim["maps"]
    anat = variant(base, record["habitus"].get("elastic"))
    elastic = anat.meta.get("elastic")
    base_labels = out / "truth" / (f"labels_{base.name}_e{elastic['seed']}.nii.gz" if elastic
                                   else f"labels_{base.name}.nii.gz")
    if not base_labels.exists():  # once per base: every patient's label map is this array on its CT grid
        ref = sitk.GetImageFromArray(np.ascontiguousarray(anat.labels))
        ref.SetSpacing(base.spacing)
        ref.SetOrigin(base.origin)
        ref.SetDirection(base.direction)
        with atomic_path(base_labels) as tmp:
            sitk.WriteImage(ref, str(tmp), useCompression=True)
    if record["labels_in_sheet"]:
        lab_img = sitk.GetImageFromArray(np.ascontiguousarray(maps["labels"]))
        lab_img.CopyInformation(img)
        with atomic_path(out / "labels" / f"{pid}.nii.gz") as tmp:
            sitk.WriteImage(lab_img, str(tmp), useCompression=True)
        _write_label_table(base, out / "labels" / "structures.csv")
    with atomic_path(out / "truth" / f"{pid}.npz") as tmp:
        with open(tmp, "wb") as fh:
            arrays = {f"bone_drr_{v}": r["bone_drr"] for v, r in sim["views"].items()}
            arrays.update({f"l1_drr_{v}": r["l1_drr"] for v, r in sim["views"].items() if r["l1_drr"] is not None})
            np.savez_compressed(fh, **arrays)
    sim["truth"]["labels"] = {
        "file": f"truth/{base_labels.name}",
        "note": "the patient's label map is this array (the base anatomy or its elastic variant; mirrored "
                "along x when mirrored is true) on the patient's CT grid (spacing × body_scale)",
        "mirrored": bool(maps["mirrored"]), "ct_spacing_mm": list(spacing),
        "elastic_mm": float(elastic["max_mm"]) if elastic else 0.0,
    }
    truth = {"record": record, **sim["truth"], "simulator_version": SIMULATOR_VERSION,
             "seconds": round(time.perf_counter() - t0, 3)}
    write_json(out / "truth" / f"{pid}.json", _without_timing(truth))
    return truth


def _without_timing(truth: dict[str, Any]) -> dict[str, Any]:
    # wall time differs between runs: keep the truth file byte-identical
    return {k: v for k, v in truth.items() if k != "seconds"}


def _record_digest(record: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _write_label_table(base: BaseAnatomy, path: Path) -> None:
    if path.exists():
        return
    df = pd.DataFrame({"id": list(base.label_table), "structure": list(base.label_table.values())})
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


# --------------------------------------------------------------------------- cohort

def _bases(cfg: dict[str, Any]) -> dict[str, BaseAnatomy]:
    physics.set_cache_dir(cfg["cache_dir"])
    return {str(b.get("name", "base")): load_base(b, ct_downsample=int(cfg["resolution"]["ct_downsample"]),
                                                  vertebrae=list(cfg["vertebrae"]), cache_dir=cfg["cache_dir"])
            for b in cfg["bases"]}


def _sheet_rows(record: dict[str, Any], root: Path, qct: float | None) -> list[dict[str, Any]]:
    pid = record["patient_id"]
    rows = []
    for v in record["views"]:
        row: dict[str, Any] = {"patient_id": pid, "view": v, "xray": str(root / "xray" / f"{pid}_{v}.dcm"),
                               "ct": str(root / "ct" / pid)}
        if record["labels_in_sheet"]:
            row["ct_labels"] = str(root / "labels" / f"{pid}.nii.gz")
            row["label_table"] = str(root / "labels" / "structures.csv")
        for vert in record["vertebrae"]:
            row[f"dxa_{vert}"] = round(record["dxa_g_cm2"][vert], 4)
        if qct is not None:
            row["qct_L1"] = round(qct, 2)
        row["age"] = record["age"]
        row["sex"] = record["sex"]
        rows.append(row)
    return rows


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    first = ["patient_id", "view", "xray", "ct", "ct_labels", "label_table"]
    cols = [c for c in first if c in df.columns] + [c for c in df.columns if c not in first]
    return df[cols]


def expected_sheet(out_dir: str | os.PathLike[str], cfg: dict[str, Any] | None = None) -> pd.DataFrame:
    """The samples-sheet rows :func:`simulate_cohort` will write, with absolute paths; writes nothing.

    Cheap (records only, no base anatomy, no rendering), so a workflow can
    build its DAG before the files exist. The CT-measured ``qct_L1`` column
    exists only after simulation (it is measured on the simulated CT) and is
    therefore absent here; every other column equals ``samples.tsv``.
    """
    cfg = fill_config(cfg)
    root = Path(out_dir).resolve()
    rows: list[dict[str, Any]] = []
    for i in range(int(cfg["n_patients"])):
        rows += _sheet_rows(patient_record(cfg, i), root, None)
    return _frame(rows)


def simulate_cohort(out_dir: str | os.PathLike[str], cfg: dict[str, Any] | None = None) -> Path:
    """Simulate every patient of ``cfg`` under ``out_dir`` and write ``samples.tsv``; return its path.

    Same ``cfg`` (seed) → byte-identical files.
    """
    cfg = fill_config(cfg)
    root = Path(out_dir)
    bases = _bases(cfg)
    rows: list[dict[str, Any]] = []
    with torch_threads(cfg["torch_threads"]):
        for i in range(int(cfg["n_patients"])):
            record = patient_record(cfg, i)
            truth = simulate_patient(record, bases[record["base"]], root, device=cfg["device"])
            rows += _sheet_rows(record, root.resolve(), _qct_value(truth))
    return write_sheet(root, rows)


def simulate_one(out_dir: str | os.PathLike[str], cfg: dict[str, Any] | None, patient: str | int) -> dict[str, Any]:
    """Simulate one patient of the cohort (by id ``simNNN`` or index) under ``out_dir``: a per-patient shard.

    Writes the same files as :func:`simulate_cohort` does for that patient, but not
    ``samples.tsv`` (see :func:`collect_sheet`). Returns the truth dict.
    """
    cfg = fill_config(cfg)
    ids = patient_ids(cfg)
    index = ids.index(patient) if isinstance(patient, str) else int(patient)
    record = patient_record(cfg, index)
    spec = next(b for b in cfg["bases"] if str(b.get("name", "base")) == record["base"])
    physics.set_cache_dir(cfg["cache_dir"])
    base = load_base(spec, ct_downsample=int(cfg["resolution"]["ct_downsample"]), vertebrae=list(cfg["vertebrae"]),
                     cache_dir=cfg["cache_dir"])
    with torch_threads(cfg["torch_threads"]):
        return simulate_patient(record, base, out_dir, device=cfg["device"])


def collect_sheet(out_dir: str | os.PathLike[str], cfg: dict[str, Any] | None = None) -> Path:
    """Write ``samples.tsv`` from the truth files of shards made by :func:`simulate_one`; return its path."""
    cfg = fill_config(cfg)
    root = Path(out_dir)
    rows: list[dict[str, Any]] = []
    for i in range(int(cfg["n_patients"])):
        record = patient_record(cfg, i)
        truth = json.loads((root / "truth" / f"{record['patient_id']}.json").read_text())
        rows += _sheet_rows(record, root.resolve(), _qct_value(truth))
    return write_sheet(root, rows)


def _qct_value(truth: dict[str, Any]) -> float | None:
    qct = truth.get("qct", {}).get("vbmd_l1_mg_cm3")
    return qct if qct is not None and qct > 0 else None


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count for the duration (None: unchanged)."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_sheet(out_dir: str | os.PathLike[str], rows: list[dict[str, Any]]) -> Path:
    """Write ``samples.tsv`` under ``out_dir`` with paths relative to it."""
    root = Path(out_dir)
    df = _frame(rows)
    for col in ("xray", "ct", "ct_labels", "label_table"):
        if col in df.columns:
            df[col] = [os.path.relpath(p, root.resolve()) if isinstance(p, str) else p for p in df[col]]
    path = root / "samples.tsv"
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False)
    return path
