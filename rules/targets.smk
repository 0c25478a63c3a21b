# Training targets: per registered radiograph, the bone projection (stage 1)
# and the clinical-ROI projection (stage 2) in g/cm², with the radiograph in
# the same frame; failed registrations are left out and listed.


rule targets:
    input:
        register="results/register/{patient}",
        xray="results/xray/{patient}",
        calibration="results/calibration/{patient}",
        segment="results/segment/{patient}",
        roi="results/roi/{patient}",
    output:
        directory("results/targets/{patient}"),
    params:
        settings=config["targets"],
        on_error=config["on_patient_error"],
        code_version=targets_stage.STAGE_VERSION,
    log:
        "results/logs/targets/{patient}.log",
    benchmark:
        "results/benchmarks/targets/{patient}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "../envs/bmdpipe.yaml"
    script:
        "../workflow_scripts/targets.py"
