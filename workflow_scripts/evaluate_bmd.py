"""Rule evaluate_bmd: every fold's held-out predictions → results/metrics/{bmd.tsv,bmd.json,predictions.tsv}.

bmd.tsv: per method and BMD column, PCC, ICC(2,1), MAE, SEE, bias and RMS-CV across poses, pooled over folds
(seed 004 Table 2's layout). bmd.json: every figure with patient-level bootstrap 95 % CIs, per pose, and
T-score screening (AUCs, sensitivity and specificity at seed 000's thresholds, per site and per patient),
also for the JPEG re-compressed radiographs (methods "{method} @JPEG{q}", with mean file sizes in jpeg_file_kb)
the training experiments (methods "{method} @{experiment}", their settings in "experiments") and seed 000's
models (methods Base, MultiPatch, AttMultiPatch, MultiROI, AttMultiROI), and in "decomposition_accuracy" how
close the generators' held-out ROI images are to their targets (seed 004 Table 3: PSNR, Dice, mean-intensity
PCC and ICC; from each BMD-fit folder's decomposition.tsv).
"""

import _common  # noqa: F401  (puts bmdpipe on sys.path)

from pathlib import Path

import pandas as pd

from bmdpipe.evaluate.bmd import evaluate, finite, table
from bmdpipe.evaluate.decomposition import read_accuracy, summarise_accuracy
from bmdpipe.evaluate.robustness import read_sizes
from bmdpipe.io.atomic import write_json
from bmdpipe.samples import load_samples
from bmdpipe.train.jobs import write_table
from bmdpipe.workflow import log, setup_logging

sm = snakemake  # noqa: F821  (injected by Snakemake)
setup_logging(sm.log[0])
folders = [*sm.input.decomposition, *sm.input.regression, *sm.input.baseline, *sm.input.robustness,
           *sm.input.experiments, *sm.input.chest_bmd]
predictions = pd.concat([pd.read_csv(Path(d) / "predictions.tsv", sep="\t") for d in folders], ignore_index=True)
sheet = load_samples(sm.input.samples, check_paths=False)
sexes = dict(sheet.drop_duplicates("patient_id").set_index("patient_id")["sex"]) if "sex" in sheet else {}
settings = sm.params.settings
figures = evaluate(predictions, sexes, reference=settings["tscore_reference"], n_boot=settings["bootstrap"],
                   seed=settings["seed"])
write_table(predictions, sm.output.predictions)
rows = table(figures)
write_table(rows, sm.output.metrics)
if sm.input.robustness:
    figures["jpeg_file_kb"] = read_sizes([Path(d) / "robustness.json" for d in sm.input.robustness])
figures["experiments"] = {name: spec for name, spec in settings["experiments"].items() if spec}
accuracy = summarise_accuracy(read_accuracy([*sm.input.decomposition, *sm.input.experiments]))
figures["decomposition_accuracy"] = finite(accuracy.to_dict(orient="records"))
write_json(sm.output.figures, figures)
log.info("held-out BMD agreement:\n%s", rows.to_string(index=False))
log.info("held-out image decomposition accuracy:\n%s", accuracy.to_string(index=False))
