"""Rule train_segmenter: the labelled patients' CTs and label maps → results/models/segmenter/ (model.pt, training.json)."""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

import torch

from bmdpipe.errors import InputError
from bmdpipe.io.atomic import atomic_dir, write_json
from bmdpipe.segment_unet import UNetSettings, train_segmenter
from bmdpipe.workflow import failed_summary, log, setup_logging

sm = snakemake  # noqa: F821  (injected by Snakemake)
setup_logging(sm.log[0])
torch.set_num_threads(sm.threads)
with atomic_dir(sm.output[0]) as out:
    try:
        train_segmenter(sm.params.cases, out, UNetSettings.from_config(sm.params.unet), device=sm.params.device)
    except InputError as exc:
        # every patient the U-Net should segment then fails with this reason (QC table)
        log.error("train_segmenter failed: %s", exc)
        if sm.params.on_error == "fail":
            raise
        write_json(out / "training.json", failed_summary("train_segmenter", "", str(exc)))
