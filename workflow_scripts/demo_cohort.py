"""Rule demo_cohort: the public demo cohort (real public files) under resources/."""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

from pathlib import Path

from bmdpipe.datasets import build_public_demo
from bmdpipe.workflow import log, setup_logging

sm = snakemake  # noqa: F821  (injected by Snakemake)
setup_logging(sm.log[0])
sheet = build_public_demo(Path(sm.output.sheet).parent, cache=sm.params.cache)
log.info("wrote %s", sheet)
