"""Rules train_regression and train_baseline: a fold's views → results/models/{regression,baseline}/fold{k}/.

Stage 3 (with the stage-2 generator's encoder) or the conventional baseline (without). Writes model.pt,
metrics CSVs, train.json and predictions.tsv (held-out fold, method params.method). Checkpoints under
params.checkpoints.
With train.processes > 1 the job runs under torchrun (DistributedDataParallel).
"""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

from pathlib import Path

from bmdpipe.io.atomic import atomic_dir
from bmdpipe.train.launch import launch
from bmdpipe.workflow import fold_job

sm = snakemake  # noqa: F821  (injected by Snakemake)
job, settings = fold_job(sm)
generator = str(Path(sm.input.generator) / "generator.pt") if "generator" in sm.input.keys() else None
with atomic_dir(sm.output[0]) as out:
    launch("bmdpipe.train.jobs:regression_fold_job",
           {**job, "out": str(out), "generator": generator, "method": sm.params.method,
            "checkpoints": sm.params.checkpoints, "code_version": sm.params.code_version},
           processes=settings.processes, threads=sm.threads, log_file=sm.log[0])
