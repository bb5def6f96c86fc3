"""``python -m taperfx``: the same command line as the ``taperfx`` script."""

import sys

from taperfx.cli import main

sys.exit(main())
