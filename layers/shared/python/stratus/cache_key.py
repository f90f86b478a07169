"""Cache keys: SHA-256 over a canonical, versioned JSON of everything that changes the output."""

from __future__ import annotations

import hashlib
import json

from stratus.contracts import InferenceRequest
from stratus.params import SAMPLING_VERSION

CACHE_KEY_VERSION = 2  # 2: the sampling version is part of the key


def cache_key(req: InferenceRequest, *, model_digest: str, scope: str) -> str:
    """scope: the tenant, or "*" when the operator shares the cache across tenants."""
    canon = {
        "v": CACHE_KEY_VERSION,
        "scope": scope,
        "model": req.model,
        "digest": model_digest,
        "sampling": SAMPLING_VERSION,
        **req.to_json(),  # route, messages / prompt, every generation parameter
    }
    blob = json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()
