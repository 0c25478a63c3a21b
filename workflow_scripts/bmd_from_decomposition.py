"""Rule bmd_from_decomposition: stage-2 generator + a fold's views → results/models/decomposition/fold{k}/bmd/.

Writes bmd_fit.json (threshold and line per BMD column, fitted on the training folds),
predictions.tsv (held-out: decomposition and ceiling, each name + params.tag) and examples.npz.
"""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

from pathlib import Path

from bmdpipe.io.atomic import atomic_dir
from bmdpipe.train.jobs import bmd_fit_job, fold_views
from bmdpipe.workflow import fold_job

sm = snakemake  # noqa: F821  (injected by Snakemake)
job, settings = fold_job(sm)
train, test, columns = fold_views(job["folds"], job["fold"], job["targets_root"], job["samples"], settings)
with atomic_dir(sm.output[0]) as out:
    bmd_fit_job(Path(sm.input.generator) / "generator.pt", train, test, columns, job["fold"], settings, out,
                tag=sm.params.tag)
