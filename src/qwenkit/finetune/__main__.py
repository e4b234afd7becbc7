"""``torchrun --nproc_per_node N -m qwenkit.finetune MODEL DATA OUT [...]``: the finetune command per process.

User errors print one line (with the rank) and exit 2, as ``qwenkit finetune`` does.
"""

import os
import sys

from qwenkit.errors import QwenkitError
from qwenkit.finetune.command import main

try:
    sys.exit(main(sys.argv[1:]))
except QwenkitError as e:
    print(f"error (rank {os.environ.get('RANK', '0')}): {e}", file=sys.stderr)
    sys.exit(2)
