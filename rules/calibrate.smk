# CT calibration: HU → mg/cm³ hydroxyapatite, per patient.


rule calibrate:
    input:
        ct="results/ct/{patient}",
    output:
        directory("results/calibration/{patient}"),
    params:
        method=get_calibration_method,
        phantom=config["calibrate"]["phantom"],
        phantomless=config["calibrate"]["phantomless"],
        on_error=config["on_patient_error"],
        code_version=calibrate_stage.STAGE_VERSION,
    log:
        "results/logs/calibrate/{patient}.log",
    benchmark:
        "results/benchmarks/calibrate/{patient}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "../envs/bmdpipe.yaml"
    script:
        "../workflow_scripts/calibrate.py"
