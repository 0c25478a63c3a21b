"""Imported first by every workflow script: makes ``bmdpipe`` importable.

With the project's virtual environment bmdpipe is installed; in a conda
environment made by ``snakemake --sdm conda`` it is not, so the repository
(the parent of this folder) is put on ``sys.path``.
"""

import sys
from pathlib import Path

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
