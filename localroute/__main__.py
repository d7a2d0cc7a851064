"""`python -m localroute` is the `localroute` command."""

from __future__ import annotations

import sys

from localroute.cli import main

sys.exit(main())
