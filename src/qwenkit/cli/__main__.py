import sys

from qwenkit.cli import main

sys.exit(main())
