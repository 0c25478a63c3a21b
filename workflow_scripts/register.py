"""Rule register: one patient's radiographs → results/register/{patient}/ ({view}.json per view, qc.png).

With roi: vertebrae the segment stage's labels place the region of interest (else the spine column).
"""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

import torch

from bmdpipe.io.atomic import atomic_dir
from bmdpipe.register import RegistrationSettings, register_patient
from bmdpipe.workflow import setup_logging

sm = snakemake  # noqa: F821  (injected by Snakemake)
setup_logging(sm.log[0])
torch.set_num_threads(sm.threads)
with atomic_dir(sm.output[0]) as out:
    register_patient(
        sm.input.xray,
        sm.input.ct,
        out,
        RegistrationSettings.from_config(sm.params.settings),
        segment_dir=sm.input.get("segment"),
        patient=sm.wildcards.patient,
        on_error=sm.params.on_error,
    )
