"""Rule train_chest_bmd: seed 000's models of one fold → results/models/chest_bmd/fold{k}/.

Base, MultiPatch, AttMultiPatch, MultiROI and AttMultiROI (train.chest_bmd.variants) on the fold's training
radiographs, the ROIs cut at the landmarks of the fold's detector; writes each model, predictions.tsv (held-out),
landmarks.tsv and chest_bmd.json. One process: the models are small at demo size.
"""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

from pathlib import Path

from bmdpipe.io.atomic import atomic_dir
from bmdpipe.train.jobs import chest_bmd_fold_job
from bmdpipe.workflow import fold_job

sm = snakemake  # noqa: F821  (injected by Snakemake)
job, settings = fold_job(sm)
detector = sm.input.get("detector")
with atomic_dir(sm.output[0]) as out:
    chest_bmd_fold_job(**job, xray_root=str(Path(sm.input.xrays[0]).parent), out=str(out),
                       checkpoints=f"results/checkpoints/{sm.rule}", code_version=sm.params.code_version,
                       detector=str(detector) if detector else None)
