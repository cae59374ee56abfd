"""``python -m verl.distill.evaluation``: the evaluation command line (see ``--help``)."""

import sys

from verl.distill.evaluation.cli import main

sys.exit(main())
