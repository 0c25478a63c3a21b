# Data sources: cohorts the workflow writes itself before ingesting them like
# any hospital's files.


if COHORT["source"] == "public_demo":

    rule demo_cohort:
        output:
            sheet=COHORT["samples"],
            cts=[directory(p) for p in COHORT_FILES["cts"]],
            files=COHORT_FILES["files"],
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


if COHORT["source"] == "simulate":
    from bmdpipe.simulate.cohort import SIMULATOR_VERSION

    rule simulate_cohort:
        output:
            sheet=COHORT["samples"],
            cts=[directory(p) for p in COHORT_FILES["cts"]],
            files=COHORT_FILES["files"],
            truth=directory(str(Path(COHORT["samples"]).parent / "truth")),
        params:
            simulate=COHORT["simulate"],
            cache=COHORT["cache_dir"],
            code_version=SIMULATOR_VERSION,
        log:
            "results/logs/simulate_cohort.log",
        benchmark:
            "results/benchmarks/simulate_cohort.tsv"
        threads: 1
        resources:
            mem_mb=6000,
        conda:
            "../envs/bmdpipe.yaml"
        script:
            "../workflow_scripts/simulate_cohort.py"
