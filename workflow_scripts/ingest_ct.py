"""Rule ingest_ct: one patient's CT → results/ct/{patient}/ct.nii.gz + ct.json."""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

from bmdpipe.io.atomic import atomic_dir
from bmdpipe.io.ct import ingest_ct
from bmdpipe.workflow import PatientStage, setup_logging

sm = snakemake  # noqa: F821  (injected by Snakemake)
setup_logging(sm.log[0])
stage = PatientStage("ingest_ct", sm.wildcards.patient, sm.params.on_error)
with atomic_dir(sm.output[0]) as out:
    stage.attempt(
        lambda: ingest_ct(
            sm.input.ct,
            out / "ct.nii.gz",
            series_uid=sm.params.series_uid,
            spacing_tolerance=sm.params.settings["slice_spacing_tolerance"],
            labels={"patient_id": sm.wildcards.patient},
        ),
        out / "ct.json",
    )
