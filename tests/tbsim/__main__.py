"""`python3 -m tbsim` (or `python3 -m tests.tbsim` from the repository root)."""

import sys

from .cli import main

sys.exit(main())
