"""`python -m fleetserve.server` runs the fleetserve command line (as `python -m fleetserve`)."""

import sys

from fleetserve.server.cli import main

sys.exit(main())
