# Data sources: cohorts the workflow writes itself before ingesting them like
# any hospital's files.


if COHORT["source"] == "public_demo":

    rule demo_cohort:
        output:
            sheet=COHORT["samples"],
            cts=[
                directory(p) if not p.endswith((".nii", ".nii.gz")) else p
                for p in SAMPLES.ct.unique()
            ],
            xrays=list(SAMPLES.xray),
        params:
            cache=COHORT["cache_dir"],
        log:
            "results/logs/demo_cohort.log",
        benchmark:
            "results/benchmarks/demo_cohort.tsv"
        threads: 1
        resources:
            mem_mb=4000,
        conda:
            "../envs/bmdpipe.yaml"
        script:
            "../workflow_scripts/demo_cohort.py"
