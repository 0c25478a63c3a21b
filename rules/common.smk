# Shared Python for the rules: config validation, the samples table, wildcard
# constraints and input functions. No rule is defined here.
import re
from pathlib import Path

from snakemake.utils import validate

from bmdpipe import datasets
from bmdpipe import samples as sample_sheet
from bmdpipe.io import ct as ct_io
from bmdpipe.io import xray as xray_io


validate(config, "../schemas/config.schema.yaml")

COHORT = config["cohort"]


def load_cohort():
    """The validated samples table; for the public demo, the sheet the rule demo_cohort writes."""
    if COHORT["source"] == "public_demo":
        root = Path(COHORT["samples"]).parent
        table = datasets.public_demo_sheet(root).astype(str)
        return sample_sheet.validate_samples(table, COHORT["samples"], check_paths=False)
    return sample_sheet.load_samples(COHORT["samples"])


SAMPLES = load_cohort()
PATIENTS = sample_sheet.patients(SAMPLES)


wildcard_constraints:
    patient="|".join(re.escape(p) for p in PATIENTS),


def patient_rows(wildcards):
    return SAMPLES[SAMPLES.patient_id == wildcards.patient]


def get_ct(wildcards):
    """The CT (DICOM folder or NIfTI) of a patient."""
    return patient_rows(wildcards).ct.iloc[0]


def get_ct_series_uid(wildcards):
    rows = patient_rows(wildcards)
    if "ct_series_uid" not in rows or rows.ct_series_uid.isna().iloc[0]:
        return None
    return rows.ct_series_uid.iloc[0]


def get_xrays(wildcards):
    """The radiographs of a patient, in sheet order."""
    return list(patient_rows(wildcards).xray)


def _optional(row, column):
    value = row.get(column)
    return None if value is None or value != value else float(value)


def get_xray_rows(wildcards):
    """Per radiograph of a patient: view, file and the sheet's geometry overrides."""
    return [
        {
            "view": row["view"],
            "xray": row["xray"],
            "pixel_spacing_mm": _optional(row, "xray_pixel_spacing_mm"),
            "sdd_mm": _optional(row, "sdd_mm"),
        }
        for _, row in patient_rows(wildcards).iterrows()
    ]


def get_final_output():
    """What `snakemake` with no target builds."""
    return ["results/qc/ingest.tsv"]
