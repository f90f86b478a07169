"""API keys (stored only as SHA-256 hashes) and per-tenant rate limits, both in the jobs table.

Limits are enforced with one conditional UpdateItem on a per-tenant, per-minute counter item, so
they hold across every Lambda instance: requests per minute (1 a request) and tokens per minute
(prompt bytes / 4 + max_tokens, an upper estimate charged up front). Batch lines have a budget of
their own, charged when they are released to the batch queue (batch tokens per minute: the
tenant item's batch_tpm, else BatchTokensPerMinute). Key lookups are cached for
KEY_CACHE_TTL_S on a warm instance (revocation takes effect within that time).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

from botocore.exceptions import ClientError

from stratus.errors import Forbidden, InvalidRequest, RateLimited, Unauthorized
from stratus.observability import logger

KEY_PREFIX = "sk-stratus-"
COUNTER_TTL_S = 120


@dataclass(frozen=True)
class Tenant:
    name: str
    rpm: int
    tpm: int
    tier: str = "interactive"  # stratus.contracts.TIERS: where this tenant's API requests are scheduled
    models: tuple[str, ...] | None = None  # the model ids its key may use (None: every model)

    def may_use(self, model_id: str) -> bool:
        return self.models is None or model_id in self.models

    def check_model(self, model_id: str) -> None:
        """Forbidden (403) unless the key may use this model."""
        if not self.may_use(model_id):
            raise Forbidden(
                f"this API key may not use model {model_id!r} (it may use {', '.join(self.models) or 'none'})",
                param="model",
            )

    @classmethod
    def trusted(cls, name: str) -> Tenant:
        """A tenant whose work arrived by a path that does not charge its limits (no key, no rate):
        a batch file's lines (the upload was the charge), a requests-queue message (the queue's IAM
        policy is the gate). Its limits are zero, so a path that did charge it would refuse."""
        return cls(name, rpm=0, tpm=0)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # an S3 path segment and a key part as it is


def check_tenant(name) -> str:
    """A tenant name becomes an S3 path segment (batches/input/<tenant>/) and part of table keys:
    1-64 letters, digits, '.', '_' or '-', starting with a letter or digit. InvalidRequest otherwise."""
    if not isinstance(name, str) or not TENANT.fullmatch(name):
        raise InvalidRequest(
            "a tenant name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit", param="tenant"
        )
    return name


def set_batch_tpm(table, tenant: str, batch_tpm: int) -> None:
    """Give `tenant` a batch budget of its own (tokens of batch lines released a minute)."""
    check_tenant(tenant)
    if not isinstance(batch_tpm, int) or batch_tpm < 1:
        raise InvalidRequest("a batch budget is a whole number of tokens per minute, 1 or more", param="batch_tpm")
    table.update_item(
        Key={"pk": f"tenant#{tenant}"},
        UpdateExpression="SET batch_tpm = :n",
        ExpressionAttributeValues={":n": batch_tpm},
    )


def create_key(
    table,
    tenant: str,
    rpm: int,
    tpm: int,
    *,
    key: str | None = None,
    tier: str = "interactive",
    models: list[str] | None = None,
) -> str:
    """Store a new key's hash for `tenant`; returns the key itself (shown once, never stored).
    `key` registers a chosen key instead (local mode's STRATUS_API_KEY); `tier`: the scheduling
    tier of the tenant's API requests (a batch tenant's requests wait behind interactive work);
    `models`: the model ids the key may use (None: every model, those added later included)."""
    from stratus.contracts import TIERS

    check_tenant(tenant)
    if tier not in TIERS:
        raise InvalidRequest(f"tier must be one of {', '.join(TIERS)}, got {tier!r}", param="tier")
    key = key or KEY_PREFIX + secrets.token_urlsafe(32)
    table.put_item(
        Item={
            "pk": f"key#{hash_key(key)}",
            "tenant": tenant,
            "rpm": rpm,
            "tpm": tpm,
            "tier": tier,
            "created_at": int(time.time()),
            **({"models": list(models)} if models is not None else {}),
        },
        ConditionExpression="attribute_not_exists(pk)",
    )
    return key


def revoke_key(table, key: str) -> bool:
    try:
        table.update_item(
            Key={"pk": f"key#{hash_key(key)}"},
            UpdateExpression="SET revoked = :t",
            ConditionExpression="attribute_exists(pk)",
            ExpressionAttributeValues={":t": True},
        )
        return True
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
            return False
        raise


KEY_CACHE_TTL_S = 30.0  # a revoked key stops working within this long on warm instances
KeyCache = dict  # sha256 of key -> (looked up at, Tenant or None); one per container, in Deps


def authenticate(
    table, authorization: str | None, cache: KeyCache | None = None, *, now: float | None = None
) -> Tenant:
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Unauthorized("missing API key: send Authorization: Bearer <key>")
    digest = hash_key(authorization[7:].strip())
    now = now or time.time()
    cache = {} if cache is None else cache
    cached = cache.get(digest)
    if cached is not None and now - cached[0] < KEY_CACHE_TTL_S:
        tenant = cached[1]
    else:
        item = table.get_item(Key={"pk": f"key#{digest}"}).get("Item")
        tenant = (
            None
            if item is None or item.get("revoked")
            else Tenant(
                item["tenant"],
                int(item["rpm"]),
                int(item["tpm"]),
                item.get("tier", "interactive"),
                tuple(item["models"]) if "models" in item else None,
            )
        )
        if len(cache) > 10_000:
            cache.clear()
        cache[digest] = (now, tenant)
    if tenant is None:
        raise Unauthorized("invalid API key")
    return tenant


def _counter(tenant: Tenant, now: float, kind: str = "rl") -> dict:
    """The key of the tenant's rate-limit counter (kind rl: API requests; brl: batch lines) for the
    minute `now` is in."""
    return {"pk": f"{kind}#{tenant.name}#{int(now // 60)}"}


def charge(table, tenant: Tenant, tokens: int, *, now: float | None = None) -> None:
    """Count one request and `tokens` against this minute's limits in one conditional update;
    raises RateLimited (429) with the seconds until the next window."""
    now = now or time.time()
    retry_after = 60 - int(now % 60)
    if tenant.rpm < 1:  # (the condition below lets a minute's first request through unchecked)
        raise RateLimited(f"tenant {tenant.name} may send no requests (0 requests per minute)", retry_after_s=60)
    if tokens > tenant.tpm:
        raise RateLimited(
            f"request needs ~{tokens} tokens, above the {tenant.tpm} tokens-per-minute limit", retry_after_s=retry_after
        )
    try:
        table.update_item(
            Key=_counter(tenant, now),
            UpdateExpression="ADD requests :one, tokens :n SET expires_at = :exp",
            ConditionExpression="attribute_not_exists(requests) OR (requests < :rpm AND tokens <= :room)",
            ExpressionAttributeValues={
                ":one": 1,
                ":n": tokens,
                ":rpm": tenant.rpm,
                ":room": tenant.tpm - tokens,
                ":exp": int(now) + COUNTER_TTL_S,
            },
        )
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
            raise
        raise RateLimited(
            f"rate limit reached for tenant {tenant.name}: {tenant.rpm} requests or {tenant.tpm} tokens per minute",
            retry_after_s=retry_after,
        ) from exc


def refund(table, tenant: Tenant, tokens: int, *, now: float) -> None:
    """Give back what charge(now=now) counted: the request failed before any work was queued (a 503).
    Best effort: a refund that fails is logged, and the minute's counter expires anyway."""
    try:
        table.update_item(
            Key=_counter(tenant, now),
            UpdateExpression="ADD requests :one, tokens :n",
            ConditionExpression="attribute_exists(requests)",
            ExpressionAttributeValues={":one": -1, ":n": -tokens},
        )
    except Exception:
        logger.warning("could not refund a failed request's charge", extra={"tenant": tenant.name})


@dataclass(frozen=True)
class BatchRoom:
    """A tenant's batch budget this minute."""

    budget: int  # batch tokens a minute
    used: int  # charged so far this minute

    @property
    def left(self) -> int:
        return max(self.budget - self.used, 0)


def batch_room(items, tenants: list[str], default_tpm: int, *, now: float) -> dict[str, BatchRoom]:
    """Each tenant's batch budget and what this minute's counter holds, read together: items(pks)
    -> the items there are (JobStore.items: a BatchGetItem per 50 tenants, not two reads a tenant)."""
    settings = {t: f"tenant#{t}" for t in tenants}
    counters = {t: _counter(Tenant.trusted(t), now, "brl")["pk"] for t in tenants}
    found = {i["pk"]: i for i in items([*settings.values(), *counters.values()])}
    return {
        t: BatchRoom(
            int(found.get(settings[t], {}).get("batch_tpm", default_tpm)),
            int(found.get(counters[t], {}).get("tokens", 0)),
        )
        for t in tenants
    }


def charge_batch(table, tenant: str, tokens: int, budget: int, *, now: float) -> bool:
    """Count `tokens` of released batch lines against this minute's batch budget; False (nothing
    counted) when they do not fit. A minute's first charge always fits, so a line larger than the
    budget still goes, one a minute."""
    try:
        table.update_item(
            Key=_counter(Tenant.trusted(tenant), now, "brl"),
            UpdateExpression="ADD tokens :n SET expires_at = :exp",
            ConditionExpression="attribute_not_exists(tokens) OR tokens <= :room",
            ExpressionAttributeValues={":n": tokens, ":room": budget - tokens, ":exp": int(now) + COUNTER_TTL_S},
        )
        return True
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
            raise
        return False
