"""Rule folds: every patient's targets + the samples sheet → results/dataset/folds.json (patient-level K folds)."""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

from pathlib import Path

from bmdpipe.train.jobs import write_folds
from bmdpipe.train.settings import TrainSettings
from bmdpipe.workflow import log, setup_logging

sm = snakemake  # noqa: F821  (injected by Snakemake)
setup_logging(sm.log[0])
targets = {Path(d).name: d for d in sm.input.targets}
info = write_folds(targets, sm.input.samples, TrainSettings.from_config(sm.params.settings), sm.output[0])
log.info("folds: %s; BMD columns %s; excluded %s", {k: len(v) for k, v in info["folds"].items()},
         info["columns"], info["excluded"])
