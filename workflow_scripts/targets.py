"""Rule targets: registrations + calibrated CT + labels + clinical ROI → results/targets/{patient}/.

Writes {view}.npz (xray, bone, roi, roi_sites in one frame, with crop box, pixel size and pose),
{view}_qc.png and targets.json (views made, views left out with their reasons).
"""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

import torch

from bmdpipe.io.atomic import atomic_dir
from bmdpipe.targets import TargetSettings, targets_patient
from bmdpipe.workflow import PatientStage, setup_logging

sm = snakemake  # noqa: F821  (injected by Snakemake)
setup_logging(sm.log[0])
torch.set_num_threads(sm.threads)
patient = sm.wildcards.patient
stage = PatientStage("targets", patient, sm.params.on_error)
with atomic_dir(sm.output[0]) as out:
    stage.attempt(
        lambda: targets_patient(
            sm.input.register,
            sm.input.xray,
            sm.input.calibration,
            sm.input.segment,
            sm.input.roi,
            out,
            TargetSettings.from_config(sm.params.settings),
            patient=patient,
        ),
        out / "targets.json",
    )
