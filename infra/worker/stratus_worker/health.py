"""Container health check (the image's HEALTHCHECK, an ECS task's healthCheck): healthy when the
queue worker's main loop has run in the last 2 minutes, or SageMaker's /ping answers 200.

  python -m stratus_worker.health   -> exit 0 healthy, 1 not
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ALIVE_FILE = Path(tempfile.gettempdir()) / "stratus-worker.alive"  # touched by the worker's housekeeping
STALE_S = 120


def touch() -> None:
    ALIVE_FILE.touch()


def healthy() -> bool:
    if ALIVE_FILE.exists() and time.time() - ALIVE_FILE.stat().st_mtime < STALE_S:
        return True
    port = os.environ.get("SAGEMAKER_BIND_TO_PORT") or "8080"
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=3) as r:
            return r.status == 200
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(0 if healthy() else 1)
