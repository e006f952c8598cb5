"""`python -m server` runs the fleetserve command line."""

import sys

from server.cli import main

sys.exit(main())
