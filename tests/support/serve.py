"""Start `stratus serve` (what `make serve` runs) as a terminal would, for the tests that call it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path


def start(
    model: Path | list[Path], logs: Path, port: int, key: str, workers: int, threads: int, env: dict | None = None
):
    """-> (the process, in its own process group as a terminal's foreground job; its moto URL; the
    model id it serves, the first of several), once it prints "Ready on". Fails with what it
    printed otherwise."""
    models = [model] if isinstance(model, Path) else model
    proc = subprocess.Popen(
        [sys.executable, "-m", "stratus_cli.main", "serve", *(a for m in models for a in ("--model", str(m)))]
        + ["--port", str(port), "--workers", str(workers), "--threads", str(threads)],
        env={**os.environ, "STRATUS_API_KEY": key, "STRATUS_LOCAL_LOG_DIR": str(logs), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    out, deadline = [], time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        out.append(line)
        if line.startswith("Ready on"):
            break
    text = "".join(out)
    assert "Ready on" in text, text
    return proc, re.search(r"AWS \(moto\) (\S+)", text).group(1), re.search(r"models? ([^,)\s]+)", text).group(1)
