"""Rule qc_table: the QC table of every per-patient stage (results/qc/patients.tsv)."""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

from bmdpipe.io.atomic import atomic_path
from bmdpipe.qc import read_summaries
from bmdpipe.workflow import log, setup_logging

sm = snakemake  # noqa: F821  (injected by Snakemake)
setup_logging(sm.log[0])
table = read_summaries(list(sm.input))
failed = table[table.status != "ok"]
log.info("%d summaries, %d failed", len(table), len(failed))
for row in failed.itertuples():
    log.warning("%s %s %s: %s", row.patient_id, row.stage, row.view, row.reason)
with atomic_path(sm.output[0]) as tmp:
    table.to_csv(tmp, sep="\t", index=False)
