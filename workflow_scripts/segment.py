"""Rule segment: one patient's CT → results/segment/{patient}/ (labels.nii.gz, uncertainty.nii.gz, segment.json, qc.png)."""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

import torch

from bmdpipe.io.atomic import atomic_dir
from bmdpipe.segment import segment_ct
from bmdpipe.workflow import PatientStage, setup_logging, upstream_failure

sm = snakemake  # noqa: F821  (injected by Snakemake)
setup_logging(sm.log[0])
torch.set_num_threads(sm.threads)
patient = sm.wildcards.patient
stage = PatientStage("segment", patient, sm.params.on_error)
inputs = dict(sm.input.items())
with atomic_dir(sm.output[0]) as out:
    stage.attempt(
        lambda: upstream_failure(f"{inputs['ct']}/ct.json")
        or segment_ct(inputs["ct"], out, method=sm.params.method, labels=inputs.get("labels"),
                      label_table=inputs.get("label_table"), model_dir=inputs.get("model"),
                      threshold_hu=sm.params.threshold_hu, mc_samples=sm.params.mc_samples,
                      grids=sm.params.inference_grids,
                      device=sm.params.device, tags={"patient_id": patient}),
        out / "segment.json",
    )
