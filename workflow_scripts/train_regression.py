"""Rules train_regression and train_baseline: a fold's views → results/models/{regression,baseline}/fold{k}/.

Stage 3 (with the stage-2 generator's encoder) or the conventional baseline (without). Writes model.pt,
metrics CSVs, train.json and predictions.tsv (held-out fold). Checkpoints under results/checkpoints/.
"""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

from pathlib import Path

from bmdpipe.io.atomic import atomic_dir
from bmdpipe.train.jobs import regression_predictions_job
from bmdpipe.train.regression import train_regression
from bmdpipe.train.settings import work_dir
from bmdpipe.workflow import fold_job

sm = snakemake  # noqa: F821  (injected by Snakemake)
fold, settings, train, test, columns = fold_job(sm)
generator = Path(sm.input.generator) / "generator.pt" if "generator" in sm.input.keys() else None
work = work_dir(f"results/checkpoints/{sm.rule}", fold, sm.params.settings, sm.params.code_version,
                sorted({v.patient for v in train}), str(generator))
with atomic_dir(sm.output[0]) as out:
    model = train_regression(train, columns, out, work, settings, generator=generator, seed=settings.seed + fold,
                             progress=True)
    regression_predictions_job(model, test, fold, sm.params.method, out / "predictions.tsv", device=settings.device)
