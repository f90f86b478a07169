"""A model artifact's manifest: each file's SHA-256 and size, and one digest over them all (the
ModelDigest every cache key names). Written by the model pipeline; read by workers and the API."""

from __future__ import annotations

import hashlib
import json

MANIFEST = "manifest.json"


def artifact_digest(files: dict[str, dict]) -> str:
    """One digest for the whole directory: SHA-256 of the sorted file -> sha256 map."""
    canon = json.dumps({k: v["sha256"] for k, v in sorted(files.items())}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()
