# Aggregate QC: every patient's status per stage, failures with their reason.


rule qc_table:
    input:
        ct=expand("results/ct/{patient}", patient=PATIENTS),
        xray=expand("results/xray/{patient}", patient=PATIENTS),
        calibration=expand("results/calibration/{patient}", patient=PATIENTS),
        segment=expand("results/segment/{patient}", patient=PATIENTS),
        roi=expand("results/roi/{patient}", patient=PATIENTS),
        register=expand("results/register/{patient}", patient=PATIENTS),
        targets=expand("results/targets/{patient}", patient=PATIENTS),
    output:
        report("results/qc/patients.tsv", caption="../report/qc_table.rst", category="Quality control"),
    log:
        "results/logs/qc_table.log",
    benchmark:
        "results/benchmarks/qc_table.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/bmdpipe.yaml"
    script:
        "../workflow_scripts/qc_table.py"
