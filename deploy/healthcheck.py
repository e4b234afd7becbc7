"""The images' HEALTHCHECK: exit 0 while `qwenkit serve` answers 200 on /health, 1 otherwise (starting,
draining after SIGTERM, or gone). Standard library only, so the runtime image needs no curl."""

import os
import sys
import urllib.request

# as `qwenkit serve` reads it: empty or blank is unset
port = os.environ.get("QWENKIT_PORT", "").strip() or "8000"
url = f"http://127.0.0.1:{port}/health"
try:
    with urllib.request.urlopen(url, timeout=float(os.environ.get("HEALTHCHECK_TIMEOUT", "2"))) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError:  # connection refused, timeout, and HTTPError (503 while draining) are all OSErrors
    sys.exit(1)
