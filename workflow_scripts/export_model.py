"""Rule export_model: every fold's generator, BMD fit, stage-3 regressor and localiser → results/model/.

The bundle `bmdpipe predict --model results/model` reads (bmdpipe.predict.export_bundle): files are
hard links where the file system allows, so the bundle costs no space and survives deleting results/models.
"""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

from bmdpipe.io.atomic import atomic_dir
from bmdpipe.predict import export_bundle
from bmdpipe.workflow import setup_logging

sm = snakemake  # noqa: F821  (injected by Snakemake)
setup_logging(sm.log[0])
folds = {k: {"generator": g, "bmd": b, "regression": r, "localiser": lo}
         for k, (g, b, r, lo) in enumerate(zip(sm.input.generator, sm.input.bmd, sm.input.regression,
                                               sm.input.localiser))}
with atomic_dir(sm.output[0]) as out:
    export_bundle(sm.input.folds, folds, out, field_size=sm.params.field_size, train=sm.params.train,
                  tscore_reference=sm.params.tscore_reference, quality=sm.params.quality)
