"""API keys (stored only as SHA-256 hashes) and per-tenant rate limits, both in the jobs table.

Limits are enforced with one conditional UpdateItem per counter, so they hold across every Lambda
instance: requests per minute (1 a request) and tokens per minute (prompt bytes / 4 + max_tokens,
an upper estimate charged up front).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from botocore.exceptions import ClientError

from stratus.errors import RateLimited, Unauthorized

KEY_PREFIX = "sk-stratus-"
COUNTER_TTL_S = 120


@dataclass(frozen=True)
class Tenant:
    name: str
    rpm: int
    tpm: int


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(table, tenant: str, rpm: int, tpm: int) -> str:
    """Store a new key's hash for `tenant`; returns the key itself (shown once, never stored)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    table.put_item(Item={"pk": f"key#{hash_key(key)}", "tenant": tenant, "rpm": rpm, "tpm": tpm,
                         "created_at": int(time.time())},
                   ConditionExpression="attribute_not_exists(pk)")
    return key


def revoke_key(table, key: str) -> bool:
    try:
        table.update_item(Key={"pk": f"key#{hash_key(key)}"}, UpdateExpression="SET revoked = :t",
                          ConditionExpression="attribute_exists(pk)", ExpressionAttributeValues={":t": True})
        return True
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
            return False
        raise


def authenticate(table, authorization: str | None) -> Tenant:
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Unauthorized("missing API key: send Authorization: Bearer <key>")
    key = authorization[7:].strip()
    item = table.get_item(Key={"pk": f"key#{hash_key(key)}"}).get("Item")
    if item is None or item.get("revoked"):
        raise Unauthorized("invalid API key")
    return Tenant(item["tenant"], int(item["rpm"]), int(item["tpm"]))


def charge(table, tenant: Tenant, tokens: int, *, now: float | None = None) -> None:
    """Count one request and `tokens` against this minute's limits; raises RateLimited (429)."""
    now = now or time.time()
    minute = int(now // 60)
    retry_after = 60 - int(now % 60)
    for kind, amount, limit in (("rpm", 1, tenant.rpm), ("tpm", tokens, tenant.tpm)):
        if amount > limit:
            raise RateLimited(f"request needs ~{amount} tokens, above the {limit} tokens-per-minute limit",
                              retry_after_s=retry_after)
        try:
            table.update_item(
                Key={"pk": f"rl#{tenant.name}#{kind}#{minute}"},
                UpdateExpression="ADD used :n SET expires_at = :exp",
                ConditionExpression="attribute_not_exists(used) OR used <= :room",
                ExpressionAttributeValues={":n": amount, ":room": limit - amount, ":exp": int(now) + COUNTER_TTL_S},
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise
            what = "requests" if kind == "rpm" else "tokens"
            raise RateLimited(f"rate limit reached: {limit} {what} per minute for tenant {tenant.name}",
                              retry_after_s=retry_after) from exc
