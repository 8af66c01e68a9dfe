"""``python -m fastvit`` prints the same report as ``python -m fastvit.info``."""

import sys

from fastvit.info import main

sys.exit(main())
