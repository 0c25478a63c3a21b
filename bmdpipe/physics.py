"""Physics tables: X-ray spectra, attenuation of tissues and hydroxyapatite, the HU model (simulator and calibration).

Every constant is named here with its source (SIMULATOR.md section and the
reference it cites). Energies are in keV, mass attenuation coefficients in
cm²/g, densities in g/cm³, HA concentrations in g/cm³ unless a name says mg.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

#: Nominal effective energy used to decompose the base CT (SIMULATOR.md §1.1,
#: [phys]: b = 1.307 HU per mg/cm³ HA at 70 keV).
E_NOMINAL_KEV = 70.0
#: Hydroxyapatite crystal density, g/cm³ (SIMULATOR.md §1.1: volume displacement at 3.16).
HA_DENSITY = 3.16
HA_FORMULA = "Ca5(PO4)3OH"
#: HU of adipose tissue and skeletal muscle at 70 keV (SIMULATOR.md §1.1 table [phys]):
#: the end points of the soft-tissue muscle fraction (§1.5 step 5).
HU_ADIPOSE_70 = -76.0
HU_MUSCLE_70 = 43.0
#: Water-equivalent density of an added fat layer (SIMULATOR.md §4.7).
FAT_LAYER_DENSITY = 0.92
#: CsI(Tl) scintillator, 600 µm, packing/fill factor 0.8 (SIMULATOR.md §4.3).
CSI_DENSITY = 4.51
CSI_THICKNESS_CM = 0.06
CSI_FILL = 0.8
#: Swank factor of a CsI flat panel, applied as a noise inflation (SIMULATOR.md §4.3).
SWANK = 1.1
#: Native detector pitch that the exposure N0 refers to, mm (SIMULATOR.md §4.5).
NATIVE_PITCH_MM = 0.143
#: Anti-scatter grid (10:1) transmissions of primary and scatter (SIMULATOR.md §4.4 [unverified]).
GRID_PRIMARY_TRANSMISSION = 0.70
GRID_SCATTER_TRANSMISSION = 0.12
#: Lowest spectrum energy kept, keV (SIMULATOR.md §4.2: bins from 15 keV to the kVp).
SPECTRUM_MIN_KEV = 15.0
#: Tungsten anode angle, degrees (SIMULATOR.md §4.2).
ANODE_ANGLE_DEG = 12.0

#: Elemental mass fractions and densities of body tissues.
#: Source: ICRU Report 44 (1989) / ICRU Report 46 (1992) tissue compositions
#: (adipose tissue as ICRP 23 / ICRU 46 "adipose tissue 3"); water by formula.
TISSUES: dict[str, tuple[float, dict[str, float]]] = {
    "adipose": (0.95, {"H": 0.114, "C": 0.598, "N": 0.007, "O": 0.278, "Na": 0.001, "S": 0.001, "Cl": 0.001}),
    "muscle": (1.05, {"H": 0.102, "C": 0.143, "N": 0.034, "O": 0.710, "Na": 0.001, "P": 0.002, "S": 0.003,
                      "Cl": 0.001, "K": 0.004}),
    "red_marrow": (1.03, {"H": 0.105, "C": 0.414, "N": 0.034, "O": 0.439, "P": 0.001, "S": 0.002, "Cl": 0.002,
                          "K": 0.002, "Fe": 0.001}),
    "yellow_marrow": (0.98, {"H": 0.115, "C": 0.644, "N": 0.007, "O": 0.231, "Na": 0.001, "S": 0.001, "Cl": 0.001}),
    "blood": (1.06, {"H": 0.102, "C": 0.110, "N": 0.033, "O": 0.745, "Na": 0.001, "P": 0.001, "S": 0.002,
                     "Cl": 0.003, "K": 0.002, "Fe": 0.001}),
}


def _as_tuple(energies_kev) -> tuple[float, ...]:
    return tuple(float(e) for e in np.atleast_1d(energies_kev))


@lru_cache(maxsize=256)
def _mass_atten_cached(material: str, energies: tuple[float, ...]) -> np.ndarray:
    import xraydb

    e_ev = np.asarray(energies) * 1000.0
    if material == "water":
        return np.asarray(xraydb.material_mu("H2O", e_ev, density=1.0), dtype=np.float64)
    if material == "ha":
        return np.asarray(xraydb.material_mu(HA_FORMULA, e_ev, density=HA_DENSITY), dtype=np.float64) / HA_DENSITY
    if material == "csi":
        return np.asarray(xraydb.material_mu("CsI", e_ev, density=CSI_DENSITY), dtype=np.float64) / CSI_DENSITY
    if material in TISSUES:
        _, fractions = TISSUES[material]
        total = sum(fractions.values())
        return sum(w / total * np.asarray(xraydb.mu_elam(el, e_ev), dtype=np.float64) for el, w in fractions.items())
    raise KeyError(f"unknown material {material!r}")


def mass_atten(material: str, energies_kev) -> np.ndarray:
    """Total mass attenuation coefficient (cm²/g) of ``material`` at ``energies_kev`` (shape (n,)).

    Materials: ``water``, ``ha`` (hydroxyapatite), ``csi`` and the tissues of
    :data:`TISSUES`; values from xraydb (Elam tables).
    """
    return _mass_atten_cached(material, _as_tuple(energies_kev)).copy()


def ha_slope(e_kev: float) -> float:
    """QCT slope b(E) in HU per mg/cm³ HA for HA dispersed in water (SIMULATOR.md §1.1).

    HU = 1000·ρ·(μ/ρ_HA − μ/ρ_w / 3.16)/(μ/ρ_w) with ρ in g/cm³, i.e.
    b = (μ/ρ_HA − μ/ρ_w/3.16)/(μ/ρ_w) per mg/cm³ (1.307 at 70 keV).
    """
    m_w = float(mass_atten("water", e_kev)[0])
    m_ha = float(mass_atten("ha", e_kev)[0])
    return (m_ha - m_w / HA_DENSITY) / m_w


def tissue_hu(name: str, e_kev: float) -> float:
    """HU of an ICRU tissue at its nominal density at monoenergetic ``e_kev``."""
    rho, _ = TISSUES[name]
    m_w = float(mass_atten("water", e_kev)[0])
    return 1000.0 * (rho * float(mass_atten(name, e_kev)[0]) - m_w) / m_w


#: Folder of the spekpy spectrum disk cache; None: ``bmdpipe.datasets.cache_root()/simulate/spectra``.
_SPECTRA_DIR: list[Path | None] = [None]


def set_cache_dir(cache_dir: str | os.PathLike[str] | None) -> None:
    """Put the spectrum disk cache under ``cache_dir`` (the cohort's ``cache_dir``); None: the default root."""
    _SPECTRA_DIR[0] = None if cache_dir is None else Path(cache_dir) / "simulate" / "spectra"


@lru_cache(maxsize=64)
def _spectrum_cached(kvp: float, al_mm: float, cu_mm: float) -> tuple[np.ndarray, np.ndarray]:
    # read-through disk cache: spekpy takes ≈ 0.6 s per spectrum
    import spekpy

    from bmdpipe.datasets import cache_root
    from bmdpipe.io.atomic import atomic_path

    folder = _SPECTRA_DIR[0] or cache_root() / "simulate" / "spectra"
    path = folder / f"spekpy{spekpy.__version__}_{kvp:g}kV_{al_mm:g}Al_{cu_mm:g}Cu.npy"
    if path.exists():
        table = np.load(path)
        return table[0], table[1]
    spec = spekpy.Spek(kvp=kvp, th=ANODE_ANGLE_DEG, dk=1.0)
    spec.filter("Al", al_mm)
    if cu_mm > 0:
        spec.filter("Cu", cu_mm)
    energies, fluence = spec.get_spectrum()
    keep = energies >= SPECTRUM_MIN_KEV
    table = np.stack([np.asarray(energies[keep], dtype=np.float64), np.asarray(fluence[keep], dtype=np.float64)])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, table)
    return table[0], table[1]


def spectrum(kvp: float, al_mm: float, cu_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Tube spectrum from spekpy 2.5.4 (tungsten, 12° anode, 1 keV bins from 15 keV).

    Returns:
        ``(energies_kev, fluence)``, both shape (n,); fluence in photons per
        cm² per mAs per keV at 1 m (only its shape matters here).
    """
    e, f = _spectrum_cached(float(kvp), float(al_mm), float(cu_mm))
    return e.copy(), f.copy()


def detector_efficiency(energies_kev) -> np.ndarray:
    """CsI(Tl) absorption efficiency η(E) = 1 − exp(−μ_CsI·t·fill), shape (n,) (SIMULATOR.md §4.3)."""
    mu = mass_atten("csi", energies_kev) * CSI_DENSITY
    return 1.0 - np.exp(-mu * CSI_THICKNESS_CM * CSI_FILL)


def beam_weights(kvp: float, al_mm: float, cu_mm: float) -> dict[str, np.ndarray]:
    """Everything the radiograph model needs for one beam, all shape (n,).

    Keys: ``energies`` (keV), ``w_energy`` (Φ·η·E, energy-integrating detector
    weight, normalised to sum 1), ``w_quanta`` (Φ·η, normalised), ``mu_water``
    and ``mu_ha`` (mass attenuation, cm²/g).
    """
    e, phi = spectrum(kvp, al_mm, cu_mm)
    eta = detector_efficiency(e)
    we = phi * eta * e
    wq = phi * eta
    return {
        "energies": e,
        "w_energy": we / we.sum(),
        "w_quanta": wq / wq.sum(),
        "mu_water": mass_atten("water", e),
        "mu_ha": mass_atten("ha", e),
    }
