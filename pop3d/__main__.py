"""`python -m pop3d` is the `pop3d` command."""

import sys

from pop3d.cli import main

sys.exit(main())
