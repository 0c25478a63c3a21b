"""Seconds per radiograph of `bmdpipe predict`, on the real chest CR RG1 (pydicom-data) and virtual radiographs.

Usage (after `make demo`, which writes the bundle results/model):

    .venv/bin/python benchmarks/predict.py --model results/model --cohort resources/virtual_cohort

Times the whole per-file path of bmdpipe.predict.predict_files (read and decode the file, localise, every
fold's generator, BMD fit and stage-3 regressor, quality flags, the decomposed image's PNG and NPZ, the CSV)
on one file at a time, `--repeats` times; loading the bundle is timed apart (once per command). Prints the
median seconds per radiograph and what predict said about each file.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import machine, peak_rss_mb, timed  # noqa: E402
from bmdpipe.datasets import pydicom_data_file  # noqa: E402
from bmdpipe.predict import Predictor, predict_files  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="results/model")
    ap.add_argument("--cohort", default="resources/virtual_cohort", help="virtual cohort folder (its xray/*.dcm)")
    ap.add_argument("--virtual", type=int, default=4, help="virtual radiographs to time")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    files = {"RG1_UNCR (real CR, 1955x1841, uncompressed)": pydicom_data_file("RG1_UNCR.dcm"),
             "RG1_J2KR (real CR, JPEG 2000)": pydicom_data_file("RG1_J2KR.dcm")}
    for f in sorted(Path(args.cohort, "xray").glob("*.dcm"))[:args.virtual]:
        files[f"virtual {f.stem}"] = f
    load, _ = timed(lambda: Predictor(args.model), 3)
    print(f"machine: {machine()}; torch threads {args.threads}")
    print(f"bundle {args.model}: load {load:.2f} s (median of 3; once per command)")
    print(f"{'radiograph':48s} {'median s':>9s} {'min s':>7s} {'quality':>8s}  first BMD and flags")
    predictor = Predictor(args.model)
    medians = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in files.items():
            med, times = timed(lambda path=path: predict_files(predictor, [path], Path(tmp) / "out.csv"), args.repeats)
            medians.append(med)
            row = pd.read_csv(Path(tmp) / "out.csv").iloc[0]
            note = f"{row['column']} {row['bmd']:.3f} {row['unit']}; {row['reasons'] if row['quality'] == 'flagged' else 'no flag'}" \
                if row["status"] == "ok" else row["error"]
            print(f"{name:48s} {med:9.3f} {min(times):7.3f} {str(row['quality']):>8s}  {note}")
    print(f"median over radiographs: {statistics.median(medians):.3f} s per radiograph (goal <= 2 s); "
          f"peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
