"""``python -m fastvit.selftest`` (see :mod:`fastvit.selftest`)."""

import sys

from fastvit.selftest import main

sys.exit(main())
