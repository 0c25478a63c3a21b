# The report: one self-contained HTML page (bmdpipe.report) built from the
# finished results/ folder: cohort, QC of every stage, training curves, the
# results table in seed 004 Table 2's layout, screening, per-pose results,
# scatter and Bland-Altman plots, decomposition examples.


rule report:
    input:
        unpack(get_report_input),
    output:
        report("results/report/index.html", caption="../report/index.rst", category="Report"),
    log:
        "results/logs/report.log",
    benchmark:
        "results/benchmarks/report.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../envs/bmdpipe.yaml"
    script:
        "../workflow_scripts/report.py"
