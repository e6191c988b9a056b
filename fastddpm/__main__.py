"""`python -m fastddpm` is the `fastddpm` command."""

import sys

from .cli import main

sys.exit(main())
