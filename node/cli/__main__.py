"""``python -m node.cli``: the swarmnode command (node/cli/main.py)."""

import sys

from node.cli.main import main

sys.exit(main())
