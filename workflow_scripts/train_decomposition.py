"""Rule train_decomposition: a fold's training views → results/models/decomposition/fold{k}/stage{s}/.

Writes generator.pt, metrics.csv (per epoch) and train.json. Checkpoints live under
results/checkpoints/ (keyed by settings and patients), so a killed job resumes.
"""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

from pathlib import Path

from bmdpipe.io.atomic import atomic_dir
from bmdpipe.train.decomposition import train_stage
from bmdpipe.train.settings import work_dir
from bmdpipe.workflow import fold_job

sm = snakemake  # noqa: F821  (injected by Snakemake)
fold, settings, train, _, _ = fold_job(sm)
stage = int(sm.wildcards.stage)
init = Path(sm.input.init) / "generator.pt" if "init" in sm.input.keys() else None
work = work_dir("results/checkpoints/decomposition", fold, stage, sm.params.settings, sm.params.code_version,
                sorted({v.patient for v in train}), str(init))
with atomic_dir(sm.output[0]) as out:
    train_stage(train, stage, out, work, settings, init=init, seed=settings.seed + fold, progress=True)
