# Clinical ROI: the regions DXA measures (vertebral DXA sites, proximal femur)
# and DXA-like areal BMD from the calibrated CT, per patient.


rule roi:
    input:
        calibration="results/calibration/{patient}",
        segment="results/segment/{patient}",
    output:
        directory("results/roi/{patient}"),
    params:
        roi=config["roi"],
        on_error=config["on_patient_error"],
        code_version=roi_stage.STAGE_VERSION,
    log:
        "results/logs/roi/{patient}.log",
    benchmark:
        "results/benchmarks/roi/{patient}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "../envs/bmdpipe.yaml"
    script:
        "../workflow_scripts/roi.py"
