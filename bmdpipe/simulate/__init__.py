"""Virtual cohort simulator: realistic DICOM input with known BMD truth (SIMULATOR.md).

Public API::

    DEFAULTS                                   documented cohort config defaults
    sample_patient(rng, cfg) -> dict           every random parameter of one patient (JSON record)
    patient_record(cfg, index) -> dict         sample_patient on the cohort seed + model settings
    load_base(spec, ct_downsample=, vertebrae=, cache_dir=) -> BaseAnatomy   cached preprocessing
    simulate_patient(record, base, out_dir)    writes one patient, bit-for-bit from its record
    render_patient(record, base, ...)          the same in memory (validation)
    expected_sheet(out_dir, cfg) -> DataFrame  sheet rows without writing anything
    simulate_cohort(out_dir, cfg) -> Path      writes the cohort and samples.tsv
    simulate_one(out_dir, cfg, patient)        one patient of the cohort (a per-patient shard)
    collect_sheet(out_dir, cfg) -> Path        samples.tsv from the shards' truth files
"""

from bmdpipe.simulate.base import BaseAnatomy, load_base
from bmdpipe.simulate.cohort import (
    collect_sheet,
    expected_sheet,
    patient_ids,
    patient_record,
    render_patient,
    simulate_cohort,
    simulate_one,
    simulate_patient,
    write_sheet,
)
from bmdpipe.simulate.defaults import DEFAULTS, fill_config
from bmdpipe.simulate.sampling import derive, sample_patient
from bmdpipe.simulate.truth import truth_labels

__all__ = [
    "DEFAULTS", "BaseAnatomy", "collect_sheet", "derive", "expected_sheet", "fill_config", "load_base",
    "patient_ids", "patient_record", "render_patient", "sample_patient", "simulate_cohort", "simulate_one",
    "simulate_patient", "truth_labels", "write_sheet",
]
