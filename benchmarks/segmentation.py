"""Trained bone segmentation on the virtual cohort: Dice per vertebra and uncertainty AUROC on held-out patients.

    python benchmarks/segmentation.py [--patients 44] [--seed 11] [--cohort DIR] [--threads 1]
                                      [--train N] [--epochs N] [--mc-samples N] [--max-test N]
                                      [--grids N [N ...]] [--save-labels DIR]

Simulates a cohort (bmdpipe.simulate, default settings; or uses --cohort, a
folder the simulator wrote), trains the segmentation U-Net
(bmdpipe.segment_unet, default settings) on the patients whose sheet row
has a label map (the first --train of them; the rest join the test set),
exactly as the workflow's rule train_segmenter does, and segments every
other patient with MC dropout. Against the simulator's truth
labels on each CT grid it prints, per held-out patient and summarised: Dice
of each vertebra class (T12, L1, L2, L3 by default) and of all bone, and
the AUROC of the uncertainty map (predictive entropy; mutual information
beside it) as a score for "voxel misclassified", over voxels within 5 mm of
bone (truth or predicted) and over the whole field. Also the training
seconds, the inference seconds per patient (median) and the machine.
With several --grids (e.g. 1 2), every held-out patient is segmented once per
number of shifted working grids, by the same model and the same MC passes in all.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=44, help="cohort size (about 30 %% get label maps)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--cohort", help="an existing simulated cohort folder instead of simulating one")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--train", type=int, help="train on at most this many labelled patients (default all)")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the U-Net's default)")
    parser.add_argument("--mc-samples", type=int, help="MC-dropout passes (default: the U-Net's default)")
    parser.add_argument("--max-test", type=int, help="segment at most this many held-out patients")
    parser.add_argument("--grids", type=int, nargs="+",
                        help="shifted working grids at inference, one evaluation per value (default: the U-Net's)")
    parser.add_argument("--save-labels", type=Path,
                        help="write each held-out patient's label map (the last --grids setting) to "
                             "DIR/{pid}/labels.nii.gz, as the segment stage does (for benchmarks/ct_side.py --labels)")
    parser.add_argument("--model-dir", help="keep the trained model here; one already there (model.pt) is reused")
    args = parser.parse_args()

    import SimpleITK as sitk
    import torch

    from bmdpipe.io.ct import read_ct
    from bmdpipe.samples import load_samples
    from bmdpipe.segment import labels_from_map, read_label_table
    from bmdpipe.segment_unet import UNetSettings, evaluate, load_segmenter, predict, train_segmenter
    from bmdpipe.simulate import simulate_cohort, truth_labels

    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}")
    settings = UNetSettings(**({"epochs": args.epochs} if args.epochs else {}))
    with tempfile.TemporaryDirectory() as tmp:
        if args.cohort:
            root = Path(args.cohort)
        else:
            root = Path(tmp) / "cohort"
            t0 = time.perf_counter()
            simulate_cohort(root, {"n_patients": args.patients, "seed": args.seed})
            print(f"simulated {args.patients} patients (seed {args.seed}) in {time.perf_counter() - t0:.0f} s")
        sheet = load_samples(root / "samples.tsv").drop_duplicates("patient_id")
        labelled = sheet[sheet.ct_labels.notna()] if "ct_labels" in sheet else sheet.iloc[:0]
        labelled = labelled.iloc[: args.train]
        held_out = [p for p in sheet.patient_id if p not in set(labelled.patient_id)][: args.max_test]
        cases = [{"patient_id": r.patient_id, "ct": r.ct, "labels": r.ct_labels, "label_table": r.label_table}
                 for r in labelled.itertuples()]
        print(f"training on {len(cases)} labelled patients, testing on {len(held_out)}")
        model_dir = Path(args.model_dir) if args.model_dir else Path(tmp) / "model"
        if (model_dir / "model.pt").exists():
            summary = json.loads((model_dir / "training.json").read_text())
            print(f"reusing the model in {model_dir}")
        else:
            summary = train_segmenter(cases, model_dir, settings)
        print(f"training: {summary['prepare_seconds']:.0f} s reading and resampling, {summary['train_seconds']:.0f} s "
              f"for {settings.epochs * settings.steps_per_epoch} steps of {settings.batch_size} slices; "
              f"loss {summary['loss_per_epoch'][0]:.3f} -> {summary['loss_per_epoch'][-1]:.3f}")
        model = load_segmenter(model_dir)
        table = read_label_table(root / "labels" / "structures.csv")
        grid_counts = args.grids or [settings.inference_grids]
        rows: dict[int, list[dict]] = {g: [] for g in grid_counts}
        infos = {}
        for pid in held_out:
            ct, _ = read_ct(root / "ct" / pid)
            truth, _ = labels_from_map(truth_labels(root, pid), table, ct)
            for g in grid_counts:
                t0 = time.perf_counter()
                pred, unc, info = predict(model, ct, mc_samples=args.mc_samples, grids=g, with_mutual_information=True)
                seconds = time.perf_counter() - t0
                infos[g] = info
                ev = evaluate(pred, truth, unc, settings.vertebrae)
                mi = sitk.GetImageFromArray(info["mutual_information"])
                mi.CopyInformation(ct)
                ev_mi = evaluate(pred, truth, mi, settings.vertebrae)
                rows[g].append({**ev, "auroc_band_mi": ev_mi["auroc_band"], "seconds": seconds})
                if args.save_labels and g == grid_counts[-1]:
                    (args.save_labels / pid).mkdir(parents=True, exist_ok=True)
                    sitk.WriteImage(pred, str(args.save_labels / pid / "labels.nii.gz"))
                dice = " ".join(f"{v} {d:.3f}" for v, d in ev["dice"].items())
                print(f"  {pid} ({info['grids']} grid(s)): Dice {dice}, bone {ev['dice_bone']:.3f}; AUROC band "
                      f"{ev['auroc_band']:.3f} (MI {ev_mi['auroc_band']:.3f}), field {ev['auroc_field']:.3f}; "
                      f"{seconds:.1f} s", flush=True)

    for g in grid_counts:
        _summary(rows[g], infos[g], settings)
    print(f"train {summary['train_seconds']:.0f} s (+ {summary['prepare_seconds']:.0f} s preparing "
          f"{len(cases)} patients)")


def _summary(rows: list[dict], info: dict, settings) -> None:
    print(f"\nheld-out patients: {len(rows)}; MC samples {info['mc_samples']} over {info['grids']} working grid(s) "
          f"of {info['working_spacing_mm']} mm (x, y, z)")
    for v in settings.vertebrae:
        d = np.array([r["dice"][v] for r in rows if v in r["dice"]])
        if d.size:
            print(f"Dice {v:>4}: mean {d.mean():.3f}, min {d.min():.3f}, SD {d.std(ddof=1) if d.size > 1 else 0:.3f}, "
                  f"patients >= 0.90: {(d >= 0.9).sum()}/{d.size}")
    bone = np.array([r["dice_bone"] for r in rows])
    print(f"Dice all bone: mean {bone.mean():.3f}, min {bone.min():.3f}")
    for key, what in (("auroc_band", "entropy, voxels within 5 mm of bone"),
                      ("auroc_band_mi", "mutual information, same voxels"),
                      ("auroc_field", "entropy, whole field")):
        a = np.array([r[key] for r in rows])
        print(f"AUROC ({what}): mean {np.nanmean(a):.3f}, min {np.nanmin(a):.3f}")
    print(f"error fraction in the band: mean {np.mean([r['error_fraction_band'] for r in rows]):.3f}")
    print(f"inference {statistics.median(r['seconds'] for r in rows):.1f} s per patient (median)")


if __name__ == "__main__":
    main()
