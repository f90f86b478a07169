"""Reading batches for the API: one batch (the tenant's own), a page of the tenant's batches."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stratus.batches.model import BATCH_ID, Batch
from stratus.batches.store import BatchStore
from stratus.errors import InvalidRequest, NotFound

if TYPE_CHECKING:
    from stratus.deps import Deps

MAX_PAGE = 100  # batches a GET /v1/batches page holds at most


def get(batch_id: str, tenant: str, deps: Deps) -> Batch:
    if not isinstance(batch_id, str) or not BATCH_ID.fullmatch(batch_id):
        raise NotFound("batch not found: batch ids are 'batch_' + 24 hexadecimal digits")
    item = BatchStore.of(deps).item(batch_id)
    if item is None or item["tenant"] != tenant:
        raise NotFound(f"batch {batch_id!r} not found")
    return Batch.from_item(item)


def get_any(batch_id: str, deps: Deps) -> Batch:
    """A batch by id, whoever owns it (the batch function's own reads)."""
    return Batch.from_item(BatchStore.of(deps).item(batch_id))


def list_recent(tenant: str, deps: Deps, limit: int = 20, after: str | None = None) -> tuple[list[Batch], bool]:
    """GET /v1/batches: the tenant's batches, newest first, `limit` a page from the one after batch
    `after` (one Query of the tenant index) -> (the page, whether more follow)."""
    start = get(after, tenant, deps) if after is not None else None  # 404 for another tenant's or a malformed id
    return BatchStore.of(deps).page(tenant, limit, start)


def list_page(query: dict, tenant: str, deps: Deps) -> dict:
    """GET /v1/batches?limit=&after= -> the OpenAI list object."""
    raw = query.get("limit") or "20"
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_PAGE:  # ("²" is a digit to str.isdigit)
        raise InvalidRequest(f"limit must be an integer from 1 to {MAX_PAGE}", param="limit")
    page, more = list_recent(tenant, deps, int(raw), query.get("after"))
    data = [b.view(deps.settings.bucket) for b in page]
    return {
        "object": "list",
        "data": data,
        "has_more": more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }
