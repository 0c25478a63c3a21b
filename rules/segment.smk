# Bone segmentation: supplied label maps, the Bayesian U-Net (trained on the
# labelled patients, run with MC dropout) or the threshold fallback.


rule train_segmenter:
    input:
        unpack(get_segmenter_training_input),
    output:
        directory("results/models/segmenter"),
    params:
        cases=get_segmenter_training_cases,
        unet=segment_unet.training_config(config["segment"]["unet"]),
        device=config["segment"]["device"],
        on_error=config["on_patient_error"],
        code_version=segment_unet.STAGE_VERSION,
    log:
        "results/logs/train_segmenter.log",
    benchmark:
        "results/benchmarks/train_segmenter.tsv"
    threads: 2
    resources:
        mem_mb=6000,
        gpu=SEGMENT_GPUS,
    conda:
        "../envs/bmdpipe.yaml"
    script:
        "../workflow_scripts/train_segmenter.py"


rule segment:
    input:
        unpack(get_segment_input),
    output:
        directory("results/segment/{patient}"),
    params:
        method=get_segment_method,
        threshold_hu=config["segment"]["threshold_hu"],
        mc_samples=config["segment"]["unet"]["mc_samples"],
        inference_grids=config["segment"]["unet"]["inference_grids"],
        device=config["segment"]["device"],
        on_error=config["on_patient_error"],
        code_version=f"{segment_stage.STAGE_VERSION}+unet{segment_unet.STAGE_VERSION}",
    log:
        "results/logs/segment/{patient}.log",
    benchmark:
        "results/benchmarks/segment/{patient}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        gpu=SEGMENT_GPUS,
    conda:
        "../envs/bmdpipe.yaml"
    script:
        "../workflow_scripts/segment.py"
