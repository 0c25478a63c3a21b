"""T-scores from young-adult DXA reference tables (per reference, sex and site).

T = (aBMD − μ_YA) / SD_YA with a sex-matched young-adult reference of the same
manufacturer and region (SIMULATOR.md §3.2). WHO classes: T ≤ −2.5
osteoporosis, −2.5 < T < −1 osteopenia, T ≥ −1 normal.

Tables (g/cm², mean and SD per sex and vertebra):

``seed000`` (the default)
    Derived from the class ranges of Wang et al. (seed 000, §IV-A-3), whose
    DXA labels are the ones the virtual cohort imitates: the osteopenia range
    of L1 is 0.81 ± 0.08 g/cm², i.e. T = −2.5 at 0.73 and T = −1 at 0.89, so
    SD = 0.16 / 1.5 = 0.107 and μ = 0.89 + 0.107 = 0.997. Likewise L2 (0.85),
    L3 (0.90), L4 (0.88). The paper pools both sexes, so the table does too.
    T12 is not tabulated anywhere here: L1 × 0.95 with L1's SD
    ([unverified, conventional] T12 ≈ L1 − 3…5 %). With this table the
    seed's class means (L1: 1.00 / 0.81 / 0.65) and prevalences
    (51 / 38 / 11 %) are mutually consistent.
``biology_direct_2025``
    Chinese young-adult cohort per vertebra and sex (SIMULATOR.md §3.2,
    Biology Direct 2025 Table 1); T12 as above. Its L1 T = −2.5 falls at
    0.640 (women) and 0.692 g/cm² (men), so an L1 osteoporosis class can
    never average 0.65 g/cm² under it at realistic prevalence: seed 000 did
    not use this table.

A user's own table (e.g. their DXA manufacturer's) is given in config as
``{sex: {site: [mean, sd]}}`` and used through :func:`reference_table`.
"""

from __future__ import annotations

from typing import Any, Mapping

#: Osteopenia half-width of seed 000's class ranges → SD = 2·0.08/1.5 (g/cm²).
_SEED000_SD = round(2 * 0.08 / 1.5, 4)
_SEED000_MEAN = {v: round(c + 0.08 + _SEED000_SD, 4) for v, c in
                 (("L1", 0.81), ("L2", 0.85), ("L3", 0.90), ("L4", 0.88))}
_SEED000 = {v: (m, _SEED000_SD) for v, m in _SEED000_MEAN.items()}
_SEED000["T12"] = (round(0.95 * _SEED000_MEAN["L1"], 4), _SEED000_SD)

REFERENCES: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    "seed000": {"F": dict(_SEED000), "M": dict(_SEED000)},
    "biology_direct_2025": {
        "M": {"T12": (0.949, 0.123), "L1": (0.999, 0.123), "L2": (1.073, 0.127), "L3": (1.081, 0.129),
              "L4": (1.071, 0.127)},
        "F": {"T12": (0.912, 0.128), "L1": (0.960, 0.128), "L2": (1.064, 0.128), "L3": (1.100, 0.127),
              "L4": (1.086, 0.121)},
    },
}
DEFAULT_REFERENCE = "seed000"

#: WHO thresholds on T.
OSTEOPOROSIS_T = -2.5
OSTEOPENIA_T = -1.0


def reference_table(reference: str | Mapping[str, Any] = DEFAULT_REFERENCE) -> dict[str, dict[str, tuple[float, float]]]:
    """A reference by name (:data:`REFERENCES`) or a user table ``{sex: {site: (mean, sd)}}``."""
    if isinstance(reference, str):
        if reference not in REFERENCES:
            raise KeyError(f"unknown T-score reference {reference!r}; known: {sorted(REFERENCES)}")
        return REFERENCES[reference]
    return {sex: {site: (float(ms[0]), float(ms[1])) for site, ms in sites.items()}
            for sex, sites in reference.items()}


def t_score(abmd_g_cm2: float, site: str, sex: str,
            reference: str | Mapping[str, Any] = DEFAULT_REFERENCE) -> float:
    """T-score (SD units) of an areal BMD (g/cm²) at ``site`` (e.g. ``"L1"``) for ``sex`` (``"F"``/``"M"``)."""
    table = reference_table(reference)
    try:
        mu, sd = table[sex][site]
    except KeyError:
        raise KeyError(f"T-score reference has no entry for sex {sex!r}, site {site!r}") from None
    return (abmd_g_cm2 - mu) / sd


def who_class(t: float) -> str:
    """``"osteoporosis"`` (T ≤ −2.5), ``"osteopenia"`` (−2.5 < T < −1) or ``"normal"``."""
    if t <= OSTEOPOROSIS_T:
        return "osteoporosis"
    if t < OSTEOPENIA_T:
        return "osteopenia"
    return "normal"
