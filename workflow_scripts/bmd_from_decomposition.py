"""Rule bmd_from_decomposition: stage-2 generator + a fold's views → results/models/decomposition/fold{k}/bmd/.

Writes bmd_fit.json (threshold and line per BMD column, fitted on the training folds),
predictions.tsv (held-out: decomposition and ceiling) and examples.npz.
"""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

from pathlib import Path

import torch

from bmdpipe.io.atomic import atomic_dir
from bmdpipe.train.jobs import bmd_fit_job, fold_views
from bmdpipe.train.settings import TrainSettings
from bmdpipe.workflow import setup_logging

sm = snakemake  # noqa: F821  (injected by Snakemake)
setup_logging(sm.log[0])
torch.set_num_threads(sm.threads)
fold = int(sm.wildcards.fold)
settings = TrainSettings.from_config(sm.params.settings)
train, test, columns = fold_views(sm.input.folds, fold, Path(sm.input.targets[0]).parent, sm.input.samples, settings)
with atomic_dir(sm.output[0]) as out:
    bmd_fit_job(Path(sm.input.generator) / "generator.pt", train, test, columns, fold, settings, out)
