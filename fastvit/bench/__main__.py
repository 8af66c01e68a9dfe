"""``python -m fastvit.bench``: the same command as ``fastvit-bench`` (see :mod:`fastvit.bench.cli`)."""

import sys

from fastvit.bench.cli import main

sys.exit(main())
