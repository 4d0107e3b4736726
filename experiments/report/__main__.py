"""``python -m experiments.report <sweep dir> [...]``: the comparison report of sweeps."""

import sys

from experiments.report.sweep_report import main

sys.exit(main())
