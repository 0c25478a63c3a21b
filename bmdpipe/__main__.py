import sys

from bmdpipe.cli import main

sys.exit(main())
