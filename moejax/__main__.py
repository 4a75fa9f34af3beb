"""`python -m moejax ...` is the `moejax` command."""

import sys

from moejax.cli.main import main

sys.exit(main())
