# 2D-3D registration of each radiograph to its CT, and the training targets
# (bone and ROI projections in the registered pose), per patient.


rule register:
    input:
        unpack(get_register_input),
    output:
        directory("results/register/{patient}"),
    params:
        settings=config["register"],
        on_error=config["on_patient_error"],
        code_version=register_stage.STAGE_VERSION,
    log:
        "results/logs/register/{patient}.log",
    benchmark:
        "results/benchmarks/register/{patient}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "../envs/bmdpipe.yaml"
    script:
        "../workflow_scripts/register.py"
