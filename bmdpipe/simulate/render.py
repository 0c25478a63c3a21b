"""Forward model of one virtual patient: material maps → radiographs, bone DRRs, CT (SIMULATOR.md §2, §4, §1.4).

All functions are deterministic given a record (random fields come from
numpy generators seeded by the record). Heavy array work runs in torch on
``device`` (one code path for CPU and CUDA); the noise fields are drawn with
numpy so that CPU and GPU runs see the same noise.

Conventions: volumes are ``(z, y, x)`` numpy arrays (base-anatomy layout);
the rendering world is RAS in mm (nanodrr's convention, pinned by a test);
radiographs are ``(rows, cols)`` with row 0 at the top (head) and the
patient's right on the viewer's left (PA display convention).
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from bmdpipe import physics
from bmdpipe.simulate.base import DXA_EDGE_G_CM2, LUNG_STRUCTURES, MAX_FAT_MM, BaseAnatomy, dxa_abmd

#: Open-field log threshold separating body from direct exposure in display processing.
BODY_LOG_THRESHOLD = 0.15
#: Phantom geometry (SIMULATOR.md §1.1 [unverified]: 15 mm rods, 40 mm apart, 34 mm water slab).
PHANTOM_RODS_MG_CM3 = (0.0, 50.0, 100.0, 150.0, 200.0)
PHANTOM_ROD_DIAMETER_MM = 15.0
PHANTOM_ROD_PITCH_MM = 40.0
PHANTOM_SLAB_MM = 34.0
PHANTOM_SLAB_WIDTH_MM = 200.0
PHANTOM_GAP_MM = 2.0
#: Rod masks are eroded by this much before measuring (SIMULATOR.md §1.4 step 3): > 1 voxel of
#: the demo CT, so no partial volume with the slab.
PHANTOM_ROD_EROSION_MM = 2.0
#: Correlation of CT noise, Gaussian σ in voxels, in-plane (SIMULATOR.md §1.4).
CT_NOISE_CORRELATION_VOXELS = 0.8
#: ROI half-size on the detector for lung and mediastinum, mm.
ROI_HALF_MM = 12.0
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])


# --------------------------------------------------------------------------- base caches

def _cached(base: BaseAnatomy) -> dict[str, Any]:
    """Index arrays derived once per base (kept on the object)."""
    cache = getattr(base, "_render_cache", None)
    if cache is not None:
        return cache
    flat_vi = base.vert_index.ravel()
    flat_trab = base.trabecular.ravel()
    trab_idx, cort_idx = [], []
    for vi in range(len(base.vertebrae)):
        in_v = flat_vi == vi + 1
        trab_idx.append(np.flatnonzero(in_v & flat_trab))
        cort_idx.append(np.flatnonzero(in_v & ~flat_trab))
    d_out = base.dist_out.ravel().astype(np.float32)
    out_idx = np.flatnonzero((d_out > 0) & (d_out < MAX_FAT_MM))
    out_idx = out_idx[np.argsort(d_out[out_idx], kind="stable")]
    d_in = base.dist_in.ravel().astype(np.float32)
    soft_body = base.body.ravel() & ~base.bone.ravel()
    in_idx = np.flatnonzero(soft_body & (d_in <= 12.0))
    in_idx = in_idx[np.argsort(d_in[in_idx], kind="stable")]
    # crop box for rendering: body grown by the largest fat layer
    grown = base.dist_out < MAX_FAT_MM
    zz = np.flatnonzero(grown.any(axis=(1, 2)))
    yy = np.flatnonzero(grown.any(axis=(0, 2)))
    xx = np.flatnonzero(grown.any(axis=(0, 1)))
    zb, yb, xb = np.nonzero(base.body[:, :, :])
    cache = {
        "trab_idx": trab_idx, "cort_idx": cort_idx,
        "out_idx": out_idx, "out_d": d_out[out_idx], "in_idx": in_idx, "in_d": d_in[in_idx],
        "soft_mask": soft_body.reshape(base.shape),
        "crop": (slice(zz[0], zz[-1] + 1), slice(yy[0], yy[-1] + 1), slice(xx[0], xx[-1] + 1)),
        "body_box": (slice(zb.min(), zb.max() + 1), slice(yb.min(), yb.max() + 1), slice(xb.min(), xb.max() + 1)),
        "body_center_ijk": np.array([(xb.min() + xb.max()) / 2, (yb.min() + yb.max()) / 2,
                                     (zb.min() + zb.max()) / 2]),
        "roi_points": _roi_points(base),
    }
    cache["muscle_fraction"] = base.muscle_fraction.astype(np.float32) / np.float32(255.0)
    cache["trab_all_idx"] = np.flatnonzero(flat_trab)
    cache["bone_idx"] = np.flatnonzero(base.bone.ravel())  # the only voxels with rho_ha > 0
    base._render_cache = cache  # type: ignore[attr-defined]
    return cache


def _mirror_flat(idx: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Flat indices of voxels after mirroring the volume along x."""
    nx = shape[2]
    return idx - idx % nx + (nx - 1 - idx % nx)


def _roi_points(base: BaseAnatomy) -> dict[str, np.ndarray]:
    """Voxel coordinates (i, j, k) = (x, y, z) of ROI anchors.

    ``L1``: the L1 QCT ROI voxels; ``L1_body``: the four corners of L1's DXA box (the body's
    extent in x and z, SIMULATOR.md §3.1) in the coronal plane through the body's centre;
    lung and heart centroids.
    """
    pts: dict[str, np.ndarray] = {}
    if "L1" in base.vertebrae:
        k, j, i = np.nonzero(base.qct_roi == base.vertebrae.index("L1") + 1)
        pts["L1"] = np.stack([i, j, k], axis=1).astype(np.float64)
        z0, z1, x0, x1 = base.meta["vertebrae"]["L1"]["body_box_zx"]
        pts["L1_body"] = np.array([[x, j.mean(), z] for x in (x0 - 0.5, x1 - 0.5) for z in (z0 - 0.5, z1 - 0.5)])
    for name, structs in (("lung_right", [s for s in LUNG_STRUCTURES if s.endswith("right")]),
                          ("lung_left", [s for s in LUNG_STRUCTURES if s.endswith("left")]),
                          ("mediastinum", ["heart"])):
        ids = base.label_ids(*structs)
        if ids:
            k, j, i = np.nonzero(np.isin(base.labels, ids))
            if len(i):
                pts[name] = np.array([[i.mean(), j.mean(), k.mean()]])
    return pts


# --------------------------------------------------------------------------- patient maps

def patient_maps(record: dict[str, Any], base: BaseAnatomy, scales: dict[str, float],
                 *, trabecular_factor: float = 1.0) -> dict[str, Any]:
    """Material maps of the patient on the base grid (SIMULATOR.md §2.2, §4.7).

    Args:
        record: the patient record (:func:`bmdpipe.simulate.sample_patient`).
        base: its base anatomy.
        scales: trabecular scale s per vertebra (from :func:`bmdpipe.simulate.sampling.derive`).
        trabecular_factor: extra factor on every s (validation experiments V7/V8 only).

    Returns:
        ``rho_w``, ``rho_ha`` (float32 ``(z, y, x)``, g/cm³), ``spacing`` ((x, y, z) mm, × body scale),
        ``mirrored``, ``fat_mm``; the patient's anatomy arrays on the same grid (``labels``,
        ``vert_index``, ``qct_roi``, ``trabecular``, ``muscle_fraction``: the base's, mirrored
        like the maps). ``base`` is the record's anatomy variant (:func:`bmdpipe.simulate.base.variant`).
    """
    c = _cached(base)
    rw = base.rho_w.copy().ravel()
    rh = base.rho_ha.copy().ravel()
    coupling = record["cortex"]["coupling"]
    for vi, v in enumerate(base.vertebrae):
        s = scales[v] * trabecular_factor
        e = record["cortex"]["factor"][v]
        for idx, factor in ((c["trab_idx"][vi], s), (c["cort_idx"][vi], (1.0 - coupling * (1.0 - s)) * e)):
            old = rh[idx]
            new = (old * np.float32(factor)).astype(np.float32)
            rh[idx] = new
            rw[idx] += (old - new) / np.float32(physics.HA_DENSITY)  # mineral volume ↔ marrow (§2.2)
    hab = record["habitus"]
    rw = rw.reshape(base.shape)
    rw[c["soft_mask"]] *= np.float32(hab["soft_density_scale"])
    rw = rw.ravel()
    t = hab["fat_mm"]
    if t > 0:
        n = int(np.searchsorted(c["out_d"], t, side="right"))
        rw[c["out_idx"][:n]] = np.float32(physics.FAT_LAYER_DENSITY)
    elif t < 0:
        n = int(np.searchsorted(c["in_d"], -t, side="right"))
        rw[c["in_idx"][:n]] = 0.0
    rw = rw.reshape(base.shape)
    rh = rh.reshape(base.shape)
    anatomy = {"labels": base.labels, "vert_index": base.vert_index, "qct_roi": base.qct_roi,
               "trabecular": base.trabecular, "muscle_fraction": c["muscle_fraction"]}
    if hab["mirrored"]:
        rw = np.ascontiguousarray(rw[:, :, ::-1])
        rh = np.ascontiguousarray(rh[:, :, ::-1])
        anatomy = {k: v[:, :, ::-1] for k, v in anatomy.items()}
    k = hab["body_scale"]
    spacing = tuple(k * s for s in base.spacing)
    return {"rho_w": rw, "rho_ha": rh, "spacing": spacing, "mirrored": hab["mirrored"], "fat_mm": t, **anatomy}


def render_crop(base: BaseAnatomy, maps: dict[str, Any]) -> tuple[slice, slice, slice]:
    """Bounding box (z, y, x slices, unmirrored base indices) of the patient: body grown by the fat layer."""
    c = _cached(base)
    grow = max(0.0, float(maps.get("fat_mm", MAX_FAT_MM)))
    box = []
    for axis, (sl, size) in enumerate(zip(c["body_box"], base.shape)):
        sp = base.spacing[2 - axis]
        g = int(math.ceil(grow / sp)) + 1
        box.append(slice(max(0, sl.start - g), min(size, sl.stop + g)))
    return tuple(box)  # type: ignore[return-value]


def voxel_to_world(base: BaseAnatomy, spacing: tuple[float, float, float]) -> np.ndarray:
    """(4, 4) affine from voxel (i, j, k) = (x, y, z index) to RAS world, mm."""
    dmat = np.array(base.direction, dtype=np.float64).reshape(3, 3)
    a = np.eye(4)
    a[:3, :3] = RAS_FROM_LPS @ dmat @ np.diag(spacing)
    a[:3, 3] = RAS_FROM_LPS @ np.array(base.origin, dtype=np.float64)
    return a


# --------------------------------------------------------------------------- cameras and rendering

def view_camera(view: dict[str, Any], resolution: dict[str, Any], isocenter: np.ndarray,
                device: torch.device) -> dict[str, Any]:
    """nanodrr camera of one view: ``k_inv`` (1, 3, 3), ``rt_inv`` (1, 4, 4), ``k`` (3, 3), geometry numbers.

    PA: source posterior, detector anterior, ZXY Euler angles = (axial
    rotation, cranio-caudal tilt, in-plane roll) in degrees about the
    patient's isocentre; shifts move the camera in its own frame (mm).
    """
    from nanodrr.camera import make_k_inv, make_rt_inv

    acq, pose = view["acquisition"], view["pose"]
    rows, cols = (int(v) for v in resolution["detector_shape"])
    pitch = float(resolution["detector_pitch_mm"])
    sdd = float(acq["sdd_mm"])
    sid = sdd - float(acq["object_detector_mm"])
    k_inv = make_k_inv(sdd, pitch, pitch, 0.0, 0.0, rows, cols, dtype=torch.float32, device=device)
    rot = torch.tensor([[pose["rotation_deg"], pose["tilt_deg"], pose["roll_deg"]]], dtype=torch.float32,
                       device=device)
    trans = torch.tensor([[pose["shift_x_mm"], -sid, pose["shift_z_mm"]]], dtype=torch.float32, device=device)
    iso = torch.tensor(isocenter, dtype=torch.float32, device=device)
    rt_inv = make_rt_inv(rot, trans, "PA", iso)
    k = np.linalg.inv(k_inv[0].double().cpu().numpy())
    return {"k_inv": k_inv, "rt_inv": rt_inv, "k": k, "sdd": sdd, "sid": sid, "pitch": pitch, "shape": (rows, cols)}


def batched_drr(cams: list[dict[str, Any]], device: torch.device):
    """One nanodrr DRR module rendering all views at once (per-view intrinsics, batch B = views)."""
    from nanodrr.drr import DRR

    k_inv = torch.cat([cam["k_inv"] for cam in cams], dim=0)
    sdd = torch.tensor([cam["sdd"] for cam in cams], dtype=torch.float32)
    rows, cols = cams[0]["shape"]
    return DRR(k_inv.to(device), sdd.to(device), rows, cols)


def project_points(world_pts: np.ndarray, cam: dict[str, Any]) -> np.ndarray:
    """Detector (row, col) of RAS world points (n, 3), pixel-centre coordinates, shape (n, 2)."""
    rt_inv = cam["rt_inv"][0].double().cpu().numpy()
    w2c = np.linalg.inv(rt_inv)
    pc = (w2c[:3, :3] @ world_pts.T + w2c[:3, 3:4]).T
    uvw = (cam["k"] @ pc.T).T
    u = uvw[:, 0] / uvw[:, 2] - 0.5
    v = uvw[:, 1] / uvw[:, 2] - 0.5
    return np.stack([v, u], axis=1)


def line_integrals(maps: dict[str, Any], base: BaseAnatomy, cams: list[dict[str, Any]], step_mm: float,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cone-beam line integrals of both materials with nanodrr, g/cm², each (V, rows, cols)."""
    crop = render_crop(base, maps)
    if maps["mirrored"]:
        nx = base.shape[2]
        crop = (crop[0], crop[1], slice(nx - crop[2].stop, nx - crop[2].start))
    a_w, a_ha = _project([maps["rho_w"][crop], maps["rho_ha"][crop]], crop, base, maps, cams, step_mm, device)
    return a_w, a_ha


def vertebra_drr(maps: dict[str, Any], base: BaseAnatomy, cams: list[dict[str, Any]], step_mm: float,
                 device: torch.device, vertebra: str = "L1") -> torch.Tensor:
    """Cone-beam line integrals of one vertebra's mineral alone, g/cm² HA, (V, rows, cols).

    The projection of the (dilated) vertebra label that defines its true aBMD (SIMULATOR.md §3.1),
    in the pose of each view: seed 004's ROI target, without the neighbours' bone (T12's
    posterior elements overlap L1's body in an AP view). Rendered from a crop around the vertebra,
    so it costs a small fraction of :func:`line_integrals`.
    """
    vmask = maps["vert_index"] == base.vertebrae.index(vertebra) + 1
    idx = np.nonzero(vmask)
    # 2 voxels of margin: the sampler interpolates across the mask's border
    crop = tuple(slice(max(0, int(i.min()) - 2), min(n, int(i.max()) + 3)) for i, n in zip(idx, vmask.shape))
    vol = np.where(vmask[crop], maps["rho_ha"][crop], np.float32(0.0)).astype(np.float32)
    return _project([vol], crop, base, maps, cams, step_mm, device)[0]


def _project(volumes: list[np.ndarray], crop: tuple[slice, slice, slice], base: BaseAnatomy,
             maps: dict[str, Any], cams: list[dict[str, Any]], step_mm: float,
             device: torch.device) -> list[torch.Tensor]:
    """nanodrr line integrals (g/cm², each (V, rows, cols)) of density volumes (g/cm³, (z, y, x)).

    ``crop``: where the volumes lie in the patient's (mirrored, if so) map grid, z, y, x slices.
    """
    from nanodrr.data import Subject

    offset = np.array([crop[2].start, crop[1].start, crop[0].start], dtype=np.float64)
    v2w = voxel_to_world(base, maps["spacing"])
    v2w_crop = v2w.copy()
    v2w_crop[:3, 3] = v2w[:3, :3] @ offset + v2w[:3, 3]
    v2w_t = torch.tensor(v2w_crop, dtype=torch.float64)
    w2v = torch.linalg.inv(v2w_t).to(torch.float32)
    v2w_t = v2w_t.to(torch.float32)
    rt_inv = torch.cat([cam["rt_inv"] for cam in cams], dim=0)
    drr = batched_drr(cams, device)
    out = []
    extent = np.array(volumes[0].shape[::-1]) * np.array(maps["spacing"])
    # rays run close to the AP (y) axis: the clipped ray length is about the y extent (pose ≤ 5°, cone ≤ 7°)
    n_samples = int(math.ceil(1.05 * float(extent[1]) / step_mm))
    for arr in volumes:
        vol = torch.from_numpy(np.ascontiguousarray(arr)).to(device)[None, None]
        label = torch.zeros((1, 1, 1, 1, 1), dtype=torch.float32, device=device).expand_as(vol)
        subj = Subject(vol, label, v2w_t.to(device), w2v.to(device), Subject._make_voxel_to_grid(vol.shape).to(device),
                       torch.zeros(3, device=device), max_label=0, convert_to_mu=False)
        img = drr(subj, rt_inv, n_samples=n_samples)  # (V, 1, rows, cols), g/cm³·mm
        out.append(img[:, 0] * 0.1)
    return out


def gaussian_blur(img: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Gaussian blur of (..., H, W) with reflect boundaries; σ in pixels.

    Written as two small matrix products, ``G_H @ img @ G_Wᵀ`` (exact, any σ,
    same code on CPU and CUDA; faster than conv2d for these image sizes).
    """
    if sigma_px < 0.05:
        return img
    h, w = img.shape[-2:]
    gh = _blur_matrix(h, sigma_px, img.device, img.dtype)
    gw = _blur_matrix(w, sigma_px, img.device, img.dtype)
    return gh @ img @ gw.T


def _blur_matrix(n: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n, n) matrix of a 1-D Gaussian blur with reflect boundaries (period 2(n − 1))."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    k = torch.arange(-radius, radius + 1, device=device)
    wts = torch.exp(-0.5 * (k.to(dtype) / sigma) ** 2)
    wts = wts / wts.sum()
    idx = torch.arange(n, device=device)[:, None] + k[None, :]
    if n > 1:
        period = 2 * (n - 1)
        idx = torch.remainder(idx, period)
        idx = torch.where(idx >= n, period - idx, idx)
    else:
        idx = torch.zeros_like(idx)
    mat = torch.zeros((n, n), device=device, dtype=dtype)
    mat.scatter_add_(1, idx, wts.expand(n, -1).contiguous())
    return mat


def detector_signal(a_w: torch.Tensor, a_ha: torch.Tensor, view: dict[str, Any], cam: dict[str, Any],
                    *, noise: bool = True) -> dict[str, torch.Tensor]:
    """Polychromatic signal, scatter, quantum noise and blur of one view (SIMULATOR.md §4.3–4.5).

    Args:
        a_w, a_ha: (rows, cols) line integrals of water-equivalent tissue and HA, g/cm².

    Returns:
        ``primary`` (energy-weighted transmission relative to the open field),
        ``scatter`` (same unit), ``relative`` ((P+S) at the detector relative to
        the open field behind the grid), ``spr``, ``intensity`` (after noise and
        blur) and ``log`` = −ln(intensity); all (rows, cols) float32.
    """
    acq = view["acquisition"]
    dev = a_w.device
    bw = physics.beam_weights(acq["kvp"], acq["al_mm"], acq["cu_mm"])
    t = {k: torch.tensor(v, dtype=torch.float32, device=dev) for k, v in bw.items()}
    att = torch.exp(-(a_w[..., None] * t["mu_water"] + a_ha[..., None] * t["mu_ha"]))  # (H, W, nE)
    primary = att @ t["w_energy"]
    rows = primary.shape[0]
    heel = 1.0 + acq["heel"] * torch.linspace(-1.0, 1.0, rows, device=dev)[:, None]
    primary = primary * heel
    tau = a_w + 2.0 * a_ha  # water-equivalent path, cm (SIMULATOR.md §4.4)
    scatter = acq["scatter_k"] * gaussian_blur(primary * tau, acq["scatter_sigma_mm"] / cam["pitch"])
    if acq["grid"]:
        tp, ts = physics.GRID_PRIMARY_TRANSMISSION, physics.GRID_SCATTER_TRANSMISSION
    else:
        tp, ts = 1.0, 1.0
    relative = (tp * primary + ts * scatter) / tp
    spr = (ts * scatter) / (tp * primary).clamp_min(1e-12)
    n0 = acq["n0_native"] * (cam["pitch"] / physics.NATIVE_PITCH_MM) ** 2  # quanta per output pixel, open field
    if noise:
        xi = np.random.default_rng(acq["noise_seed"]).standard_normal(relative.shape).astype(np.float32)
        quanta = n0 * relative
        intensity = (quanta + torch.sqrt(quanta) * physics.SWANK * torch.from_numpy(xi).to(dev)) / n0
    else:
        intensity = relative
    magnification = cam["sdd"] / cam["sid"]
    focal = acq["focal_spot_mm"] * (magnification - 1.0) / 2.355  # FWHM → σ at the detector
    sigma_mm = math.sqrt(acq["detector_sigma_mm"] ** 2 + focal**2)
    intensity = gaussian_blur(intensity, sigma_mm / cam["pitch"])
    log = -torch.log(intensity.clamp_min(1e-6))
    return {"primary": primary, "scatter": scatter, "relative": relative, "spr": spr, "intensity": intensity,
            "log": log, "n0_pixel": torch.tensor(n0)}


def display_processing(log: torch.Tensor, disp: dict[str, Any], pitch_mm: float) -> torch.Tensor:
    """Vendor-like processing of a log image (SIMULATOR.md §4.6 steps 1–3) → values in [0, 1], MONOCHROME2."""
    body = log > BODY_LOG_THRESHOLD
    vals = log[body] if int(body.sum()) > 100 else log.reshape(-1)
    q = torch.quantile(vals.double(), torch.tensor([disp["p_lo"] / 100.0, disp["p_hi"] / 100.0],
                                                   dtype=torch.float64, device=log.device)).float()
    x = (log - q[0]) / (q[1] - q[0]).clamp_min(1e-6)
    low = gaussian_blur(x, disp["drc_sigma_mm"] / pitch_mm)
    fine = x - gaussian_blur(x, max(1.0, 2.0 / pitch_mm))
    m = x[body].mean() if int(body.sum()) > 100 else x.mean()
    a = disp["drc_alpha"]
    x = m + (1.0 - a) * (low - m) + (x - low) + disp["detail_beta"] * fine

    def tone(v: torch.Tensor | float) -> torch.Tensor:
        return torch.sigmoid(disp["tone_gain"] * (torch.as_tensor(v, device=log.device) - disp["tone_center"])
                             / disp["tone_width"])

    y = (tone(x) - tone(0.0)) / (tone(1.0) - tone(0.0))
    return y.clamp(0.0, 1.0) ** disp["gamma"]


def encode(y: np.ndarray, disp: dict[str, Any]) -> tuple[np.ndarray, int, str]:
    """Quantise (12-bit lossless or 8-bit JPEG round trip), photometric inversion (§4.6 steps 4–6).

    Returns:
        ``(stored, bits_stored, photometric)``; ``stored`` is uint16 (rows, cols).
    """
    if disp["jpeg_quality"] is None:
        bits = 12
        v = np.rint(y * 4095.0).astype(np.uint16)
    else:
        from PIL import Image

        bits = 8
        v8 = np.rint(y * 255.0).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(v8).save(buf, format="JPEG", quality=int(disp["jpeg_quality"]))
        buf.seek(0)
        with Image.open(buf) as im:
            v = np.asarray(im.convert("L")).astype(np.uint16)
    photometric = "MONOCHROME2"
    if disp["monochrome1"]:
        v = (2**bits - 1 - v).astype(np.uint16)
        photometric = "MONOCHROME1"
    if disp["mislabel_photometric"]:
        photometric = "MONOCHROME2" if photometric == "MONOCHROME1" else "MONOCHROME1"
    return v, bits, photometric


def roi_boxes(base: BaseAnatomy, maps: dict[str, Any], cam: dict[str, Any]) -> dict[str, list[int]]:
    """Detector ROIs ``[r0, r1, c0, c1]`` (end exclusive) of one view.

    ``L1``: around the L1 QCT ROI; ``L1_body``: L1's DXA box; lungs and mediastinum: squares of
    ``ROI_HALF_MM`` around their centroids.
    """
    c = _cached(base)
    v2w = voxel_to_world(base, maps["spacing"])
    rows, cols = cam["shape"]
    half = max(1, int(round(ROI_HALF_MM / cam["pitch"])))
    out: dict[str, list[int]] = {}
    for name, ijk in c["roi_points"].items():
        pts = ijk.copy()
        if maps["mirrored"]:
            pts[:, 0] = base.shape[2] - 1 - pts[:, 0]
        world = (v2w[:3, :3] @ pts.T + v2w[:3, 3:4]).T
        rc = project_points(world, cam)
        if name in ("L1", "L1_body"):
            r0, c0 = np.floor(rc.min(axis=0)).astype(int)
            r1, c1 = np.ceil(rc.max(axis=0)).astype(int) + 1
        else:
            r, cc = np.rint(rc[0]).astype(int)
            r0, r1, c0, c1 = r - half, r + half + 1, cc - half, cc + half + 1
        out[name] = [int(np.clip(r0, 0, rows)), int(np.clip(r1, 0, rows)), int(np.clip(c0, 0, cols)),
                     int(np.clip(c1, 0, cols))]
    return out


def dxa_mean(img: np.ndarray, box: list[int], edge: float = DXA_EDGE_G_CM2) -> float:
    """DXA-style aBMD of a bone-DRR (g/cm², (rows, cols)): its mean over the pixels of ``box``
    above the bone-edge threshold ``edge`` (SIMULATOR.md §3.1); NaN when there are none."""
    r0, r1, c0, c1 = box
    return dxa_abmd(np.asarray(img[r0:r1, c0:c1], dtype=np.float64), edge)


def roi_mean(img: np.ndarray | torch.Tensor, box: list[int]) -> float:
    """Mean of a (rows, cols) image over ``[r0, r1, c0, c1]``; NaN for an empty box."""
    r0, r1, c0, c1 = box
    if r1 <= r0 or c1 <= c0:
        return float("nan")
    return float(img[r0:r1, c0:c1].mean())


# --------------------------------------------------------------------------- CT with phantom

def ct_volume(record: dict[str, Any], base: BaseAnatomy, maps: dict[str, Any]) -> dict[str, Any]:
    """Simulated QCT at the scanner energy with marrow fat, B-MAS200-like phantom and noise (§1.4).

    Returns:
        ``hu`` (float32 (z, y, x)), ``rods`` (list of (mask (z, y, x) bool, mg/cm³)) when the phantom
        is in, ``hu_nofat_roi`` (HU of the L1 QCT ROI voxels with water-equivalent marrow, for V14).
    """
    ct = record["ct"]
    e = ct["energy_kev"]
    m_w = float(physics.mass_atten("water", e)[0])
    m_w70 = float(physics.mass_atten("water", physics.E_NOMINAL_KEV)[0])
    r_mus = float(physics.mass_atten("muscle", e)[0] / physics.mass_atten("muscle", physics.E_NOMINAL_KEV)[0])
    r_adi = float(physics.mass_atten("adipose", e)[0] / physics.mass_atten("adipose", physics.E_NOMINAL_KEV)[0])
    m_ha = float(physics.mass_atten("ha", e)[0])
    ff = ct["marrow_fat"]
    rho_y, _ = physics.TISSUES["yellow_marrow"]
    rho_r, _ = physics.TISSUES["red_marrow"]
    marrow = (ff * rho_y * float(physics.mass_atten("yellow_marrow", e)[0])
              + (1 - ff) * rho_r * float(physics.mass_atten("red_marrow", e)[0])) / m_w

    mirrored = maps["mirrored"]
    c = _cached(base)
    fm = np.ascontiguousarray(maps["muscle_fraction"])
    if mirrored:
        trab_idx, bone_idx = _mirror_flat(c["trab_all_idx"], base.shape), _mirror_flat(c["bone_idx"], base.shape)
    else:
        trab_idx, bone_idx = c["trab_all_idx"], c["bone_idx"]
    rw, rh = maps["rho_w"], maps["rho_ha"]
    # μ/μ_w at E: soft tissue scaled from its 70 keV water equivalence (muscle/adipose mix),
    # marrow (FF·yellow + (1 − FF)·red) in trabecular voxels, plus HA; in place to save passes
    scale = m_w70 / m_w
    ratio = fm * np.float32(scale * (r_mus - r_adi))
    ratio += np.float32(scale * r_adi)
    ratio *= rw
    rwf, rhf, hf = rw.ravel(), rh.ravel(), ratio.ravel()
    hf[trab_idx] = rwf[trab_idx] * np.float32(marrow)
    hf[bone_idx] += rhf[bone_idx] * np.float32(m_ha / m_w)
    ratio -= 1.0
    ratio *= 1000.0
    hu = ratio

    out: dict[str, Any] = {}
    spacing = maps["spacing"]
    if record["phantom"]:
        rods = _insert_phantom(hu, rw, base, spacing, ct, m_ha / m_w)
        out["rods"] = rods
    rng = np.random.default_rng(ct["noise_seed"])
    field = rng.standard_normal(hu.shape, dtype=np.float32)
    # in-plane correlation only: 2.5 mm slices barely share noise
    field = ndimage.gaussian_filter(field, (0.0, CT_NOISE_CORRELATION_VOXELS, CT_NOISE_CORRELATION_VOXELS),
                                    truncate=2.5)
    field *= np.float32(ct["noise_hu"] / float(field.std()))
    field += np.float32(ct["offset_hu"])
    hu += field
    out["hu"] = hu
    # L1 ROI HU with water-equivalent marrow (the fat term removed), same noise
    if "L1" in base.vertebrae:
        roi = maps["qct_roi"] == base.vertebrae.index("L1") + 1
        nofat = 1000.0 * (rw[roi] + rh[roi] * np.float32(m_ha / m_w) - 1.0) + field[roi]
        out["roi_l1"] = roi
        out["hu_nofat_roi"] = nofat
    return out


def _insert_phantom(hu: np.ndarray, rw: np.ndarray, base: BaseAnatomy, spacing, ct: dict[str, Any],
                    ha_ratio: float) -> list[tuple[np.ndarray, float]]:
    """Water slab with five HA rods under the patient (posterior), written into ``hu`` in place."""
    sx, sy, _ = spacing
    tissue_rows = np.flatnonzero((rw > 0.05).any(axis=(0, 2)))
    posterior_at_row0 = base.meta["posterior_at_row0"]
    gap = PHANTOM_GAP_MM / sy
    thick = PHANTOM_SLAB_MM / sy
    if posterior_at_row0:
        back = tissue_rows.min()
        r1, r0 = back - gap, back - gap - thick
    else:
        back = tissue_rows.max()
        r0, r1 = back + gap, back + gap + thick
    ny, nx = hu.shape[1:]
    rows = np.arange(ny)[:, None]
    cols = np.arange(nx)[None, :]
    xc = (nx - 1) / 2.0
    slab = (rows >= r0) & (rows <= r1) & (np.abs(cols - xc) * sx <= PHANTOM_SLAB_WIDTH_MM / 2)
    hu[:, slab] = 0.0  # water-equivalent slab: 0 HU at every energy
    rc = (r0 + r1) / 2.0
    rods = []
    for i, rho in enumerate(PHANTOM_RODS_MG_CM3):
        cx = xc + (i - 2) * PHANTOM_ROD_PITCH_MM / sx
        d = np.hypot((rows - rc) * sy, (cols - cx) * sx)
        disk = d <= PHANTOM_ROD_DIAMETER_MM / 2
        g = rho / 1000.0
        hu_rod = 1000.0 * ((1.0 - g / physics.HA_DENSITY) + g * ha_ratio - 1.0) + ct["rod_bias_hu"][i]
        hu[:, disk] = np.float32(hu_rod)
        core = d <= PHANTOM_ROD_DIAMETER_MM / 2 - PHANTOM_ROD_EROSION_MM
        rods.append((core, rho))
    return rods


def calibrate_qct(ct_out: dict[str, Any], base: BaseAnatomy) -> dict[str, float]:
    """Phantom calibration on the simulated CT (SIMULATOR.md §1.4 step 3).

    Rod means on eroded masks → least-squares HU = a + b·ρ (ρ mg/cm³ HA) →
    calibrated mean of the L1 QCT ROI, with and without the marrow-fat term.
    The rods are uniform along z, so every slice is used: over the L1 slices
    only (≈ 13 at 2.5 mm) CT noise of 20 HU alone gives ≈ 1.2 % slope SD,
    against the ±2 % acceptance.
    """
    roi = ct_out["roi_l1"]
    hu = ct_out["hu"]
    means, dens = [], []
    for core, rho in ct_out["rods"]:
        means.append(float(hu[:, core].mean()))
        dens.append(rho)
    b, a = np.polyfit(np.array(dens), np.array(means), 1)
    return {
        "slope_hu_per_mg_cm3": float(b),
        "intercept_hu": float(a),
        "rod_means_hu": means,
        "vbmd_l1_mg_cm3": float((hu[roi].mean() - a) / b),
        "vbmd_l1_nofat_mg_cm3": float((ct_out["hu_nofat_roi"].mean() - a) / b),
    }
