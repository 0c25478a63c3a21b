"""Rule report: the finished results/ folder → results/report/index.html (one self-contained page)."""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

from pathlib import Path

from bmdpipe.report import build_report
from bmdpipe.samples import load_samples
from bmdpipe.workflow import log, setup_logging

sm = snakemake  # noqa: F821  (injected by Snakemake)
setup_logging(sm.log[0])
results = Path(sm.input.qc).parent.parent
build_report(results, load_samples(sm.input.samples, check_paths=False), sm.output[0])
log.info("report written to %s", sm.output[0])
