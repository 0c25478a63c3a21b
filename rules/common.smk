# Shared Python for the rules: config validation, the samples table, wildcard
# constraints and input functions. No rule is defined here.
import re
from pathlib import Path

from snakemake.utils import validate

from bmdpipe import datasets
from bmdpipe import samples as sample_sheet
from bmdpipe.io import ct as ct_io
from bmdpipe.io import xray as xray_io
from bmdpipe import calibrate as calibrate_stage
from bmdpipe import roi as roi_stage
from bmdpipe import register as register_stage
from bmdpipe import targets as targets_stage
from bmdpipe import segment as segment_stage
from bmdpipe import segment_unet
from bmdpipe.train import settings as train_settings
from bmdpipe.evaluate.robustness import JPEG_TAG, LOCALISER_TAG


validate(config, "../schemas/config.schema.yaml")

COHORT = config["cohort"]


def load_cohort():
    """The validated samples table; for cohorts the workflow writes, the sheet their rule will write.

    Paths inside the working directory are kept relative to it (a copied or moved project
    does not re-run); others are absolute.
    """
    root = Path(COHORT["samples"]).parent
    if COHORT["source"] == "public_demo":
        table = datasets.public_demo_sheet(root)
    elif COHORT["source"] == "simulate":
        from bmdpipe import simulate

        table = simulate.expected_sheet(root, COHORT["simulate"])
    else:
        return sample_sheet.load_samples(COHORT["samples"], relative_to=Path.cwd())
    return sample_sheet.validate_samples(table.astype(str).replace("nan", ""), COHORT["samples"], check_paths=False,
                                         relative_to=Path.cwd())


SAMPLES = load_cohort()
PATIENTS = sample_sheet.patients(SAMPLES)


wildcard_constraints:
    patient="|".join(re.escape(p) for p in PATIENTS),


def patient_rows(wildcards):
    return SAMPLES[SAMPLES.patient_id == wildcards.patient]


def get_ct(wildcards):
    """The CT (DICOM folder or NIfTI) of a patient."""
    return patient_rows(wildcards).ct.iloc[0]


def get_ct_series_uid(wildcards):
    rows = patient_rows(wildcards)
    if "ct_series_uid" not in rows or rows.ct_series_uid.isna().iloc[0]:
        return None
    return rows.ct_series_uid.iloc[0]


def get_xrays(wildcards):
    """The radiographs of a patient, in sheet order."""
    return list(patient_rows(wildcards).xray)


def _optional(row, column):
    value = row.get(column)
    return None if value is None or value != value else float(value)


def get_xray_rows(wildcards):
    """Per radiograph of a patient: view, file and the sheet's geometry overrides."""
    return [
        {
            "view": row["view"],
            "xray": row["xray"],
            "pixel_spacing_mm": _optional(row, "xray_pixel_spacing_mm"),
            "sdd_mm": _optional(row, "sdd_mm"),
        }
        for _, row in patient_rows(wildcards).iterrows()
    ]


def written_by_cohort_rule():
    """Files a cohort-writing step makes that the sheet names: CT series folders, radiographs, label maps."""
    files = {"cts": [], "files": []}
    for ct in SAMPLES.ct.unique():
        (files["files"] if ct.endswith((".nii", ".nii.gz")) else files["cts"]).append(ct)
    files["files"] += list(SAMPLES.xray)
    for col in ("ct_labels", "label_table"):
        if col in SAMPLES:
            files["files"] += [p for p in SAMPLES[col].dropna().unique() if p]
    return files




def get_calibration_method(wildcards):
    """The sheet's per-patient 'calibration' column, else calibrate.method of the config."""
    rows = patient_rows(wildcards)
    if "calibration" in rows and not rows.calibration.isna().iloc[0] and rows.calibration.iloc[0]:
        return rows.calibration.iloc[0]
    return config["calibrate"]["method"]



def _sheet_value(row, column):
    value = row.get(column)
    return None if value is None or value != value or str(value).strip() in ("", "nan") else str(value)


def labelled_patients():
    """Patients whose sheet row supplies a CT label map: patient_id → {labels, label_table}."""
    out = {}
    for _, row in SAMPLES.drop_duplicates("patient_id").iterrows():
        labels = _sheet_value(row, "ct_labels")
        if labels:
            out[row["patient_id"]] = {"labels": labels, "label_table": _sheet_value(row, "label_table")}
    return out


LABELLED = labelled_patients()
#: Seed 000's chest landmarks placed by hand (cohort.landmarks), checked against the sheet before any job runs.
MANUAL_LANDMARKS = COHORT.get("landmarks")
if MANUAL_LANDMARKS:
    sample_sheet.read_landmark_table(MANUAL_LANDMARKS, SAMPLES)
#: The segmentation U-Net: a configured trained model, else the one rule train_segmenter makes.
SEGMENTER = config["segment"]["unet"]["model"] or "results/models/segmenter"
SEGMENT_GPUS = 1 if config["segment"]["device"] == "cuda" else 0


def get_segment_method(wildcards):
    """segment.method for a patient, 'auto' resolved: supplied labels, else the U-Net, else threshold."""
    has_model = bool(LABELLED) or bool(config["segment"]["unet"]["model"])
    return segment_stage.resolve_method(
        config["segment"]["method"], has_labels=wildcards.patient in LABELLED, has_model=has_model
    )


def get_segment_input(wildcards):
    """The CT, plus the label map and table (supplied) or the trained model folder (unet)."""
    inputs = {"ct": f"results/ct/{wildcards.patient}"}
    method = get_segment_method(wildcards)
    if method == "supplied" and wildcards.patient in LABELLED:
        inputs.update({k: v for k, v in LABELLED[wildcards.patient].items() if v})
    elif method == "unet":
        inputs["model"] = SEGMENTER
    return inputs


def get_segmenter_training_cases(wildcards):
    """Training cases of the U-Net: each labelled patient's ingested CT, label map and table."""
    return [
        {
            "patient_id": p,
            "ct": f"results/ct/{p}/ct.nii.gz",
            "upstream": f"results/ct/{p}/ct.json",
            "labels": v["labels"],
            "label_table": v["label_table"],
        }
        for p, v in LABELLED.items()
    ]


def get_segmenter_training_input(wildcards):
    return {
        "ct": [f"results/ct/{p}" for p in LABELLED],
        "labels": [v["labels"] for v in LABELLED.values()],
        "tables": sorted({v["label_table"] for v in LABELLED.values() if v["label_table"]}),
    }


def get_register_input(wildcards):
    """Radiographs and CT of a patient, and its bone labels when the registration centres on the target vertebrae."""
    inputs = {"xray": f"results/xray/{wildcards.patient}", "ct": f"results/ct/{wildcards.patient}"}
    if config["register"]["roi"] == "vertebrae" and hasattr(rules, "segment"):
        inputs["segment"] = f"results/segment/{wildcards.patient}"
    return inputs


COHORT_FILES = written_by_cohort_rule()

TRAIN = config["train"]
FOLDS = list(range(TRAIN["folds"]))
#: GPUs a training job asks for (one per DDP process) and a single-process inference job.
TRAIN_GPUS = TRAIN["processes"] if TRAIN["device"] == "cuda" else 0
INFER_GPUS = 1 if TRAIN["device"] == "cuda" else 0

wildcard_constraints:
    fold=r"\d+",
    stage="1|2",

#: The decomposition keys each training job depends on (others do not re-train it).
_STAGE_KEYS = {
    "stage1": ("generator", "encoder", "ngf", "ndf", "n_layers", "num_d", "stage1_epochs", "lr", "weight_decay",
               "restart_epochs", "lambda_fm", "lambda_l1", "lambda_gc"),
    "bmd": ("thresholds", "fit_on"),
}


def train_slice(part=None):
    """The train config a job depends on: the shared keys plus its own part.

    part: None (folds), "stage1", "stage2" (stage 1's keys and stage 2's), "bmd", "regression", "baseline",
    "localiser", "chest_landmarks", "chest_bmd" (its own keys, the device and seeds, and for chest_bmd the pose
    subset: not the GAN's image size or augmentations),
    "shared" (what every method shares: sites, image size, device; for jobs that only apply trained models).
    """
    shared = {k: v for k, v in TRAIN.items() if k not in ("enabled", "decomposition", "regression", "baseline",
                                                          "localiser", "chest_landmarks", "chest_bmd")}
    dec = TRAIN.get("decomposition", {})
    if part is None:
        return {k: shared[k] for k in ("folds", "fold_seed", "sites", "measures") if k in shared}
    if part == "shared":
        return shared
    if part == "stage1":
        return {**shared, "decomposition": {k: v for k, v in dec.items() if k in _STAGE_KEYS["stage1"]}}
    if part == "bmd":
        return {**shared, "decomposition": {k: v for k, v in dec.items() if k in _STAGE_KEYS["bmd"]}}
    if part == "stage2":
        return {**shared, "decomposition": {k: v for k, v in dec.items() if k not in _STAGE_KEYS["bmd"]}}
    if part in ("localiser", "chest_landmarks", "chest_bmd"):
        own = ("folds", "fold_seed", "seed", "device", "views") if part == "chest_bmd" else ("folds", "fold_seed", "seed", "device")
        return {**{k: shared[k] for k in own if k in shared}, part: TRAIN.get(part, {})}
    return {**shared, part: TRAIN.get(part, {})}


def run_root(wildcards):
    """Where a training job's models live: ``results`` for the main run, ``results/experiments/{name}`` for a
    training experiment's jobs (rules/experiments.smk)."""
    experiment = getattr(wildcards, "experiment", None)
    return f"results/experiments/{experiment}" if experiment else "results"


def get_fold_data(wildcards):
    """The folds file, the samples sheet and every patient's targets (a fold's patients are read from the folds
    file); a training experiment that changes the calibration has targets of its own."""
    experiment = getattr(wildcards, "experiment", None)
    own = experiment and EXPERIMENTS[experiment].get("calibration")
    return {
        "folds": "results/dataset/folds.json",
        "samples": COHORT["samples"],
        "targets": [f"{run_root(wildcards) if own else 'results'}/targets/{p}" for p in PATIENTS],
    }


def get_decomposition_input(wildcards):
    """Fold data, plus stage 1's generator for stage 2 (unless stage 2 trains from scratch)."""
    inputs = get_fold_data(wildcards)
    if wildcards.stage == "2" and not TRAIN["decomposition"].get("stage2_from_scratch", False):
        inputs["init"] = f"{run_root(wildcards)}/models/decomposition/fold{wildcards.fold}/stage1"
    return inputs


def get_model_input(wildcards):
    """Fold data and the stage-2 generator (BMD fit, stage 3)."""
    return {**get_fold_data(wildcards),
            "generator": f"{run_root(wildcards)}/models/decomposition/fold{wildcards.fold}/stage2"}


#: Training experiments (seed 004 §4.2.3, §4.2.5): name → {views, calibration}; null entries left out.
EXPERIMENTS = {name: spec for name, spec in config["evaluate"]["experiments"].items() if spec}

wildcard_constraints:
    experiment="|".join(re.escape(name) for name in EXPERIMENTS) or "(?!)",


def check_experiments():
    """A pose subset must name poses of the cohort (else its training would have no views)."""
    poses = set(SAMPLES.view)
    for name, spec in EXPERIMENTS.items():
        if name == LOCALISER_TAG[1:] or name.startswith(JPEG_TAG[1:]):
            raise ValueError(f"config evaluate.experiments.{name}: the name is taken by a robustness variant "
                             f"(methods '... {LOCALISER_TAG}', '... {JPEG_TAG}{{q}}'); choose another")
        missing = sorted(set(spec.get("views") or ()) - poses)
        if missing and TRAIN["enabled"]:
            raise ValueError(f"config evaluate.experiments.{name}.views: {missing} are not views of the samples "
                             f"sheet {COHORT['samples']} (it has {sorted(poses)}); name poses it has, or set "
                             f"evaluate.experiments.{name}: null to leave the experiment out")


check_experiments()


def experiment_slice(wildcards, part):
    """:func:`train_slice` of ``part`` with the experiment's pose subset (``train.views``) in place."""
    settings = train_slice(part)
    views = EXPERIMENTS[wildcards.experiment].get("views")
    return {**settings, "views": views} if views else settings


def experiment_results():
    """Every experiment's held-out predictions: its BMD-fit and stage-3 folders of every fold."""
    return [path for name in EXPERIMENTS for fold in FOLDS
            for path in (f"results/experiments/{name}/models/decomposition/fold{fold}/bmd",
                         f"results/experiments/{name}/models/regression/fold{fold}")]


def chest_landmark_models():
    """Seed 000's landmark detector per fold, when some patient's supplied labels (or hand-placed points) can
    teach it."""
    return expand("results/models/chest_landmarks/fold{fold}", fold=FOLDS) if LABELLED or MANUAL_LANDMARKS else []


def get_chest_landmarks_input(wildcards):
    """A fold's data, the whole radiographs, and the table of hand-placed landmarks when there is one."""
    inputs = {**get_fold_data(wildcards), "xrays": expand("results/xray/{patient}", patient=PATIENTS)}
    if MANUAL_LANDMARKS:
        inputs["landmarks"] = MANUAL_LANDMARKS
    return inputs


def chest_bmd_models():
    """Seed 000's models per fold, when train.chest_bmd.variants names any."""
    return expand("results/models/chest_bmd/fold{fold}", fold=FOLDS) if TRAIN.get("chest_bmd", {}).get("variants") else []


def get_chest_bmd_input(wildcards):
    """A fold's data, the whole radiographs, and the fold's landmark detector when one is trained (its ROIs)."""
    inputs = {**get_fold_data(wildcards), "xrays": expand("results/xray/{patient}", patient=PATIENTS)}
    if LABELLED or MANUAL_LANDMARKS:
        inputs["detector"] = f"results/models/chest_landmarks/fold{wildcards.fold}"
    return inputs


def get_report_input(wildcards):
    """What the report reads: the QC table (after every per-patient stage), the sheet, the metrics, the bundle."""
    inputs = {"qc": "results/qc/patients.tsv", "samples": COHORT["samples"]}
    if TRAIN["enabled"]:
        inputs["metrics"] = "results/metrics/bmd.json"
        inputs["model"] = "results/model"
        inputs["chest_landmarks"] = chest_landmark_models()
        inputs["chest_bmd"] = chest_bmd_models()
    return inputs


def get_final_output():
    """What `snakemake` with no target builds: the report, and the tables it is built from."""
    out = ["results/qc/patients.tsv", "results/report/index.html"]
    if TRAIN["enabled"]:
        out += ["results/metrics/bmd.tsv", "results/model"]  # the bundle of bmdpipe predict
        out += chest_landmark_models()
    return out
