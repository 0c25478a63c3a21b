"""Rule train_decomposition: a fold's training views → results/models/decomposition/fold{k}/stage{s}/.

Writes generator.pt, metrics.csv (per epoch) and train.json. Checkpoints live under
results/checkpoints/ (keyed by settings and patients), so a killed job resumes. With
train.processes > 1 the job runs under torchrun (DistributedDataParallel).
"""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

from pathlib import Path

from bmdpipe.io.atomic import atomic_dir
from bmdpipe.train.launch import launch
from bmdpipe.workflow import fold_job

sm = snakemake  # noqa: F821  (injected by Snakemake)
job, settings = fold_job(sm)
init = str(Path(sm.input.init) / "generator.pt") if "init" in sm.input.keys() else None
with atomic_dir(sm.output[0]) as out:
    launch("bmdpipe.train.jobs:decomposition_fold_job",
           {**job, "stage": int(sm.wildcards.stage), "out": str(out), "init": init,
            "checkpoints": sm.params.checkpoints, "code_version": sm.params.code_version},
           processes=settings.processes, threads=sm.threads, log_file=sm.log[0])
