# bmdpipe: bone mineral density from plain radiographs, learned from CT.
# Run: snakemake --cores all   (see README.md; resources live in profiles/)
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/ingest.smk"
include: "rules/calibrate.smk"
include: "rules/segment.smk"
include: "rules/roi.smk"
include: "rules/register.smk"
include: "rules/targets.smk"
include: "rules/qc.smk"
include: "rules/train.smk"
include: "rules/experiments.smk"
include: "rules/report.smk"


rule all:
    input:
        get_final_output(),
    default_target: True
