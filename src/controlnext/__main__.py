"""`python -m controlnext ...`: the same command line as `controlnext ...`."""

import sys

from .cli import main

sys.exit(main())
