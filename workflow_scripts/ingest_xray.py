"""Rule ingest_xray: one patient's radiographs → results/xray/{patient}/{view}.nii.gz + {view}.json."""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

from bmdpipe.io.atomic import atomic_dir
from bmdpipe.io.xray import ingest_xray
from bmdpipe.workflow import PatientStage, setup_logging

sm = snakemake  # noqa: F821  (injected by Snakemake)
setup_logging(sm.log[0])
settings = sm.params.settings
stage = PatientStage("ingest_xray", sm.wildcards.patient, sm.params.on_error)
with atomic_dir(sm.output[0]) as out:
    for row in sm.params.rows:
        stage.attempt(
            lambda row=row: ingest_xray(
                row["xray"],
                out / f"{row['view']}.nii.gz",
                labels={"patient_id": sm.wildcards.patient, "view": row["view"]},
                pixel_spacing_mm=row["pixel_spacing_mm"],
                sdd_mm=row["sdd_mm"],
                apply_voi=settings["apply_voi_lut"],
                default_pixel_spacing_mm=settings["default_pixel_spacing_mm"],
                default_sdd_mm=settings["default_sdd_mm"],
            ),
            out / f"{row['view']}.json",
            view=row["view"],
        )
