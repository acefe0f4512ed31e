"""`python -m nvfp4cal calibrate ...` (see nvfp4cal.cli)."""
import sys

from .cli import main

sys.exit(main())
