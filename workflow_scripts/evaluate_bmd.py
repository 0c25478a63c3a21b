"""Rule evaluate_bmd: every fold's held-out predictions → results/metrics/bmd.tsv and predictions.tsv.

bmd.tsv: per method and BMD column, PCC, ICC(2,1), MAE, SEE, bias and RMS-CV across poses, pooled over folds.
"""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

from pathlib import Path

import pandas as pd

from bmdpipe.evaluate.bmd import summarise
from bmdpipe.train.jobs import write_table
from bmdpipe.workflow import log, setup_logging

sm = snakemake  # noqa: F821  (injected by Snakemake)
setup_logging(sm.log[0])
folders = [*sm.input.decomposition, *sm.input.regression, *sm.input.baseline]
predictions = pd.concat([pd.read_csv(Path(d) / "predictions.tsv", sep="\t") for d in folders], ignore_index=True)
table = summarise(predictions)
write_table(predictions, sm.output.predictions)
write_table(table, sm.output.metrics)
log.info("held-out BMD agreement:\n%s", table.to_string(index=False))
