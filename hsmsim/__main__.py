"""`python -m hsmsim`: the hsmsim command line."""

import sys

from hsmsim.cli import main

sys.exit(main())
