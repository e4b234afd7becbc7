"""``torchrun --nproc_per_node N -m qwenkit.finetune MODEL DATA OUT [...]``: the finetune command per process.

User errors print one line (with the rank) and exit 2, as ``qwenkit finetune`` does; Ctrl-C exits 130
without a traceback from each rank; a rank that only lost another rank exits quietly (``on_lost_rank``).
"""

import os
import sys

from qwenkit.errors import QwenkitError
from qwenkit.finetune.command import main, on_lost_rank

try:
    sys.exit(on_lost_rank(main)(sys.argv[1:]))
except QwenkitError as e:
    # one write of the whole line: the ranks share the terminal, and print's separate writes interleave
    sys.stderr.flush()
    os.write(2, f"error (rank {os.environ.get('RANK', '0')}): {e}\n".encode())
    sys.exit(2)
except KeyboardInterrupt:  # Ctrl-C reaches every rank; rank 0 has said where --resume continues
    sys.exit(130)
