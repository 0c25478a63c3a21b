"""Phantom calibration on CT volumes the test builds: rods found, slope recovered, bad phantoms reported."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from bmdpipe.calibrate import PhantomSpec, apply_calibration, fit_phantom
from bmdpipe.errors import InputError

SPACING = (0.9, 0.9, 2.5)


def phantom_ct(slope=1.35, intercept=4.0, noise=12.0, angle_deg=0.0, shift_mm=(6.0, 0.0), missing=(), reverse=False,
               with_phantom=True, seed=0):
    """Body ellipse with a spine-like bone and soft tissue, a water slab under it with five HA rods (mg/cm³)."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = 12, 320, 360
    y, x = np.mgrid[:ny, :nx].astype(np.float64)
    xm, ym = (x - nx / 2) * SPACING[0], (y - 120) * SPACING[1]
    hu = np.full((ny, nx), -1000.0)
    body = (xm / 150) ** 2 + (ym / 95) ** 2 <= 1
    hu[body] = 40.0
    hu[(xm / 140) ** 2 + (ym / 85) ** 2 > 1] = np.where(body, -90.0, -1000.0)[(xm / 140) ** 2 + (ym / 85) ** 2 > 1]
    hu[np.hypot(xm, ym - 50) < 18] = 250.0  # vertebral body
    if with_phantom:
        y_slab = 95 + 3 + 17  # slab centre, mm below the body's centre row
        a = np.radians(angle_deg)
        along = (xm - shift_mm[0]) * np.cos(a) + (ym - y_slab - shift_mm[1]) * np.sin(a)
        across = -(xm - shift_mm[0]) * np.sin(a) + (ym - y_slab - shift_mm[1]) * np.cos(a)
        hu[(np.abs(along) <= 100) & (np.abs(across) <= 17)] = intercept
        densities = [0.0, 50.0, 100.0, 150.0, 200.0]
        if reverse:
            densities = densities[::-1]
        for i, rho in enumerate(densities):
            d = np.hypot(along - (i - 2) * 40.0, across)
            if i not in missing:
                hu[d <= 7.5] = intercept + slope * rho
    vol = np.repeat(hu[None], nz, axis=0) + rng.normal(0, noise, (nz, ny, nx))
    img = sitk.GetImageFromArray(vol.astype(np.float32))
    img.SetSpacing(SPACING)
    return img


@pytest.mark.parametrize(("slope", "intercept", "angle", "reverse"), [(1.35, 4.0, 0.0, False), (1.17, -8.0, 6.0, False),
                                                                        (1.52, 9.0, -4.0, True)])
def test_slope_within_2_percent_and_rods_where_they_are(slope, intercept, angle, reverse):
    cal = fit_phantom(phantom_ct(slope, intercept, angle_deg=angle, reverse=reverse))
    assert cal.slope_hu_per_mg_cm3 == pytest.approx(slope, rel=0.02)
    assert cal.intercept_hu == pytest.approx(intercept, abs=3.0)
    assert cal.r2 > 0.999 and all(r["used"] for r in cal.rods)
    xs = sorted(r["centre_lps_mm"][0] for r in cal.rods)
    assert np.diff(xs) == pytest.approx([40.0 * np.cos(np.radians(angle))] * 4, abs=1.0)
    density = apply_calibration(phantom_ct(slope, intercept, noise=0.0, angle_deg=angle, reverse=reverse), cal)
    arr = sitk.GetArrayViewFromImage(density)
    assert float(np.median(arr[:, 120 + int(50 / 0.9), 180])) == pytest.approx((250 - intercept) / slope, rel=0.02)


def test_a_missing_rod_is_dropped_and_reported():
    cal = fit_phantom(phantom_ct(1.3, 2.0, missing=(4,)))
    dropped = [r for r in cal.rods if not r["used"]]
    assert [r["density_mg_cm3"] for r in dropped] == [200.0]
    assert "rod missing or damaged" in dropped[0]["why"]
    assert cal.slope_hu_per_mg_cm3 == pytest.approx(1.3, rel=0.02)


def test_too_few_rods_and_no_phantom_are_errors():
    for missing in ((1, 3, 4), (2, 3, 4)):  # two rods left: reported whichever check sees it first
        with pytest.raises(InputError, match=r"(fewer than 3 rods agree with the configured densities|no calibration phantom found)"):
            fit_phantom(phantom_ct(1.3, 2.0, missing=missing))
    # two damaged rods: still three that agree, so the fit stands and says which were dropped
    cal = fit_phantom(phantom_ct(1.3, 2.0, missing=(3, 4)))
    assert sorted(r["density_mg_cm3"] for r in cal.rods if not r["used"]) == [150.0, 200.0]
    with pytest.raises(InputError, match=r"no calibration phantom found"):
        fit_phantom(phantom_ct(with_phantom=False))
    with pytest.raises(InputError, match=r"(no calibration phantom found|outside the plausible range|fewer than 3 rods agree)"):
        fit_phantom(phantom_ct(with_phantom=False), PhantomSpec(min_match=0.2))


def tissue_ct(energy, offset=5.0, ratio=0.8650, lean_density=1.05, subcutaneous_density=0.90, seed=0):
    """Body of lean tissue (ICRU muscle) with deep fat lobules (ICRU adipose composition, density such that
    the fat/lean attenuation ratio at 70 keV is ``ratio``) and a subcutaneous fat layer of another density,
    at the HU of monoenergetic ``energy`` keV, plus a scanner water offset and noise; 1 mm pixels."""
    from bmdpipe import physics

    def hu_of(material, density):
        return 1000.0 * (density * physics.mass_atten(material, energy)[0] / physics.mass_atten("water", energy)[0] - 1)

    fat_density = ratio * lean_density * physics.mass_atten("muscle", 70.0)[0] / physics.mass_atten("adipose", 70.0)[0]
    rng = np.random.default_rng(seed)
    ny, nx = 260, 320
    y, x = np.mgrid[:ny, :nx].astype(np.float64)
    r = np.hypot((x - nx / 2) / 150, (y - ny / 2) / 120)
    hu = np.full((ny, nx), -1000.0)
    hu[r <= 1.0] = hu_of("adipose", subcutaneous_density)
    hu[r <= 0.85] = hu_of("muscle", lean_density)
    lobules = (np.sin(x / 9.0) * np.sin(y / 7.0) > 0.3) & (r <= 0.6)
    hu[lobules] = hu_of("adipose", fat_density)
    hu[np.hypot(x - nx / 2, y - ny / 2 - 40) < 14] = 400.0  # bone
    vol = np.repeat(hu[None], 6, axis=0) + offset + rng.normal(0, 10.0, (6, ny, nx))
    return sitk.GetImageFromArray(np.rint(vol).astype(np.int16))  # integer HU, as CTs store them


@pytest.mark.parametrize("energy", [58.0, 68.0, 78.0])
def test_phantomless_calibration_recovers_the_scanner_energy(energy):
    """Deep fat/lean attenuation ratio at energy E (xraydb tables), flat prior: the slope is b(E)."""
    from bmdpipe import physics
    from bmdpipe.calibrate import PhantomlessSpec, calibrate_phantomless

    cal = calibrate_phantomless(tissue_ct(energy), PhantomlessSpec(energy_prior_sd_kev=1e6))
    assert cal.method == "phantomless"
    assert cal.effective_energy_kev == pytest.approx(energy, abs=1.5)
    assert cal.slope_hu_per_mg_cm3 == pytest.approx(physics.ha_slope(energy), rel=0.04)
    assert cal.intercept_hu == pytest.approx(5.0, abs=1.0)
    assert cal.reference_hu["depth_mm"] == 35.0  # the subcutaneous layer (another fat density) is not used
    # the prior (69 ± 4 keV) pulls a far energy towards it, a near one barely
    prior = calibrate_phantomless(tissue_ct(energy))
    assert abs(prior.effective_energy_kev - 69.0) <= abs(energy - 69.0) + 0.2
    if energy == 68.0:
        assert prior.effective_energy_kev == pytest.approx(68.0, abs=1.0)


def test_tissue_reference_fitted_from_phantom_scans():
    """fit_tissue_reference recovers the fat/lean ratio of scans at known energies from their phantom slopes."""
    from bmdpipe import physics
    from bmdpipe.calibrate import fit_tissue_reference, reference_tissues

    energies = [62.0, 69.0, 75.0]
    tissues = [reference_tissues(tissue_ct(e, ratio=0.87, seed=i)) for i, e in enumerate(energies)]
    fit = fit_tissue_reference(tissues, [physics.ha_slope(e) for e in energies])
    assert fit["fat_lean_ratio"] == pytest.approx(0.87, abs=0.002) and fit["n"] == 3
    with pytest.raises(InputError, match="need ≥ 3 scans"):
        fit_tissue_reference(tissues[:2], [1.3, 1.3])


def test_calibrate_ct_writes_density_summary_and_figure(tmp_path, capsys):
    import json

    from bmdpipe.cli import main as cli

    sitk.WriteImage(phantom_ct(1.3, 2.0), str(tmp_path / "ct.nii.gz"))
    assert cli(["calibrate", str(tmp_path / "ct.nii.gz"), "--out", str(tmp_path / "cal")]) == 0
    summary = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert summary["status"] == "ok" and summary["method"] == "phantom"
    assert summary["slope_hu_per_mg_cm3"] == pytest.approx(1.3, rel=0.02)
    assert (tmp_path / "cal" / "qc.png").stat().st_size > 1000
    density = sitk.GetArrayViewFromImage(sitk.ReadImage(str(tmp_path / "cal" / "bmd.nii.gz")))
    assert float(np.median(density[:, 120 + int(50 / 0.9), 180])) == pytest.approx((250 - 2.0) / 1.3, rel=0.03)
    sitk.WriteImage(phantom_ct(with_phantom=False), str(tmp_path / "plain.nii.gz"))
    assert cli(["calibrate", str(tmp_path / "plain.nii.gz"), "--out", str(tmp_path / "no")]) == 2
    assert "requires a phantom" in capsys.readouterr().err
    assert not (tmp_path / "no" / "calibration.json").exists()
