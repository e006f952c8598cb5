"""`python -m fleetserve` runs the fleetserve command line."""

import sys

from fleetserve.server.cli import main

sys.exit(main())
