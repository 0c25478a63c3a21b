"""Rule robustness: a fold's models on variants of its held-out radiographs (bmdpipe.evaluate.robustness).

Re-compressed as JPEG at evaluate.jpeg_qualities (seed 004 §4.2.4; methods "{method} @JPEG{q}") and cropped
where the fold's localiser puts the field (bmdpipe predict's path; methods "{method} @localiser"). Writes
results/models/robustness/fold{k}/predictions.tsv and robustness.json; evaluate_bmd puts them into bmd.json.
"""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

from pathlib import Path

from bmdpipe.io.atomic import atomic_dir
from bmdpipe.train.jobs import robustness_fold_job
from bmdpipe.workflow import fold_job

sm = snakemake  # noqa: F821  (injected by Snakemake)
job, settings = fold_job(sm)
with atomic_dir(sm.output[0]) as out:
    robustness_fold_job(**job, xray_root=str(Path(sm.input.xrays[0]).parent), field_size=sm.params.field_size,
                        qualities=sm.params.qualities, generator=str(Path(sm.input.generator) / "generator.pt"),
                        bmd_fit=str(Path(sm.input.bmd) / "bmd_fit.json"),
                        regressor=str(Path(sm.input.regression) / "model.pt"),
                        baseline=str(Path(sm.input.baseline) / "model.pt"),
                        localiser=str(Path(sm.input.localiser) / "model.pt"), out=str(out))
