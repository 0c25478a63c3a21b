# Training experiments (seed 004 §4.2.3 pose subset, §4.2.5 uncalibrated CT): per name in
# evaluate.experiments, the decomposition chain (GAN stages 1-2, BMD fit, stage 3) trained again on the
# main run's folds with one thing changed, under results/experiments/{experiment}/. An experiment that
# changes the calibration redoes calibration, ROI and targets per patient (not ingestion, segmentation or
# registration). The same rules and scripts as the main run, with their paths and settings replaced; the
# held-out predictions are methods "{method} @{experiment}" in results/metrics/bmd.json.


use rule calibrate as calibrate_experiment with:
    output:
        directory("results/experiments/{experiment}/calibration/{patient}"),
    params:
        method=lambda wildcards: EXPERIMENTS[wildcards.experiment]["calibration"],
        phantom=lambda wildcards: {} if EXPERIMENTS[wildcards.experiment]["calibration"] == "phantomless"
        else config["calibrate"]["phantom"],  # a phantom setting does not redo phantomless calibration
        phantomless=config["calibrate"]["phantomless"],
        on_error=config["on_patient_error"],
        code_version=calibrate_stage.STAGE_VERSION,
    log:
        "results/logs/experiments/{experiment}/calibrate/{patient}.log",
    benchmark:
        "results/benchmarks/experiments/{experiment}/calibrate/{patient}.tsv"


use rule roi as roi_experiment with:
    input:
        calibration="results/experiments/{experiment}/calibration/{patient}",
        segment="results/segment/{patient}",
    output:
        directory("results/experiments/{experiment}/roi/{patient}"),
    log:
        "results/logs/experiments/{experiment}/roi/{patient}.log",
    benchmark:
        "results/benchmarks/experiments/{experiment}/roi/{patient}.tsv"


use rule targets as targets_experiment with:
    input:
        register="results/register/{patient}",
        xray="results/xray/{patient}",
        calibration="results/experiments/{experiment}/calibration/{patient}",
        segment="results/segment/{patient}",
        roi="results/experiments/{experiment}/roi/{patient}",
    output:
        directory("results/experiments/{experiment}/targets/{patient}"),
    log:
        "results/logs/experiments/{experiment}/targets/{patient}.log",
    benchmark:
        "results/benchmarks/experiments/{experiment}/targets/{patient}.tsv"


use rule train_decomposition as train_decomposition_experiment with:
    input:
        unpack(get_decomposition_input),
    output:
        directory("results/experiments/{experiment}/models/decomposition/fold{fold}/stage{stage}"),
    params:
        settings=lambda wildcards: experiment_slice(wildcards, f"stage{wildcards.stage}"),
        checkpoints=lambda wildcards: f"{run_root(wildcards)}/checkpoints/decomposition",
        code_version=train_settings.STAGE_VERSION,
    log:
        "results/logs/experiments/{experiment}/train_decomposition/fold{fold}_stage{stage}.log",
    benchmark:
        "results/benchmarks/experiments/{experiment}/train_decomposition/fold{fold}_stage{stage}.tsv"


use rule bmd_from_decomposition as bmd_from_decomposition_experiment with:
    input:
        unpack(get_model_input),
    output:
        directory("results/experiments/{experiment}/models/decomposition/fold{fold}/bmd"),
    params:
        settings=lambda wildcards: experiment_slice(wildcards, "bmd"),
        tag=lambda wildcards: f" @{wildcards.experiment}",
        code_version=train_settings.STAGE_VERSION,
    log:
        "results/logs/experiments/{experiment}/bmd_from_decomposition/fold{fold}.log",
    benchmark:
        "results/benchmarks/experiments/{experiment}/bmd_from_decomposition/fold{fold}.tsv"


use rule train_regression as train_regression_experiment with:
    input:
        unpack(get_model_input),
    output:
        directory("results/experiments/{experiment}/models/regression/fold{fold}"),
    params:
        settings=lambda wildcards: experiment_slice(wildcards, "regression"),
        method=lambda wildcards: f"decomposition+regression @{wildcards.experiment}",
        checkpoints=lambda wildcards: f"{run_root(wildcards)}/checkpoints/train_regression",
        code_version=train_settings.REGRESSION_CODE_VERSION,
    log:
        "results/logs/experiments/{experiment}/train_regression/fold{fold}.log",
    benchmark:
        "results/benchmarks/experiments/{experiment}/train_regression/fold{fold}.tsv"
