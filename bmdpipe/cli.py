"""Command-line interface: ``bmdpipe <command> ...``.

Each command runs one stage without Snakemake. Bad input ends with
``bmdpipe: error: <message>`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from bmdpipe import __version__
from bmdpipe.errors import InputError


def _cmd_ingest_ct(args: argparse.Namespace) -> None:
    from bmdpipe.io.ct import ingest_ct

    summary = ingest_ct(args.path, args.out, series_uid=args.series_uid, spacing_tolerance=args.spacing_tolerance)
    print(json.dumps({k: summary[k] for k in ("shape_xyz", "spacing_mm", "kvp", "status")}))


def _cmd_ingest_xray(args: argparse.Namespace) -> None:
    from bmdpipe.io.xray import ingest_xray

    summary = ingest_xray(
        args.path,
        args.out,
        pixel_spacing_mm=args.pixel_spacing,
        sdd_mm=args.sdd,
        apply_voi=args.apply_voi_lut,
    )
    print(json.dumps({k: summary[k] for k in ("shape_rows_cols", "pixel_spacing_mm", "sdd_mm", "status")}))


def _cmd_calibrate(args: argparse.Namespace) -> None:
    from bmdpipe.calibrate import calibrate_ct

    summary = calibrate_ct(args.ct, args.out, method=args.method)
    keys = ("method", "slope_hu_per_mg_cm3", "intercept_hu", "r2", "effective_energy_kev")
    print(json.dumps({k: summary.get(k) for k in keys}))


def _cmd_segment(args: argparse.Namespace) -> None:
    from bmdpipe.segment import segment_ct

    if (args.labels is None) != (args.label_table is None):
        raise InputError("--labels and --label-table go together")
    method = "supplied" if args.labels else "unet" if args.model else "threshold"
    summary = segment_ct(args.ct, args.out, method=method, labels=args.labels, label_table=args.label_table,
                         model_dir=args.model, mc_samples=args.mc_samples, grids=args.grids, device=args.device)
    print(json.dumps({k: summary.get(k) for k in ("method", "classes_present", "uncertainty", "status")}))


def _cmd_train_segmenter(args: argparse.Namespace) -> None:
    from bmdpipe.samples import load_samples
    from bmdpipe.segment_unet import UNetSettings, train_segmenter

    df = load_samples(args.sheet)
    if "ct_labels" not in df:
        raise InputError(f"{args.sheet}: no 'ct_labels' column; the U-Net trains on patients with label maps")
    rows = df.drop_duplicates("patient_id")
    rows = rows[rows.ct_labels.notna()]
    cases = [{"patient_id": r.patient_id, "ct": r.ct, "labels": r.ct_labels, "label_table": r.get("label_table")}
             for _, r in rows.iterrows()]
    cfg = _load_settings(args.config, "segment").get("unet") or {}
    if args.epochs:
        cfg["epochs"] = args.epochs
    summary = train_segmenter(cases, args.out, UNetSettings.from_config(cfg), device=args.device, progress=args.verbose)
    print(json.dumps({k: summary[k] for k in ("patients", "skipped", "train_seconds", "status")}))


def _cmd_roi(args: argparse.Namespace) -> None:
    from bmdpipe.roi import RoiSpec, roi_ct

    spec = RoiSpec.from_config({"sites": args.sites.split(","), "hip": args.hip})
    summary = roi_ct(args.density, args.labels, args.out, spec=spec)
    print(json.dumps({"vertebrae": {v: e.get("abmd_g_cm2") for v, e in summary["vertebrae"].items()},
                      "total_abmd_g_cm2": summary["total"]["abmd_g_cm2"],
                      "hips": {s: h.get("abmd_g_cm2") for s, h in summary["hips"].items()}}))


def _cmd_validate_samples(args: argparse.Namespace) -> None:
    from bmdpipe.samples import load_samples, patients

    df = load_samples(args.sheet, check_paths=not args.no_check_paths)
    print(f"{args.sheet}: {len(df)} radiographs of {len(patients(df))} patients, valid")


def _cmd_demo_data(args: argparse.Namespace) -> None:
    from bmdpipe.datasets import build_public_demo

    print(build_public_demo(args.out, cache=args.cache))


def _cmd_simulate(args: argparse.Namespace) -> None:
    from bmdpipe.simulate import simulate_cohort

    cfg: dict = {"n_patients": args.n, "seed": args.seed}
    if args.no_phantom:
        cfg["phantom"] = False
    if args.cache:
        cfg["cache_dir"] = args.cache
    print(simulate_cohort(args.out, cfg))


def _load_settings(path: str | None, key: str) -> dict:
    """The ``key`` block of a config YAML file (empty without a file)."""
    if not path:
        return {}
    import yaml

    with open(path) as fh:
        return dict((yaml.safe_load(fh) or {}).get(key) or {})


def _cmd_register(args: argparse.Namespace) -> None:
    from bmdpipe.register import RegistrationSettings, register_patient

    settings = RegistrationSettings.from_config(_load_settings(args.config, "register"))
    summaries = register_patient(args.xray, args.ct, args.out, settings, segment_dir=args.segment,
                                 patient=args.patient, on_error="fail")
    print(json.dumps({v: {k: s.get(k) for k in ("status", "similarity", "evaluations", "seconds", "reason")}
                      for v, s in summaries.items()}))


def _cmd_targets(args: argparse.Namespace) -> None:
    from bmdpipe.targets import TargetSettings, targets_patient

    settings = TargetSettings.from_config(_load_settings(args.config, "targets"))
    summary = targets_patient(args.register, args.xray, args.calibration, args.segment, args.roi, args.out, settings,
                              patient=args.patient)
    print(json.dumps({k: summary[k] for k in ("views", "excluded", "status")}))


def _cmd_predict(args: argparse.Namespace) -> None:
    import torch

    from bmdpipe.predict import predict_files

    torch.set_num_threads(args.threads)
    table = predict_files(args.model, args.files, args.out, images_dir=args.images, sex=args.sex, device=args.device)
    ok = table[table.status == "ok"]
    print(json.dumps({"files": len(args.files), "errors": int(table[table.status == "error"].file.nunique()),
                      "flagged": int(ok[ok.quality == "flagged"].file.nunique()), "out": args.out}))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``bmdpipe`` command."""
    parser = argparse.ArgumentParser(prog="bmdpipe", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"bmdpipe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest-ct", help="DICOM series folder or NIfTI → NIfTI in HU plus a JSON summary")
    p.add_argument("path", help="DICOM series folder or .nii/.nii.gz file")
    p.add_argument("--out", required=True, help="output .nii.gz; the summary goes to the same name with .json")
    p.add_argument("--series-uid", help="SeriesInstanceUID to read when the folder holds several series")
    p.add_argument("--spacing-tolerance", type=float, default=0.01,
                   help="largest relative deviation of a slice gap from the median (default 0.01)")
    p.set_defaults(func=_cmd_ingest_ct)

    p = sub.add_parser("ingest-xray", help="radiograph (DICOM CR/DX, PNG, JPEG, TIFF) → float NIfTI plus a JSON summary")
    p.add_argument("path", help="radiograph file")
    p.add_argument("--out", required=True, help="output .nii.gz; the summary goes to the same name with .json")
    p.add_argument("--pixel-spacing", type=float, help="detector pixel pitch in mm (overrides the file)")
    p.add_argument("--sdd", type=float, help="source-to-detector distance in mm (overrides the file)")
    p.add_argument("--apply-voi-lut", action="store_true", help="apply the file's VOI LUT or window")
    p.set_defaults(func=_cmd_ingest_xray)

    p = sub.add_parser("calibrate", help="CT in HU (NIfTI) → mg/cm³ hydroxyapatite, by phantom or phantomless")
    p.add_argument("ct", help="ingested CT, .nii.gz in HU")
    p.add_argument("--out", required=True, help="output folder: bmd.nii.gz, calibration.json, qc.png")
    p.add_argument("--method", choices=["phantom", "phantomless", "auto"], default="phantom",
                   help="phantom (required, default), phantomless, or auto (phantom if found)")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("segment", help="bone labels (bmdpipe scheme) and uncertainty for a CT: supplied map, U-Net or threshold")
    p.add_argument("ct", help="CT in HU: an ingested CT folder (ct.nii.gz), a NIfTI file or a DICOM series folder")
    p.add_argument("out", help="output folder: labels.nii.gz, uncertainty.nii.gz, segment.json, qc.png")
    p.add_argument("--labels", help="a label map in any scheme (with --label-table): translated and resampled")
    p.add_argument("--label-table", help="value → name table of --labels (value,name or TotalSegmentator's id,structure)")
    p.add_argument("--model", help="a trained segmenter folder (bmdpipe train-segmenter): U-Net with MC dropout")
    p.add_argument("--mc-samples", type=int, help="MC-dropout passes, all grids together (default: the model's)")
    p.add_argument("--grids", type=int, help="shifted working grids the passes are spread over (default: the model's)")
    p.add_argument("--device", default="cpu", help="torch device of the U-Net: cpu, cuda, auto (default cpu)")
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser("train-segmenter", help="train the segmentation U-Net on the sheet's patients with label maps")
    p.add_argument("sheet", help="samples sheet with columns ct, ct_labels, label_table")
    p.add_argument("out", help="model folder: model.pt, training.json, metrics.csv, last.pt (a rerun resumes)")
    p.add_argument("--config", help="config YAML whose segment.unet block sets the U-Net (defaults otherwise)")
    p.add_argument("--epochs", type=int, help="training epochs (overrides the config)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, auto (default cpu)")
    p.set_defaults(func=_cmd_train_segmenter)

    p = sub.add_parser("roi", help="DXA regions (vertebral sites, proximal femur) and areal BMD from a calibrated CT")
    p.add_argument("density", help="calibrated CT, mg/cm³ HA (bmd.nii.gz of 'bmdpipe calibrate')")
    p.add_argument("labels", help="bone label map on the same grid (labels.nii.gz of the segment stage)")
    p.add_argument("--out", required=True, help="output folder: roi.nii.gz, core.nii.gz, abmd.json, qc.png")
    p.add_argument("--sites", default="L1,L2,L3,L4", help="comma-separated DXA vertebrae (default L1,L2,L3,L4)")
    p.add_argument("--hip", choices=["auto", "off", "required"], default="auto",
                   help="proximal-femur ROI of each femur labelled (default auto)")
    p.set_defaults(func=_cmd_roi)

    p = sub.add_parser("validate-samples", help="check a samples sheet against its schema")
    p.add_argument("sheet", help="samples sheet, TSV or CSV")
    p.add_argument("--no-check-paths", action="store_true", help="do not require the referenced files to exist")
    p.set_defaults(func=_cmd_validate_samples)

    p = sub.add_parser("demo-data", help="write the public demo cohort (real public CT and radiograph files)")
    p.add_argument("out", help="output folder")
    p.add_argument("--cache", help="download cache (default ~/.cache/bmdpipe)")
    p.set_defaults(func=_cmd_demo_data)

    p = sub.add_parser("simulate", help="write a virtual cohort: DICOM CT series, radiographs, samples.tsv, truth")
    p.add_argument("--n", type=int, default=8, help="number of virtual patients (default 8)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed: the same seed gives identical files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-phantom", action="store_true", help="CT without the calibration phantom")
    p.add_argument("--cache", help="download and base-anatomy cache (default ~/.cache/bmdpipe)")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("register", help="register a patient's ingested radiographs to its CT (gradient correlation, CMA-ES)")
    p.add_argument("xray", help="folder of ingested radiographs ({view}.nii.gz + {view}.json)")
    p.add_argument("ct", help="folder of the ingested CT (ct.nii.gz + ct.json)")
    p.add_argument("--out", required=True, help="output folder: {view}.json (pose, similarity, status) and qc.png")
    p.add_argument("--segment", help="folder of the segment stage (labels.nii.gz) to centre on the target vertebrae")
    p.add_argument("--patient", default="", help="patient id written into the summaries")
    p.add_argument("--config", help="config YAML whose 'register' block sets the search (default settings otherwise)")
    p.set_defaults(func=_cmd_register)

    p = sub.add_parser("targets", help="bone and clinical-ROI projections (g/cm²) in each registered pose, plus the radiograph")
    p.add_argument("register", help="folder written by 'bmdpipe register'")
    p.add_argument("xray", help="folder of ingested radiographs")
    p.add_argument("calibration", help="folder written by 'bmdpipe calibrate' (bmd.nii.gz)")
    p.add_argument("segment", help="folder of the segment stage (labels.nii.gz: bmdpipe bone labels on the CT grid)")
    p.add_argument("--roi", help="folder of the roi stage (roi.nii.gz); without it the ROI targets are empty")
    p.add_argument("--out", required=True, help="output folder: {view}.npz, {view}_qc.png, targets.json")
    p.add_argument("--patient", default="", help="patient id written into the summary")
    p.add_argument("--config", help="config YAML whose 'targets' block sets the field and size")
    p.set_defaults(func=_cmd_targets)

    p = sub.add_parser("predict", help="BMD, T-score, class and a quality flag for new radiographs (no CT needed)")
    p.add_argument("files", nargs="+", metavar="FILE", help="radiographs: DICOM, PNG, JPEG or TIFF")
    p.add_argument("--model", required=True, help="model bundle folder (results/model of a pipeline run)")
    p.add_argument("--out", required=True, help="CSV: one row per file and BMD column")
    p.add_argument("--images", help="folder for the decomposed images (default: OUT without .csv + _images)")
    p.add_argument("--sex", choices=["F", "M"], help="T-score reference sex (default: PatientSex (0010,0040), else F)")
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.set_defaults(func=_cmd_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except InputError as exc:
        print(f"bmdpipe: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
