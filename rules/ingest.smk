# Ingestion: hospital files → volumes and images with geometry, no PHI.


rule ingest_ct:
    input:
        ct=get_ct,
    output:
        directory("results/ct/{patient}"),
    params:
        series_uid=get_ct_series_uid,
        settings=config["ingest"]["ct"],
        on_error=config["on_patient_error"],
        code_version=ct_io.STAGE_VERSION,
    log:
        "results/logs/ingest_ct/{patient}.log",
    benchmark:
        "results/benchmarks/ingest_ct/{patient}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "../envs/bmdpipe.yaml"
    script:
        "../workflow_scripts/ingest_ct.py"


rule ingest_xray:
    input:
        xrays=get_xrays,
    output:
        directory("results/xray/{patient}"),
    params:
        rows=get_xray_rows,
        settings=config["ingest"]["xray"],
        on_error=config["on_patient_error"],
        code_version=xray_io.STAGE_VERSION,
    log:
        "results/logs/ingest_xray/{patient}.log",
    benchmark:
        "results/benchmarks/ingest_xray/{patient}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../envs/bmdpipe.yaml"
    script:
        "../workflow_scripts/ingest_xray.py"
