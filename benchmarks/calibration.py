"""CT calibration on the virtual cohort: slope and vBMD errors against the simulator's truth.

    python benchmarks/calibration.py [--patients 30] [--seed 7]

Simulates the patients (bmdpipe.simulate, default settings), ingests each CT
through the DICOM reader, calibrates it with the phantom and phantomless, and
prints per-method errors: the slope against the scanner's true slope, and the
L1 trabecular vBMD before the marrow-fat term against the true vBMD. The L1
ROI here is the simulator's QCT ROI (its mean HU without the fat term comes
from truth/), so the figure isolates calibration error; the pipeline's own
ROI stage is not used. Also the seconds per calibration (median) and the machine.
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

from bmdpipe.calibrate import calibrate_phantomless, fit_phantom  # noqa: E402
from bmdpipe.io.ct import read_ct  # noqa: E402
from bmdpipe.simulate import simulate_cohort  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=30)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        simulate_cohort(root, {"n_patients": args.patients, "seed": args.seed})
        for truth_file in sorted((root / "truth").glob("sim*.json")):
            truth = json.loads(truth_file.read_text())
            pid = truth_file.stem
            hu, _ = read_ct(root / "ct" / pid)
            start = time.perf_counter()
            phantom = fit_phantom(hu)
            seconds = time.perf_counter() - start
            internal = calibrate_phantomless(hu)
            q = truth["qct"]
            hu_nofat = q["intercept_hu"] + q["slope_hu_per_mg_cm3"] * q["vbmd_l1_nofat_mg_cm3"]  # L1 ROI mean, no fat
            true_vbmd = truth["vertebrae"]["L1"]["vbmd_true_mg_cm3"]
            vbmd_phantom = (hu_nofat - phantom.intercept_hu) / phantom.slope_hu_per_mg_cm3
            vbmd_internal = (hu_nofat - internal.intercept_hu) / internal.slope_hu_per_mg_cm3
            rows.append({
                "slope_err_pct": 100 * (phantom.slope_hu_per_mg_cm3 / q["slope_true_hu_per_mg_cm3"] - 1),
                "vbmd_err": vbmd_phantom - true_vbmd,
                "internal_slope_err_pct": 100 * (internal.slope_hu_per_mg_cm3 / q["slope_true_hu_per_mg_cm3"] - 1),
                "internal_vs_phantom": vbmd_internal - vbmd_phantom,
                "rods_used": sum(r["used"] for r in phantom.rods),
                "seconds": seconds,
            })

    def stats(key: str, unit: str) -> str:
        v = np.array([r[key] for r in rows])
        return f"mean {v.mean():+.2f} {unit}, SD {v.std(ddof=1):.2f}, max |.| {np.abs(v).max():.2f} (n = {v.size})"

    print(f"phantom slope error vs scanner truth:        {stats('slope_err_pct', '%')}")
    print(f"phantom L1 vBMD error, before marrow fat:     {stats('vbmd_err', 'mg/cm3')}")
    print(f"phantomless slope error vs scanner truth:    {stats('internal_slope_err_pct', '%')}")
    print(f"phantomless L1 vBMD minus phantom L1 vBMD:   {stats('internal_vs_phantom', 'mg/cm3')}")
    print(f"rods used: {sorted({r['rods_used'] for r in rows})}; "
          f"phantom fit {statistics.median(r['seconds'] for r in rows):.2f} s per CT (median)")


if __name__ == "__main__":
    main()
