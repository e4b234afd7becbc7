"""``python -m qwenkit ...``: the ``qwenkit`` command, for environments without its script on PATH."""

import sys

from qwenkit.cli import main

sys.exit(main())
