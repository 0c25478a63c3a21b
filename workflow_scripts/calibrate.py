"""Rule calibrate: one patient's CT → results/calibration/{patient}/ (bmd.nii.gz, calibration.json, qc.png)."""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

from bmdpipe.calibrate import PhantomlessSpec, PhantomSpec, calibrate_ct
from bmdpipe.io.atomic import atomic_dir
from bmdpipe.workflow import PatientStage, setup_logging, upstream_failure

sm = snakemake  # noqa: F821  (injected by Snakemake)
setup_logging(sm.log[0])
patient = sm.wildcards.patient
stage = PatientStage("calibrate", patient, sm.params.on_error)
with atomic_dir(sm.output[0]) as out:
    stage.attempt(
        lambda: upstream_failure(f"{sm.input.ct}/ct.json")
        or calibrate_ct(f"{sm.input.ct}/ct.nii.gz", out, method=sm.params.method,
                        spec=PhantomSpec.from_config(sm.params.phantom), labels={"patient_id": patient},
                        phantomless=PhantomlessSpec.from_config(sm.params.phantomless)),
        out / "calibration.json",
    )
