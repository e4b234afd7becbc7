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
    # one write of the whole line: the ranks share the terminal, and print's separate writes interleave
    sys.stderr.flush()
    os.write(2, f"error (rank {os.environ.get('RANK', '0')}): {e}\n".encode())
    sys.exit(2)
