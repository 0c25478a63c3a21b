"""bmdpipe: bone mineral density from plain radiographs, learned from calibrated CT.

Every stage of the Snakemake workflow is a function here, usable without
Snakemake; see ``bmdpipe --help`` for the command-line tools.
"""

__version__ = "0.1.0"
