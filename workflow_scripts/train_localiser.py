"""Rule train_localiser: a fold's training radiographs and registered boxes → results/models/localiser/fold{k}/.

The crop localiser of `bmdpipe predict` (a heatmap U-Net on the whole radiograph). Writes model.pt,
metrics.csv, train.json, heldout.tsv and localiser.json (held-out box errors). One process: it is small.
"""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

from pathlib import Path

from bmdpipe.io.atomic import atomic_dir
from bmdpipe.train.jobs import localiser_fold_job
from bmdpipe.workflow import fold_job

sm = snakemake  # noqa: F821  (injected by Snakemake)
job, settings = fold_job(sm)
size = sm.params.field_size
with atomic_dir(sm.output[0]) as out:
    localiser_fold_job(**job, xray_root=str(Path(sm.input.xrays[0]).parent), aspect=size[0] / size[1], out=str(out),
                       checkpoints=f"results/checkpoints/{sm.rule}", code_version=sm.params.code_version)
