"""Rule roi: calibrated CT + bone labels → results/roi/{patient}/ (roi.nii.gz, core.nii.gz, abmd.json, qc.png)."""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

from bmdpipe.io.atomic import atomic_dir
from bmdpipe.roi import RoiSpec, roi_ct
from bmdpipe.workflow import PatientStage, setup_logging, upstream_failure

sm = snakemake  # noqa: F821  (injected by Snakemake)
setup_logging(sm.log[0])
patient = sm.wildcards.patient
stage = PatientStage("roi", patient, sm.params.on_error)
with atomic_dir(sm.output[0]) as out:
    stage.attempt(
        lambda: upstream_failure(f"{sm.input.calibration}/calibration.json")
        or upstream_failure(f"{sm.input.segment}/segment.json")
        or roi_ct(f"{sm.input.calibration}/bmd.nii.gz", f"{sm.input.segment}/labels.nii.gz", out,
                  spec=RoiSpec.from_config(sm.params.roi), tags={"patient_id": patient}),
        out / "abmd.json",
    )
