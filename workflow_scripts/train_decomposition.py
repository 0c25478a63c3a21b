"""Rule train_decomposition: a fold's training views → results/models/decomposition/fold{k}/stage{s}/.

Writes generator.pt, metrics.csv (per epoch) and train.json. Checkpoints live under
results/checkpoints/ (keyed by settings and patients), so a killed job resumes.
"""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

from pathlib import Path

import torch

from bmdpipe.io.atomic import atomic_dir
from bmdpipe.train.decomposition import train_stage
from bmdpipe.train.jobs import fold_views
from bmdpipe.train.settings import TrainSettings, work_dir
from bmdpipe.workflow import setup_logging

sm = snakemake  # noqa: F821  (injected by Snakemake)
setup_logging(sm.log[0])
torch.set_num_threads(sm.threads)
fold, stage = int(sm.wildcards.fold), int(sm.wildcards.stage)
settings = TrainSettings.from_config(sm.params.settings)
targets_root = Path(sm.input.targets[0]).parent
train, _, _ = fold_views(sm.input.folds, fold, targets_root, sm.input.samples, settings)
init = Path(sm.input.init) / "generator.pt" if "init" in sm.input.keys() else None
work = work_dir("results/checkpoints/decomposition", fold, stage, sm.params.settings, sm.params.code_version,
                sorted({v.patient for v in train}), str(init))
with atomic_dir(sm.output[0]) as out:
    train_stage(train, stage, out, work, settings, init=init, seed=settings.seed + fold)
