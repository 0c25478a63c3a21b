# Training (seed 004): patient-level folds, then per fold the hierarchical
# decomposition GAN (stage 1, stage 2), BMD from the decomposed image, stage-3
# regression and the conventional baseline; seed 000's landmark detector and its
# five models on the same folds; the metrics pool the held-out folds.
# Each rule's params carry its config slice and the code version, so a changed
# setting re-trains only what depends on it. Killed training resumes from the
# checkpoints under results/checkpoints/. With train.processes > 1 the GAN,
# stage-3 and baseline jobs run under torchrun (DistributedDataParallel), one
# process per GPU with train.device: cuda (resources gpu=processes).


rule folds:
    input:
        targets=expand("results/targets/{patient}", patient=PATIENTS),
        samples=COHORT["samples"],
    output:
        "results/dataset/folds.json",
    params:
        settings=train_slice(),
        code_version=train_settings.STAGE_VERSION,
    log:
        "results/logs/folds.log",
    benchmark:
        "results/benchmarks/folds.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/bmdpipe.yaml"
    script:
        "../workflow_scripts/folds.py"


rule train_decomposition:
    input:
        unpack(get_decomposition_input),
    output:
        directory("results/models/decomposition/fold{fold}/stage{stage}"),
    params:
        settings=lambda wildcards: train_slice(f"stage{wildcards.stage}"),
        checkpoints="results/checkpoints/decomposition",
        code_version=train_settings.STAGE_VERSION,
    log:
        "results/logs/train_decomposition/fold{fold}_stage{stage}.log",
    benchmark:
        "results/benchmarks/train_decomposition/fold{fold}_stage{stage}.tsv"
    threads: 2
    resources:
        mem_mb=6000,
        gpu=TRAIN_GPUS,
    conda:
        "../envs/bmdpipe.yaml"
    script:
        "../workflow_scripts/train_decomposition.py"


rule bmd_from_decomposition:
    input:
        unpack(get_model_input),
    output:
        directory("results/models/decomposition/fold{fold}/bmd"),
    params:
        settings=train_slice("bmd"),
        tag="",  # appended to the method names (an experiment's " @{name}")
        code_version=train_settings.STAGE_VERSION,
    log:
        "results/logs/bmd_from_decomposition/fold{fold}.log",
    benchmark:
        "results/benchmarks/bmd_from_decomposition/fold{fold}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        gpu=INFER_GPUS,
    conda:
        "../envs/bmdpipe.yaml"
    script:
        "../workflow_scripts/bmd_from_decomposition.py"


rule train_regression:
    input:
        unpack(get_model_input),
    output:
        directory("results/models/regression/fold{fold}"),
    params:
        settings=train_slice("regression"),
        method="decomposition+regression",
        checkpoints="results/checkpoints/train_regression",
        code_version=train_settings.REGRESSION_CODE_VERSION,
    log:
        "results/logs/train_regression/fold{fold}.log",
    benchmark:
        "results/benchmarks/train_regression/fold{fold}.tsv"
    threads: 2
    resources:
        mem_mb=6000,
        gpu=TRAIN_GPUS,
    conda:
        "../envs/bmdpipe.yaml"
    script:
        "../workflow_scripts/train_regression.py"


rule train_baseline:
    input:
        unpack(get_fold_data),
    output:
        directory("results/models/baseline/fold{fold}"),
    params:
        settings=train_slice("baseline"),
        method="baseline",
        checkpoints="results/checkpoints/train_baseline",
        code_version=train_settings.STAGE_VERSION,
    log:
        "results/logs/train_baseline/fold{fold}.log",
    benchmark:
        "results/benchmarks/train_baseline/fold{fold}.tsv"
    threads: 2
    resources:
        mem_mb=6000,
        gpu=TRAIN_GPUS,
    conda:
        "../envs/bmdpipe.yaml"
    script:
        "../workflow_scripts/train_regression.py"


rule train_localiser:
    input:
        unpack(get_fold_data),
        xrays=expand("results/xray/{patient}", patient=PATIENTS),
    output:
        directory("results/models/localiser/fold{fold}"),
    params:
        settings=train_slice("localiser"),
        field_size=config["targets"]["size"],
        code_version=train_settings.STAGE_VERSION,
    log:
        "results/logs/train_localiser/fold{fold}.log",
    benchmark:
        "results/benchmarks/train_localiser/fold{fold}.tsv"
    threads: 2
    resources:
        mem_mb=3000,
        gpu=INFER_GPUS,
    conda:
        "../envs/bmdpipe.yaml"
    script:
        "../workflow_scripts/train_localiser.py"


rule train_chest_landmarks:
    input:
        unpack(get_chest_landmarks_input),
    output:
        directory("results/models/chest_landmarks/fold{fold}"),
    params:
        settings=train_slice("chest_landmarks"),
        code_version=train_settings.STAGE_VERSION,
    log:
        "results/logs/train_chest_landmarks/fold{fold}.log",
    benchmark:
        "results/benchmarks/train_chest_landmarks/fold{fold}.tsv"
    threads: 2
    resources:
        mem_mb=3000,
        gpu=INFER_GPUS,
    conda:
        "../envs/bmdpipe.yaml"
    script:
        "../workflow_scripts/train_chest_landmarks.py"


rule train_chest_bmd:
    input:
        unpack(get_chest_bmd_input),
    output:
        directory("results/models/chest_bmd/fold{fold}"),
    params:
        settings=train_slice("chest_bmd"),
        code_version=train_settings.STAGE_VERSION,
    log:
        "results/logs/train_chest_bmd/fold{fold}.log",
    benchmark:
        "results/benchmarks/train_chest_bmd/fold{fold}.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        gpu=INFER_GPUS,
    conda:
        "../envs/bmdpipe.yaml"
    script:
        "../workflow_scripts/train_chest_bmd.py"


rule robustness:
    input:
        unpack(get_fold_data),
        xrays=expand("results/xray/{patient}", patient=PATIENTS),
        generator="results/models/decomposition/fold{fold}/stage2",
        bmd="results/models/decomposition/fold{fold}/bmd",
        regression="results/models/regression/fold{fold}",
        baseline="results/models/baseline/fold{fold}",
        localiser="results/models/localiser/fold{fold}",
    output:
        directory("results/models/robustness/fold{fold}"),
    params:
        settings=train_slice("shared"),
        field_size=config["targets"]["size"],
        qualities=config["evaluate"]["jpeg_qualities"],
    log:
        "results/logs/robustness/fold{fold}.log",
    benchmark:
        "results/benchmarks/robustness/fold{fold}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        gpu=INFER_GPUS,
    conda:
        "../envs/bmdpipe.yaml"
    script:
        "../workflow_scripts/robustness.py"


rule evaluate_bmd:
    input:
        decomposition=expand("results/models/decomposition/fold{fold}/bmd", fold=FOLDS),
        regression=expand("results/models/regression/fold{fold}", fold=FOLDS),
        baseline=expand("results/models/baseline/fold{fold}", fold=FOLDS),
        robustness=expand("results/models/robustness/fold{fold}", fold=FOLDS),
        experiments=experiment_results(),
        chest_bmd=chest_bmd_models(),
        samples=COHORT["samples"],
    output:
        metrics=report("results/metrics/bmd.tsv", caption="../report/bmd.rst", category="Results"),
        figures="results/metrics/bmd.json",
        predictions="results/metrics/predictions.tsv",
    params:
        settings=config["evaluate"],
    log:
        "results/logs/evaluate_bmd.log",
    benchmark:
        "results/benchmarks/evaluate_bmd.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/bmdpipe.yaml"
    script:
        "../workflow_scripts/evaluate_bmd.py"


rule export_model:
    input:
        folds="results/dataset/folds.json",
        generator=expand("results/models/decomposition/fold{fold}/stage2", fold=FOLDS),
        bmd=expand("results/models/decomposition/fold{fold}/bmd", fold=FOLDS),
        regression=expand("results/models/regression/fold{fold}", fold=FOLDS),
        localiser=expand("results/models/localiser/fold{fold}", fold=FOLDS),
    output:
        directory("results/model"),
    params:
        field_size=config["targets"]["size"],
        train={"sites": TRAIN["sites"], "image_size": TRAIN["image_size"]},
        tscore_reference=config["evaluate"]["tscore_reference"],
        quality=config["predict"],
    log:
        "results/logs/export_model.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/bmdpipe.yaml"
    script:
        "../workflow_scripts/export_model.py"
