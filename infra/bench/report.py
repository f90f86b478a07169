"""Where benchmark scripts leave their figures: <out>/<name>.json."""

from __future__ import annotations

import json
from pathlib import Path


def write(out: str | Path, name: str, report: dict) -> Path:
    path = Path(out) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return path
