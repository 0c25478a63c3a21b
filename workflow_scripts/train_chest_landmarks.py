"""Rule train_chest_landmarks: a fold's radiographs with landmarks → results/models/chest_landmarks/fold{k}/.

Seed 000's landmark detector (a heatmap U-Net on the whole radiograph, 16 chest landmarks projected from the
CT labels, or placed by hand in the table cohort.landmarks names). Writes model.pt,
metrics.csv, train.json, heldout.tsv and chest_landmarks.json (held-out errors in mm). One process: it is small.
"""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

from pathlib import Path

from bmdpipe.io.atomic import atomic_dir
from bmdpipe.train.jobs import chest_landmarks_fold_job
from bmdpipe.workflow import fold_job

sm = snakemake  # noqa: F821  (injected by Snakemake)
job, settings = fold_job(sm)
with atomic_dir(sm.output[0]) as out:
    chest_landmarks_fold_job(**job, xray_root=str(Path(sm.input.xrays[0]).parent), out=str(out),
                             checkpoints=f"results/checkpoints/{sm.rule}", code_version=sm.params.code_version,
                             landmarks=sm.input.get("landmarks"))
