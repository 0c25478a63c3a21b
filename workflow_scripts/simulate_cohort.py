"""Rule simulate_cohort: the virtual cohort (DICOM CT series, DICOM radiographs, truth) and its samples sheet."""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

from pathlib import Path

from bmdpipe.simulate import simulate_cohort
from bmdpipe.workflow import log, setup_logging

sm = snakemake  # noqa: F821  (injected by Snakemake)
setup_logging(sm.log[0])
settings = dict(sm.params.simulate)
if sm.params.cache and "cache_dir" not in settings:
    settings["cache_dir"] = sm.params.cache
sheet = simulate_cohort(Path(sm.output.sheet).parent, settings)
log.info("wrote %s", sheet)
