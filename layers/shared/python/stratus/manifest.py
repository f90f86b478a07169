"""A model artifact's manifest: each file's SHA-256 and size, and one digest over them all (the
ModelDigest every cache key names). Written by the model pipeline; read by workers and the API."""

from __future__ import annotations

import hashlib
import json

from stratus.errors import ModelLoadError

MANIFEST = "manifest.json"


def split_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/prefix/ -> (bucket, "prefix/"); ModelLoadError for anything else."""
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise ModelLoadError(f"model URI must look like s3://bucket/prefix/, got {uri!r}")
    bucket, prefix = uri[5:].split("/", 1)
    return bucket, prefix.rstrip("/") + "/"


def artifact_digest(files: dict[str, dict]) -> str:
    """One digest for the whole directory: SHA-256 of the sorted file -> sha256 map."""
    canon = json.dumps({k: v["sha256"] for k, v in sorted(files.items())}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()
