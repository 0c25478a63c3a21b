"""Every random parameter of a virtual patient, sampled in one place (:func:`sample_patient`).

The record is a JSON-serialisable dict; :func:`derive` turns it, with a base
anatomy, into the deterministic quantities (trabecular scale factors) without
drawing anything. Nothing here depends on the BMD except what SIMULATOR.md
§5.4 allows: age modulates marrow fat and degenerative artefacts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bmdpipe import tscore
from bmdpipe.simulate.base import variant_seed

#: Inter-vertebra correlation of clinical DXA labels by level distance
#: (SIMULATOR.md §5.2, [seed 000]: L1–L2 0.918, L1–L3 0.878, L1–L4 0.807).
LEVEL_CORRELATION = {0: 1.0, 1: 0.918, 2: 0.878, 3: 0.807, 4: 0.75}
LEVEL_ORDER = ["T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5"]
#: Degenerative artefact weight per level, increasing caudally (SIMULATOR.md §3.4 [assumption]).
ARTEFACT_LEVEL_WEIGHT = {"T11": 0.4, "T12": 0.5, "L1": 0.6, "L2": 0.8, "L3": 1.0, "L4": 1.0}


def level_correlation(vertebrae: list[str]) -> np.ndarray:
    """Target correlation matrix of clinical DXA labels, shape (V, V)."""
    pos = [LEVEL_ORDER.index(v) for v in vertebrae]
    return np.array([[LEVEL_CORRELATION[min(abs(a - b), 4)] for b in pos] for a in pos])


def mean_t_score(age: float, sex: str, cfg: dict[str, Any]) -> float:
    """Population mean T-score at ``age`` (years): a linear decline, steeper in women after 50.

    Calibrated so that L1 osteoporosis prevalence (T ≤ −2.5) is 10–20 % and
    the class means approach 1.00 / 0.81 / 0.65 g/cm² (SIMULATOR.md §5.3, V12, V13).
    """
    m = cfg["dxa_model"]
    if sex == "F":
        return m["t_at_30_F"] - m["t_slope_F"] * (age - 30.0) - m["t_slope_post50_F"] * max(0.0, age - 50.0)
    return m["t_at_30_M"] - m["t_slope_M"] * (age - 30.0)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def sample_patient(rng: np.random.Generator, cfg: dict[str, Any]) -> dict[str, Any]:
    """Draw every random parameter of one virtual patient (SIMULATOR.md §1.4, §3.4, §4, §5).

    Args:
        rng: the patient's own generator (e.g. ``default_rng([seed, index])``).
        cfg: the cohort config (:data:`bmdpipe.simulate.DEFAULTS` filled).

    Returns:
        A JSON-serialisable record: demographics, per-vertebra clinical DXA
        labels (g/cm²) sampled first with the inter-vertebra correlation, the
        label-noise terms that link them to the true aBMD, cortex coupling,
        habitus, one pose and acquisition per view, CT scanner and phantom
        parameters. :func:`bmdpipe.simulate.simulate_patient` reproduces the
        patient from it bit for bit.
    """
    verts = list(cfg["vertebrae"])
    nv = len(verts)
    bases = cfg["bases"]
    age = float(rng.triangular(cfg["age_range"][0], cfg["age_mode"], cfg["age_range"][1]))
    sex = "F" if rng.random() < cfg["female_fraction"] else "M"

    # clinical DXA labels first (§5.2): latent Gaussian with the level correlation
    z = rng.multivariate_normal(np.zeros(nv), level_correlation(verts))
    t_mean = mean_t_score(age, sex, cfg)
    t_sd = cfg["dxa_model"]["t_sd"]
    dxa = {}
    ref = tscore.reference_table(cfg["dxa_model"]["reference"])
    for i, v in enumerate(verts):
        mu, sd = ref[sex][v]
        dxa[v] = float(max(cfg["dxa_model"]["floor_g_cm2"], mu + sd * (t_mean + t_sd * z[i])))

    # label-noise terms (§3.4): precision per vertebra, accuracy, degenerative artefact
    art_p = 0.35 if age > 65 else 0.10
    art_amp = _u(rng, 0.0, 0.12) if rng.random() < art_p else 0.0
    label_noise = {
        "precision": {v: float(rng.normal(0.0, cfg["dxa_model"]["precision_sd"])) for v in verts},
        "accuracy": {v: float(rng.normal(0.0, cfg["dxa_model"]["accuracy_sd"])) for v in verts},
        "artefact_g_cm2": {v: art_amp * ARTEFACT_LEVEL_WEIGHT.get(v, 1.0) for v in verts},
    }
    # vertebral mineral model (§2.2)
    cortex = {
        "coupling": _u(rng, 0.2, 0.6),
        "factor": {v: float(rng.normal(1.0, 0.15) * rng.normal(1.0, 0.07)) for v in verts},
    }
    habitus = {
        "body_scale": float(np.clip(rng.normal(1.0, 0.07), 0.85, 1.18)),
        "fat_mm": _u(rng, -10.0, 40.0),
        "soft_density_scale": float(rng.normal(1.0, 0.02)),
        "mirrored": bool(rng.random() < cfg["mirror_probability"]),
        # elastic anatomy variant (§5.5), filled in below once the base is chosen
        "elastic": int(rng.integers(0, max(1, int(cfg["elastic_variants"])))),
    }

    views = {}
    for view in cfg["views"]:
        pose = {"rotation_deg": float(rng.normal(0.0, 1.0)), "tilt_deg": float(rng.normal(0.0, 1.0)),
                "roll_deg": float(rng.normal(0.0, 0.5)),
                "shift_x_mm": _u(rng, -20.0, 20.0), "shift_z_mm": _u(rng, -20.0, 20.0)}
        if view.startswith("rot"):
            pose["rotation_deg"] = float(rng.choice([-1.0, 1.0]) * rng.uniform(2.5, 5.0))
        elif view.startswith("tilt"):
            pose["tilt_deg"] = float(rng.choice([-1.0, 1.0]) * rng.uniform(1.5, 3.0))
        jpeg = None if rng.random() < 0.3 else int(rng.integers(50, 96))
        acq = {
            "kvp": float(rng.choice([110.0, 115.0, 120.0, 125.0])),
            "al_mm": float(rng.choice([2.5, 3.0])),
            "cu_mm": float(rng.choice([0.1, 0.2])),
            "sdd_mm": float(np.round(rng.uniform(1500.0, 2000.0), -1)),
            "object_detector_mm": _u(rng, 130.0, 170.0),
            "grid": bool(rng.random() < 0.8),
            "n0_native": float(np.exp(rng.uniform(np.log(5e3), np.log(3e4)))),
            "scatter_k": _u(rng, 0.08, 0.15),
            "scatter_sigma_mm": _u(rng, 30.0, 60.0),
            "detector_sigma_mm": _u(rng, 0.15, 0.22),
            "focal_spot_mm": _u(rng, 0.6, 1.2),
            "heel": _u(rng, -0.05, 0.05),
            "noise_seed": int(rng.integers(0, 2**31 - 1)),
        }
        display = {
            "p_lo": _u(rng, 0.5, 3.0), "p_hi": _u(rng, 99.5, 99.95),
            "drc_alpha": _u(rng, 0.3, 0.8), "drc_sigma_mm": _u(rng, 10.0, 40.0), "detail_beta": _u(rng, 0.2, 1.0),
            "tone_gain": _u(rng, 1.5, 5.0), "tone_center": _u(rng, 0.4, 0.6), "tone_width": _u(rng, 0.8, 1.3),
            "gamma": _u(rng, 0.7, 1.4),
            "monochrome1": bool(rng.random() < 0.5),
            "mislabel_photometric": bool(rng.random() < cfg["mislabel_photometric_probability"]),
            "jpeg_quality": jpeg,
        }
        views[view] = {"pose": pose, "acquisition": acq, "display": display}

    ct = {
        "kvp": 120.0,
        "energy_kev": _u(rng, 62.0, 76.0),
        # age-dependent marrow fat fraction in U(0.3, 0.7) (§1.4)
        "marrow_fat": float(np.clip(_u(rng, 0.3, 0.5) + 0.2 * (age - 40.0) / 50.0, 0.3, 0.7)),
        "noise_hu": _u(rng, 8.0, 20.0),
        # patient-size beam hardening: one offset on the whole scan, N(0, 3) HU (§1.3); it cancels in
        # phantom calibration. Rod position bias per rod: N(0, 1) HU, so that the slope stays
        # within ±2 % (§1.4 acceptance; a per-rod SD of 3 HU would give ≈ 1.5 % slope SD alone)
        "offset_hu": float(rng.normal(0.0, 3.0)),
        "rod_bias_hu": [float(v) for v in rng.normal(0.0, 1.0, 5)],
        "noise_seed": int(rng.integers(0, 2**31 - 1)),
    }
    base_name = str(bases[int(rng.integers(0, len(bases)))].get("name", "base"))
    k = habitus["elastic"]
    habitus["elastic"] = None
    if float(cfg["elastic_mm"]) > 0 and int(cfg["elastic_variants"]) > 0:
        seed = variant_seed(base_name, k)
        # largest displacement of variant k: elastic_mm × U(0.5, 1) drawn from its own seed
        habitus["elastic"] = {"variant": k, "seed": seed,
                              "max_mm": float(cfg["elastic_mm"]) * float(np.random.default_rng(seed).uniform(0.5, 1.0))}
    record = {
        "age": round(age, 2),
        "sex": sex,
        "base": base_name,
        "vertebrae": verts,
        "dxa_g_cm2": dxa,
        "label_noise": label_noise,
        "cortex": cortex,
        "habitus": habitus,
        "views": views,
        "ct": ct,
        "phantom": bool(cfg["phantom"]),
        "labels_in_sheet": bool(rng.random() < cfg["label_fraction"]),
    }
    if cfg.get("fake_identity"):
        record["identity"] = {
            "PatientName": f"{rng.choice(_SURNAMES)}^{rng.choice(_GIVEN)}",
            "PatientBirthDate": f"{int(rng.integers(1930, 1990))}{int(rng.integers(1, 13)):02d}"
                                f"{int(rng.integers(1, 29)):02d}",
        }
    return record


_SURNAMES = ("Doe", "Roe", "Moe", "Poe", "Loe")
_GIVEN = ("Jane", "John", "Alex", "Sam", "Kim")


def derive(record: dict[str, Any], base, cfg: dict[str, Any]) -> dict[str, Any]:
    """Deterministic quantities of a record on a base anatomy (no random draws).

    Inverts each clinical DXA label to the trabecular scale s_v (SIMULATOR.md
    §5.2): the true aBMD must satisfy
    ``dxa = f_xcal · aBMD_true · (1 + ε_p)(1 + ε_a) + art``, and aBMD_true(s)
    is monotone for the base vertebra (:meth:`BaseAnatomy.abmd_inverse`).

    Returns:
        ``{"trabecular_scale": {v: s}, "scale_clipped": {v: bool}, "abmd_target": {v: g/cm²}}``.
    """
    out: dict[str, Any] = {"trabecular_scale": {}, "scale_clipped": {}, "abmd_target": {}}
    xcal = cfg["dxa_model"]["cross_calibration"]
    k = record["habitus"]["body_scale"]
    c = record["cortex"]["coupling"]
    ln = record["label_noise"]
    for vi, v in enumerate(record["vertebrae"]):
        target = (record["dxa_g_cm2"][v] - ln["artefact_g_cm2"][v]) / (
            xcal * (1.0 + ln["precision"][v]) * (1.0 + ln["accuracy"][v]))
        s, clipped = base.abmd_inverse(vi, target, c, record["cortex"]["factor"][v], k, tuple(cfg["scale_range"]))
        out["trabecular_scale"][v] = s
        out["scale_clipped"][v] = clipped
        out["abmd_target"][v] = target
    return out


def t_score(dxa: float, vertebra: str, sex: str, reference: str = tscore.DEFAULT_REFERENCE) -> float:
    """T-score of a DXA value (g/cm²) against a young-adult reference (:mod:`bmdpipe.tscore`)."""
    return tscore.t_score(dxa, vertebra, sex, reference)
