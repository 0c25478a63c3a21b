# Aggregate QC: every patient's status per stage, failures with their reason.


rule qc_ingest:
    input:
        ct=expand("results/ct/{patient}", patient=PATIENTS),
        xray=expand("results/xray/{patient}", patient=PATIENTS),
    output:
        "results/qc/ingest.tsv",
    log:
        "results/logs/qc_ingest.log",
    benchmark:
        "results/benchmarks/qc_ingest.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/bmdpipe.yaml"
    script:
        "../workflow_scripts/qc_table.py"
