"""CT intensity calibration with a phantom: HU → mg/cm³ hydroxyapatite (HA).

The phantom (config ``calibrate.phantom``) is a row of rods of known HA
density lying along the table (z), e.g. the B-MAS200-like phantom of the
virtual cohort: 0/50/100/150/200 mg/cm³, 15 mm rods 40 mm apart. The rods
are found automatically:

1. the CT is averaged over z (the rods are parallel to z; noise drops);
2. a template of the rod row, each rod weighted by its density, is matched
   by masked normalized cross-correlation (FFT) over every position and over
   small tilts (and the reversed order);
3. each rod's mean HU is measured robustly (median of per-slice means) inside
   the rod eroded by ``erosion_mm``, over the slices of the target bones;
4. HU = a + b·ρ is fitted by least squares; a rod whose residual spoils the
   fit (missing, broken, air bubble) is dropped and reported.

Fewer than ``min_rods`` usable rods, no phantom, or R² below ``min_r2`` is an
:class:`~bmdpipe.errors.InputError`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import signal

from bmdpipe.errors import InputError

#: Bump when a change to this stage changes its outputs (the rule re-runs).
STAGE_VERSION = "2"


@dataclass(frozen=True)
class PhantomSpec:
    """Layout of a rod phantom, approximately; mm and mg/cm³ HA.

    Attributes:
        densities_mg_cm3: rod densities in their order along the row.
        rod_diameter_mm: rod diameter.
        rod_pitch_mm: centre-to-centre distance of neighbouring rods.
        erosion_mm: margin removed from each rod before measuring.
        max_tilt_deg: largest in-plane rotation of the row searched.
        min_match: smallest template correlation accepted as a phantom.
        min_rods: fewest usable rods for a fit.
        min_r2: smallest R² of the fit.
        slope_range: plausible HU per mg/cm³ HA (1.1–1.9 for 55–80 keV
            effective energy, SIMULATOR.md §1.1); outside it the "rods" are not rods.
    """

    densities_mg_cm3: tuple[float, ...] = (0.0, 50.0, 100.0, 150.0, 200.0)
    rod_diameter_mm: float = 15.0
    rod_pitch_mm: float = 40.0
    erosion_mm: float = 3.0
    max_tilt_deg: float = 10.0
    min_match: float = 0.5
    min_rods: int = 3
    min_r2: float = 0.98
    slope_range: tuple[float, float] = (0.5, 3.0)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "PhantomSpec":
        cfg = dict(cfg)
        for key in ("densities_mg_cm3", "slope_range"):
            if key in cfg:
                cfg[key] = tuple(float(v) for v in cfg[key])
        return cls(**cfg)


@dataclass
class Calibration:
    """A linear calibration HU = intercept + slope · ρ (ρ in mg/cm³ HA).

    Attributes:
        method: ``"phantom"`` or ``"phantomless"``.
        slope_hu_per_mg_cm3, intercept_hu: the fit.
        r2: coefficient of determination of the fit.
        rods: per rod: density, mean and spread of HU, voxels, centre (mm,
            LPS), residual, used or why not.
        match: template correlation of the detected phantom.
        reference_hu, effective_energy_kev, effective_energy_sd_kev, fit_rms_hu: phantomless
            only: measured air/adipose/lean HU (:func:`reference_tissues`), the
            effective energy and its posterior SD (keV), and the misfit of the
            tissue ratio at that energy, as adipose HU.
    """

    method: str
    slope_hu_per_mg_cm3: float
    intercept_hu: float
    r2: float
    rods: list[dict[str, Any]] = field(default_factory=list)
    match: float | None = None
    reference_hu: dict[str, float] | None = None
    effective_energy_kev: float | None = None
    fit_rms_hu: float | None = None
    effective_energy_sd_kev: float | None = None

    def to_density(self, hu: np.ndarray) -> np.ndarray:
        """mg/cm³ HA from HU (any shape)."""
        return (np.asarray(hu, dtype=np.float32) - np.float32(self.intercept_hu)) / np.float32(self.slope_hu_per_mg_cm3)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --- detection -------------------------------------------------------------------


def _template(spec: PhantomSpec, spacing_xy: tuple[float, float], angle_deg: float) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Density-weighted rod pattern, its support, and rod centres (pixels, (row, col)) relative to the window."""
    sx, sy = spacing_xy
    n = len(spec.densities_mg_cm3)
    r = spec.rod_diameter_mm / 2
    margin = r * 0.6
    half_len = (n - 1) / 2 * spec.rod_pitch_mm + r + margin
    extent = half_len + 1.0
    cols = int(math.ceil(extent / sx))
    rows = int(math.ceil(extent / sy))
    yy, xx = np.mgrid[-rows : rows + 1, -cols : cols + 1].astype(np.float64)
    x_mm, y_mm = xx * sx, yy * sy
    a = math.radians(angle_deg)
    u = np.array([math.cos(a), math.sin(a)])  # along the row, (x, y)
    along = x_mm * u[0] + y_mm * u[1]
    across = -x_mm * u[1] + y_mm * u[0]
    support = (np.abs(along) <= half_len) & (np.abs(across) <= r + margin)
    pattern = np.zeros_like(x_mm)
    centres = []
    for i, rho in enumerate(spec.densities_mg_cm3):
        t = (i - (n - 1) / 2) * spec.rod_pitch_mm
        cx, cy = t * u[0], t * u[1]
        pattern[np.hypot(x_mm - cx, y_mm - cy) <= r] = rho
        centres.append(np.array([rows + cy / sy, cols + cx / sx]))
    return pattern, support, centres


def _masked_ncc(image: np.ndarray, pattern: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Normalized cross-correlation of ``pattern`` (on ``support``) at every window position (same shape as image)."""
    m = support.astype(np.float64)
    n = m.sum()
    t = (pattern - (pattern * m).sum() / n) * m
    t_norm = math.sqrt(float((t * t).sum()))
    flip = (slice(None, None, -1), slice(None, None, -1))
    num = signal.fftconvolve(image, t[flip], mode="same")
    s1 = signal.fftconvolve(image, m[flip], mode="same")
    s2 = signal.fftconvolve(image * image, m[flip], mode="same")
    var = np.clip(s2 - s1 * s1 / n, 1e-6, None)
    return num / (np.sqrt(var) * t_norm + 1e-12)


def find_rods(
    mean_axial_hu: np.ndarray, spacing_xy: tuple[float, float], spec: PhantomSpec
) -> tuple[list[np.ndarray], float]:
    """Rod centres in an axial image.

    Args:
        mean_axial_hu: ``(rows, cols)`` HU, e.g. the CT averaged over z.
        spacing_xy: pixel spacing ``(x = col, y = row)``, mm.

    Returns:
        ``(centres, match)``: one ``(row, col)`` per rod in ``spec`` order,
        and the template correlation at the best position.

    Raises:
        InputError: no position correlates above ``spec.min_match``.
    """
    image = np.clip(mean_axial_hu.astype(np.float64), -1000.0, 3000.0)
    best = (-np.inf, None, None, None)
    step = 2.0
    tilts = np.arange(-spec.max_tilt_deg, spec.max_tilt_deg + 1e-6, step)
    for angle in [*tilts, *(tilts + 180.0)]:
        pattern, support, centres = _template(spec, spacing_xy, float(angle))
        score = _masked_ncc(image, pattern, support)
        k = int(np.argmax(score))
        if score.flat[k] > best[0]:
            best = (float(score.flat[k]), np.unravel_index(k, score.shape), centres, pattern.shape)
    match, peak, centres, shape = best
    if match < spec.min_match:
        raise InputError(
            f"no calibration phantom found: the best match of the configured rod layout correlates {match:.2f} "
            f"(< {spec.min_match}); check calibrate.phantom in the config, or use phantomless calibration"
        )
    offset = np.array(peak, dtype=np.float64) - np.array([(shape[0] - 1) / 2, (shape[1] - 1) / 2])
    return [c + offset for c in centres], match


# --- fit ------------------------------------------------------------------------


def _fit(dens: np.ndarray, hu: np.ndarray) -> tuple[float, float, float]:
    b, a = np.polyfit(dens, hu, 1)
    pred = a + b * dens
    ss_res = float(((hu - pred) ** 2).sum())
    ss_tot = float(((hu - hu.mean()) ** 2).sum())
    return float(b), float(a), 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0


def fit_phantom(
    hu: sitk.Image,
    spec: PhantomSpec = PhantomSpec(),
    *,
    z_range: tuple[int, int] | None = None,
) -> Calibration:
    """Find the phantom in a CT and fit HU = a + b·ρ.

    Args:
        hu: CT in HU, axial (slices along the third image axis).
        spec: the phantom's approximate layout.
        z_range: slices ``[z0, z1)`` to measure on (those of the target
            bones); default all.

    Raises:
        InputError: no phantom, fewer than ``spec.min_rods`` usable rods, or
            R² below ``spec.min_r2``.
    """
    arr = sitk.GetArrayViewFromImage(hu)  # (z, y, x)
    z0, z1 = z_range or (0, arr.shape[0])
    if not 0 <= z0 < z1 <= arr.shape[0]:
        raise InputError(f"slice range {z_range} outside the CT's {arr.shape[0]} slices")
    sx, sy = hu.GetSpacing()[:2]
    mean_axial = arr[z0:z1].mean(axis=0)
    centres, match = find_rods(mean_axial, (sx, sy), spec)

    rows, cols = np.mgrid[: arr.shape[1], : arr.shape[2]]
    core_r = spec.rod_diameter_mm / 2 - spec.erosion_mm
    n = len(spec.densities_mg_cm3)
    pitch = (centres[-1] - centres[0]) / (n - 1)  # (row, col) per rod

    def measure(centre: np.ndarray, rho: float) -> dict[str, Any]:
        cr, cc = centre
        core = np.hypot((rows - cr) * sy, (cols - cc) * sx) <= core_r
        rod: dict[str, Any] = {"density_mg_cm3": float(rho), "n_voxels_per_slice": int(core.sum())}
        centre_mm = hu.TransformContinuousIndexToPhysicalPoint([float(cc), float(cr), float((z0 + z1 - 1) / 2)])
        rod["centre_lps_mm"] = [float(v) for v in centre_mm]
        if core.sum() < 5:
            rod.update(used=False, why="outside the image")
        else:
            per_slice = arr[z0:z1][:, core].astype(np.float64)
            rod.update(mean_hu=float(np.median(per_slice.mean(axis=1))), std_hu=float(per_slice.std()), used=True, why="")
        return rod

    # With rods missing the template can lock on one pitch off: try the row shifted by up to two
    # pitches and keep the assignment in which most rods agree, then the intercept nearest water
    # (With rods missing, the reversed order can also match better than the true one.)
    candidates = []
    for first, step in ((centres[0], pitch), (centres[-1], -pitch)):
        for shift in range(-2, 3):
            rods = [measure(first + (i + shift) * step, rho) for i, rho in enumerate(spec.densities_mg_cm3)]
            b, a, r2 = _robust_fit(rods, spec)
            used = sum(r["used"] for r in rods)
            plausible = spec.slope_range[0] <= b <= spec.slope_range[1] and r2 >= spec.min_r2
            preferred = shift == 0 and step is pitch
            water = -round(abs(a)) if plausible else -np.inf  # the 0 mg/cm³ end sits near 0 HU
            candidates.append(((plausible, used, water, r2, preferred), rods, (b, a, r2)))
    _, rods, (b, a, r2) = max(candidates, key=lambda c: c[0])

    for r in rods:
        if "mean_hu" in r:
            r["residual_hu"] = float(r["mean_hu"] - (a + b * r["density_mg_cm3"]))
    summary = "; ".join(
        f"{r['density_mg_cm3']:g} mg/cm³: " + (f"{r['mean_hu']:.1f} HU" if "mean_hu" in r else "not measured")
        + ("" if r["used"] else f" ({r['why'].split(' (')[0]})")
        for r in rods
    )
    if not r2 >= spec.min_r2:
        raise InputError(
            f"calibration phantom: fewer than {spec.min_rods} rods agree with the configured densities "
            f"(best fit of {sum(r['used'] for r in rods)} rods: HU = {a:.1f} + {b:.3f}·ρ, R² {r2:.3f} < {spec.min_r2}); rods: {summary}"
        )
    lo, hi = spec.slope_range
    if not lo <= b <= hi:
        raise InputError(
            f"calibration phantom: slope {b:.3f} HU per mg/cm³ is outside the plausible range [{lo}, {hi}]; "
            f"what was found is not the configured phantom (match {match:.2f}); rods: {summary}"
        )
    return Calibration("phantom", b, a, r2, rods, match)


def _robust_fit(rods: list[dict[str, Any]], spec: PhantomSpec) -> tuple[float, float, float]:
    """Fit HU = a + b·ρ on the largest set of rods that agree (R² ≥ min_r2, slope plausible).

    Every subset of at least ``min_rods`` measured rods is tried (a phantom
    has few rods); rods left out are marked in place as outliers. When no
    subset agrees, the best fit of all measured rods is returned.

    Returns:
        ``(b, a, r2)``; NaN when fewer than ``min_rods`` rods were measured.
    """
    import itertools

    measured = [r for r in rods if r["used"]]
    if len(measured) < max(2, spec.min_rods):
        return float("nan"), float("nan"), float("nan")
    dens = np.array([r["density_mg_cm3"] for r in measured])
    vals = np.array([r["mean_hu"] for r in measured])
    best: tuple[tuple, tuple[int, ...], tuple[float, float, float]] | None = None
    for size in range(len(measured), max(2, spec.min_rods) - 1, -1):
        for subset in itertools.combinations(range(len(measured)), size):
            idx = list(subset)
            b, a, r2 = _fit(dens[idx], vals[idx])
            ok = r2 >= spec.min_r2 and spec.slope_range[0] <= b <= spec.slope_range[1]
            # among equally many agreeing rods prefer an intercept near water (0 HU), then R²
            key = (ok, size if ok else 0, -round(abs(a)) if ok else 0, r2)
            if best is None or key > best[0]:
                best = (key, subset, (b, a, r2))
    assert best is not None
    (ok, *_), subset, fit = best
    if not ok:
        return _fit(dens, vals)
    for k, rod in enumerate(measured):
        if k not in subset:
            rod.update(used=False, why=f"outlier (mean {rod['mean_hu']:.1f} HU does not fit the others: rod missing or damaged)")
    return fit


# --- phantomless (internal) calibration ------------------------------------------

#: HU windows of the reference tissues: air outside the body; adipose and lean soft tissue (muscle,
#: organs, blood) inside it. Adipose moves from −99 to −69 HU over 55–80 keV, lean tissue barely
#: (42–45 HU; SIMULATOR.md §1.1 table), so their attenuation ratio carries the effective energy.
AIR_WINDOW_HU = (-1100.0, -900.0)
FAT_WINDOW_HU = (-190.0, -30.0)
LEAN_WINDOW_HU = (-20.0, 120.0)
#: Effective energies searched, keV.
ENERGY_GRID_KEV = np.arange(40.0, 120.01, 0.1)
#: Fewest voxels of each tissue for a measurement.
MIN_TISSUE_VOXELS = 1000


@dataclass(frozen=True)
class PhantomlessSpec:
    """Settings of the internal calibration (config ``calibrate.phantomless``).

    The effective energy E of the scan is estimated from the ratio of the
    linear attenuation (relative to water, i.e. (HU − offset + 1000)/1000) of
    deep adipose to deep lean soft tissue: adipose attenuates relatively less
    at low energy. The tissues' ratio at ``reference_energy_kev`` is a
    property of the population and the HU windows, fitted from phantom-
    calibrated scans of the same kind (:func:`fit_tissue_reference`; the
    default comes from the 24 phantom scans of the demo virtual cohort, seed 0).
    It is combined with a prior on E for the tube voltage (a 120 kVp body CT
    behaves like 65–75 keV, SIMULATOR.md §1.1); E gives the slope b(E) of HA
    in water, the water offset comes from air (−1000 HU).

    Attributes:
        energy_prior_kev, energy_prior_sd_kev: Gaussian prior on E, keV.
        fat_lean_ratio, fat_lean_ratio_sd: attenuation ratio of deep adipose to lean tissue at
            ``reference_energy_kev`` and its between-patient SD.
        reference_energy_kev: energy the ratio refers to.
        depth_mm: tissue is measured this far inside the body surface (subcutaneous fat, whose
            density varies most between patients, and partial volume at the skin are left out);
            halved down to 5 mm when too few voxels are that deep.
    """

    energy_prior_kev: float = 69.0
    energy_prior_sd_kev: float = 4.0
    fat_lean_ratio: float = 0.8650
    fat_lean_ratio_sd: float = 0.0017
    reference_energy_kev: float = 70.0
    depth_mm: float = 35.0

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "PhantomlessSpec":
        return cls(**cfg)


def reference_tissues(hu: sitk.Image, depth_mm: float = PhantomlessSpec.depth_mm) -> dict[str, float]:
    """Measured HU of the reference tissues.

    Returns:
        ``air`` (median of the air window outside the body), ``adipose`` and
        ``lean`` (medians of their windows over voxels at least ``depth``
        mm inside the body, in the axial plane), ``depth_mm`` used and the voxel counts.

    Raises:
        InputError: no body, or too few adipose or lean voxels even near the surface.
    """
    from scipy import ndimage

    from bmdpipe.segment import body_mask

    arr = sitk.GetArrayViewFromImage(hu).astype(np.float32)
    body = body_mask(arr, -500.0)
    if not body.any():
        raise InputError("phantomless calibration: no body found (no voxel above −500 HU)")
    outside = arr[~body]
    air = outside[(outside >= AIR_WINDOW_HU[0]) & (outside <= AIR_WINDOW_HU[1])]
    # depth below the skin in each axial slice (3-D distances cost 3× more and differ in < 1 % of voxels)
    in_plane = hu.GetSpacing()[1::-1]
    depth_map = np.stack([ndimage.distance_transform_edt(s, sampling=in_plane) for s in body])
    depth = float(depth_mm)
    while True:
        deep = arr[depth_map >= depth]
        fat = deep[(deep >= FAT_WINDOW_HU[0]) & (deep <= FAT_WINDOW_HU[1])]
        lean = deep[(deep >= LEAN_WINDOW_HU[0]) & (deep <= LEAN_WINDOW_HU[1])]
        if min(fat.size, lean.size) >= MIN_TISSUE_VOXELS or depth <= 5.0:
            break
        depth = max(depth / 2, 5.0)
    if min(fat.size, lean.size) < MIN_TISSUE_VOXELS:
        raise InputError(f"phantomless calibration: too few adipose ({fat.size}) or lean-tissue ({lean.size}) voxels "
                         f"inside the body (need {MIN_TISSUE_VOXELS} each in {FAT_WINDOW_HU} and {LEAN_WINDOW_HU} HU); "
                         "is it a body CT in HU?")
    return {"air": _median(air) if air.size >= MIN_TISSUE_VOXELS else float("nan"),
            "adipose": _median(fat), "lean": _median(lean), "depth_mm": depth,
            "n_adipose": int(fat.size), "n_lean": int(lean.size)}


def _median(values: np.ndarray) -> float:
    """Median; for integer-valued HU (most CTs) interpolated within the unit bin, free of the 1 HU rounding."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or not np.all(v == np.round(v)):
        return float(np.median(v))
    lo = float(v.min())
    counts = np.bincount((v - lo).astype(np.int64))
    cdf = np.cumsum(counts)
    k = int(np.searchsorted(cdf, v.size / 2))
    below = cdf[k - 1] if k > 0 else 0
    # values equal to lo + k spread uniformly over [lo + k − 0.5, lo + k + 0.5)
    return float(lo + k - 0.5 + (v.size / 2 - below) / counts[k])


def _log_atten_ratio(energies_kev: np.ndarray) -> np.ndarray:
    """ln(μ_adipose/μ_muscle)(E) of the ICRU tissues (xraydb), shape (n,)."""
    from bmdpipe import physics

    e = np.asarray(energies_kev, dtype=np.float64)
    return np.log(physics.mass_atten("adipose", e) / physics.mass_atten("muscle", e))


def _tissue_ratio(ref: dict[str, float]) -> tuple[float, float]:
    """(measured ln attenuation ratio adipose/lean, water offset HU) from :func:`reference_tissues`."""
    offset = ref["air"] + 1000.0 if np.isfinite(ref["air"]) else 0.0
    fat = (ref["adipose"] - offset + 1000.0) / 1000.0
    lean = (ref["lean"] - offset + 1000.0) / 1000.0
    return math.log(fat / lean), offset


def energy_from_slope(slope_hu_per_mg_cm3: float) -> float:
    """The effective energy (keV) whose HA-in-water slope b(E) is the given one (inverse of physics.ha_slope)."""
    from bmdpipe import physics

    # b(E) = (μ/ρ_HA − μ/ρ_w / 3.16)/(μ/ρ_w), as physics.ha_slope, on the whole grid at once; decreasing in E
    m_w = physics.mass_atten("water", ENERGY_GRID_KEV)
    b = (physics.mass_atten("ha", ENERGY_GRID_KEV) - m_w / physics.HA_DENSITY) / m_w
    return float(np.interp(-slope_hu_per_mg_cm3, -b, ENERGY_GRID_KEV))


def fit_tissue_reference(tissues: Sequence[dict[str, float]], phantom_slopes: Sequence[float],
                         reference_energy_kev: float = PhantomlessSpec.reference_energy_kev) -> dict[str, float]:
    """Fit :attr:`PhantomlessSpec.fat_lean_ratio` from phantom-calibrated scans.

    Each scan's phantom slope gives its effective energy; its measured
    adipose/lean attenuation ratio is carried to ``reference_energy_kev`` with
    the ICRU tissues' energy dependence.

    Args:
        tissues: :func:`reference_tissues` of each scan.
        phantom_slopes: the same scans' phantom slopes, HU per mg/cm³ HA.

    Returns:
        ``fat_lean_ratio``, ``fat_lean_ratio_sd`` (between scans) and ``n``.
    """
    if len(tissues) != len(phantom_slopes) or len(tissues) < 3:
        raise InputError(f"fit_tissue_reference: need ≥ 3 scans with both tissues and a phantom slope, got {len(tissues)}")
    ref_lr = float(_log_atten_ratio(np.array([reference_energy_kev]))[0])
    logs = []
    for t, b in zip(tissues, phantom_slopes):
        measured, _ = _tissue_ratio(t)
        e = energy_from_slope(float(b))
        logs.append(measured - (float(_log_atten_ratio(np.array([e]))[0]) - ref_lr))
    ratios = np.exp(np.array(logs))
    return {"fat_lean_ratio": float(ratios.mean()), "fat_lean_ratio_sd": float(ratios.std(ddof=1)), "n": len(ratios)}


def calibrate_phantomless(hu: sitk.Image, spec: PhantomlessSpec = PhantomlessSpec()) -> Calibration:
    """Internal calibration from air, deep adipose and lean tissue (SIMULATOR.md §1.2; see :class:`PhantomlessSpec`).

    E is the maximum a posteriori of the prior on E and the measured
    adipose/lean attenuation ratio (Gaussian in its log, SD from the
    reference's between-patient spread); slope = b(E), intercept = water
    offset from air. ``effective_energy_sd_kev`` is the posterior SD.

    Raises:
        InputError: the tissues cannot be measured.
    """
    from bmdpipe import physics

    ref = reference_tissues(hu, spec.depth_mm)
    measured, offset = _tissue_ratio(ref)
    grid = ENERGY_GRID_KEV
    lr = _log_atten_ratio(grid)
    ref_lr = float(_log_atten_ratio(np.array([spec.reference_energy_kev]))[0])
    predicted = math.log(spec.fat_lean_ratio) + lr - ref_lr
    sd_log = spec.fat_lean_ratio_sd / spec.fat_lean_ratio
    cost = ((grid - spec.energy_prior_kev) / spec.energy_prior_sd_kev) ** 2 + ((measured - predicted) / sd_log) ** 2
    k = int(np.argmin(cost))
    post = np.exp(-0.5 * (cost - cost[k]))
    post /= post.sum()
    e_sd = float(np.sqrt((post * (grid - grid[k]) ** 2).sum()))
    e_eff = float(grid[k])
    slope = physics.ha_slope(e_eff)
    # misfit of the tissue ratio at E, expressed as adipose HU
    fit_rms = float(abs(math.exp(measured) - math.exp(predicted[k])) * (ref["lean"] - offset + 1000.0))
    return Calibration("phantomless", float(slope), float(offset), float("nan"), reference_hu=ref,
                       effective_energy_kev=e_eff, fit_rms_hu=fit_rms, effective_energy_sd_kev=e_sd)


def apply_calibration(hu: sitk.Image, calibration: Calibration) -> sitk.Image:
    """The CT as mg/cm³ HA (float32), same geometry."""
    out = sitk.GetImageFromArray(calibration.to_density(sitk.GetArrayViewFromImage(hu)))
    out.CopyInformation(hu)
    return out


def slice_range_of(labels: sitk.Image, values: Sequence[int]) -> tuple[int, int] | None:
    """Slices ``[z0, z1)`` that hold any of the label ``values``; None if none does."""
    arr = sitk.GetArrayViewFromImage(labels)
    zs = np.flatnonzero(np.isin(arr, list(values)).any(axis=(1, 2)))
    return (int(zs[0]), int(zs[-1]) + 1) if zs.size else None



METHODS = ("phantom", "phantomless", "auto")


def calibrate(hu: sitk.Image, method: str = "phantom", spec: PhantomSpec = PhantomSpec(), *,
              z_range: tuple[int, int] | None = None,
              phantomless: PhantomlessSpec = PhantomlessSpec()) -> Calibration:
    """Calibrate a CT by ``method``: ``phantom`` (required), ``phantomless``, or ``auto`` (phantom if found)."""
    if method not in METHODS:
        raise InputError(f"calibration method {method!r} is not one of {METHODS}")
    if method == "phantomless":
        return calibrate_phantomless(hu, phantomless)
    try:
        return fit_phantom(hu, spec, z_range=z_range)
    except InputError as exc:
        if method == "phantom":
            raise InputError(f"{exc} (calibration method 'phantom' requires a phantom; set calibrate.method to "
                             "'auto' or 'phantomless', or the sheet column 'calibration' for this patient)") from None
        return calibrate_phantomless(hu, phantomless)


def qc_figure(hu: sitk.Image, cal: Calibration, path: str | os.PathLike[str]) -> None:
    """PNG for the report: the z-averaged CT with the rods found, and the fit (or the reference tissues)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bmdpipe.io.atomic import atomic_path

    arr = sitk.GetArrayViewFromImage(hu)
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(9, 3.6))
    a0.imshow(arr.mean(axis=0), cmap="gray", vmin=-300, vmax=500)
    a0.set_axis_off()
    for rod in cal.rods:
        idx = hu.TransformPhysicalPointToContinuousIndex(rod["centre_lps_mm"])
        a0.add_patch(plt.Circle((idx[0], idx[1]), 9, fill=False, color="lime" if rod["used"] else "red", lw=1))
    if cal.rods:
        used = [r for r in cal.rods if "mean_hu" in r]
        a1.scatter([r["density_mg_cm3"] for r in used], [r["mean_hu"] for r in used],
                   c=["tab:green" if r["used"] else "tab:red" for r in used])
        rho = np.linspace(0, max(r["density_mg_cm3"] for r in cal.rods), 10)
        a1.plot(rho, cal.intercept_hu + cal.slope_hu_per_mg_cm3 * rho, "k-", lw=1)
        a1.set_xlabel("rod density (mg/cm³ HA)")
        a1.set_ylabel("mean HU")
        a1.set_title(f"HU = {cal.intercept_hu:.1f} + {cal.slope_hu_per_mg_cm3:.3f}·ρ, R² {cal.r2:.4f}", fontsize=9)
    else:
        ref = {k: v for k, v in (cal.reference_hu or {}).items() if k in ("air", "adipose", "lean")}
        a1.bar(list(ref), list(ref.values()))
        a1.set_ylabel("measured HU")
        a1.set_title(f"phantomless: E_eff {cal.effective_energy_kev:.1f} ± {cal.effective_energy_sd_kev or 0:.1f} keV, "
                     f"b {cal.slope_hu_per_mg_cm3:.3f}",
                     fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def calibrate_ct(ct_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, method: str = "phantom",
                 spec: PhantomSpec = PhantomSpec(), labels: dict[str, Any] | None = None,
                 phantomless: PhantomlessSpec = PhantomlessSpec()) -> dict[str, Any]:
    """Calibrate an ingested CT (``ct.nii.gz``) and write ``bmd.nii.gz`` (mg/cm³ HA), ``calibration.json``, ``qc.png``.

    Returns:
        The summary written to ``calibration.json``.
    """
    from pathlib import Path

    from bmdpipe.io.atomic import atomic_path, write_json

    out = Path(out_dir)
    hu = sitk.ReadImage(str(ct_path))
    cal = calibrate(hu, method, spec, phantomless=phantomless)
    with atomic_path(out / "bmd.nii.gz") as tmp:
        sitk.WriteImage(apply_calibration(hu, cal), str(tmp), useCompression=True)
    qc_figure(hu, cal, out / "qc.png")
    summary = {"stage": "calibrate", "status": "ok", "code_version": STAGE_VERSION, "method_requested": method,
               **(labels or {}), **cal.to_json()}
    write_json(out / "calibration.json", summary)
    return summary
