"""BatchStore: every read and write of a batch item, each write's condition in one place.

A batch item is written by several runs that may overlap (an upload's ingest, the scheduled pass,
a cancel from the API, a run that died and one that took over): each transition below is a
conditional write, so a late or duplicate run never undoes a later one's work.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from boto3.dynamodb.conditions import Attr, Key

from stratus.batches.model import OPEN, OPEN_INDEX, TENANT_INDEX, Batch, BatchStatus, batch_key

if TYPE_CHECKING:
    from stratus.deps import Deps
    from stratus.jobstore import JobStore

_STATUS = {"#s": "status"}
# ":v" and ":p" in a condition: a batch whose file is still read or whose lines still go
_READING = {":v": BatchStatus.VALIDATING.value, ":p": BatchStatus.IN_PROGRESS.value}
T, U = TypeVar("T"), TypeVar("U")


class BatchStore:
    def __init__(self, table, jobs: JobStore) -> None:
        self.table = table
        self.jobs = jobs  # its BatchGetItem reads batch items too
        self._conditional = table.meta.client.exceptions.ConditionalCheckFailedException

    @classmethod
    def of(cls, deps: Deps) -> BatchStore:
        return cls(deps.table, deps.store)

    # ---- reads ----

    def item(self, batch_id: str) -> dict | None:
        return self.table.get_item(Key=batch_key(batch_id), ConsistentRead=True).get("Item")

    def page(self, tenant: str, limit: int, after: Batch | None) -> tuple[list[Batch], bool]:
        """A tenant's batches, newest first, `limit` from the one after `after` -> (them, more follow)."""
        kwargs = {
            "IndexName": TENANT_INDEX,
            "KeyConditionExpression": Key("batch_tenant").eq(tenant),
            "ScanIndexForward": False,
            "Limit": limit + 1,  # one more says whether more follow
        }
        if after is not None:
            kwargs["ExclusiveStartKey"] = {
                **batch_key(after.id),
                "batch_tenant": tenant,
                "created_at": after.created_at,
            }
        items = self.table.query(**kwargs).get("Items", [])
        return [Batch.from_item(i) for i in items[:limit]], len(items) > limit

    def open_count(self, tenant: str, *, besides: str = "") -> int:
        """A tenant's open batches but `besides` (the tenant index, which lags its items by moments)."""
        kwargs = {
            "IndexName": TENANT_INDEX,
            "KeyConditionExpression": Key("batch_tenant").eq(tenant),
            "FilterExpression": Attr("open_batch").exists(),
            "ProjectionExpression": "pk",
        }
        count = 0
        while True:
            got = self.table.query(**kwargs)
            count += sum(1 for i in got.get("Items", []) if i["pk"] != f"batch#{besides}")
            if "LastEvaluatedKey" not in got:
                return count
            kwargs["ExclusiveStartKey"] = got["LastEvaluatedKey"]

    def open_ids(self) -> list[str]:
        """Every open batch, oldest first (the open index, all pages; it lags behind the items)."""
        ids, kwargs = [], {"IndexName": OPEN_INDEX, "KeyConditionExpression": Key("open_batch").eq(OPEN)}
        while True:
            got = self.table.query(**kwargs)
            ids += [i["pk"].removeprefix("batch#") for i in got.get("Items", [])]
            if "LastEvaluatedKey" not in got:
                return ids
            kwargs["ExclusiveStartKey"] = got["LastEvaluatedKey"]

    def open_batches(self, ids: list[str]) -> list[Batch]:
        """These batches as they stand (strongly consistent, 100 a call), in the order given, less
        those no longer open (the index lags behind the items: a batch just finished is still listed)."""
        items = {i["pk"]: i for i in self.jobs.items([f"batch#{b}" for b in ids])}
        return [
            Batch.from_item(item)
            for b in ids
            if (item := items.get(f"batch#{b}")) is not None and item.get("open_batch") == OPEN
        ]

    # ---- writes ----

    def save(self, batch: Batch) -> None:
        """The whole item, unconditionally: a batch that failed or finished (no run writes it after)."""
        self.table.put_item(Item=batch.to_item())

    def put_new(self, batch: Batch) -> bool:
        """An upload's batch: new, or replacing the record POST /v1/batches announced -> False when
        it exists already (a redelivered event)."""
        return self._try(
            self.table.put_item,
            Item=batch.to_item(),
            ConditionExpression="attribute_not_exists(pk) OR (pending = :t AND #s = :v)",
            ExpressionAttributeNames=_STATUS,
            ExpressionAttributeValues={":t": True, ":v": BatchStatus.VALIDATING.value},
        )

    def announce(self, batch: Batch) -> bool:
        """POST /v1/batches: visible to GET at once, `pending` until its upload's run replaces it ->
        False when that run got there first."""
        return self._try(
            self.table.put_item,
            Item={**batch.to_item(), "pending": True},
            ConditionExpression="attribute_not_exists(pk)",
        )

    def lease(self, batch_id: str, me: str, now: int, lease_s: int) -> dict | None:
        """Hold a batch that has lines to read and nobody else reading -> its item before (None: no)."""
        return self._update(
            Key=batch_key(batch_id),
            UpdateExpression="SET ingest_until = :until, ingester = :me, attempting = ingested REMOVE pending",
            ConditionExpression="#s IN (:v, :p) AND (attribute_not_exists(lines_total) OR ingested < lines_total) "
            "AND (attribute_not_exists(ingest_until) OR ingest_until < :now OR ingester = :me)",
            ExpressionAttributeNames=_STATUS,
            ExpressionAttributeValues={":until": now + lease_s, ":me": me, ":now": now, **_READING},
            ReturnValues="ALL_OLD",
        )

    def unlease(self, batch_id: str, me: str) -> None:
        """Give the lease back, if still ours (never taken, or taken over: nothing to do)."""
        self._try(
            self.table.update_item,
            Key=batch_key(batch_id),
            UpdateExpression="REMOVE ingest_until, ingester",
            ConditionExpression="ingester = :me",
            ExpressionAttributeValues={":me": me},
        )

    def record_slice(self, batch: Batch, me: str, *, start: int, cursor: dict) -> bool:
        """Move the ingest cursor past a slice read from line `start` -> False when another run took
        the batch over meanwhile. cursor: ingested, lines_total, outbox, counts, read_offset,
        read_line, outbox_tokens."""
        values = {f":{k}": json.dumps(v) if k == "counts" else v for k, v in cursor.items()}
        return self._try(
            self.table.update_item,
            Key=batch_key(batch.id),
            UpdateExpression="SET " + ", ".join(f"{k} = :{k}" for k in cursor),
            # (the outbox as this slice found it: its messages went after batch.outbox, so a cursor
            # that moved meanwhile must not move again over messages another run wrote there)
            ConditionExpression="ingester = :me AND ingested = :start AND outbox = :was",
            ExpressionAttributeValues={**values, ":me": me, ":start": start, ":was": batch.outbox},
        )

    def begin(self, batch_id: str) -> None:
        """validating -> in_progress: its lines may be released. (In progress already, or cancelled
        meanwhile: it keeps the cancel.)"""
        self._set_while(batch_id, BatchStatus.VALIDATING, "SET #s = :p", {":p": BatchStatus.IN_PROGRESS.value})

    def start_cancel(self, batch_id: str, now: int) -> Batch | None:
        """validating | in_progress -> cancelling -> the batch now; None when it was neither."""
        item = self._update(
            Key=batch_key(batch_id),
            UpdateExpression="SET #s = :c, cancelling_at = :now",
            ConditionExpression="#s IN (:v, :p)",
            ExpressionAttributeNames=_STATUS,
            ExpressionAttributeValues={":c": BatchStatus.CANCELLING.value, ":now": now, **_READING},
            ReturnValues="ALL_NEW",
        )
        return None if item is None else Batch.from_item(item)

    def record_progress(self, batch: Batch, settled: int, settled_done: int, parts: dict[int, int]) -> None:
        """Counts and the settled marks (the leading one only moves on, and only while the batch is in
        progress: a pass that ran beside a later one and lost, or one that finished it, keeps its hands off)."""
        self._set_while(
            batch.id,
            BatchStatus.IN_PROGRESS,
            "SET counts = :c, settled = :s, settled_done = :d, settled_parts = :p",
            {":c": json.dumps(batch.counts), ":s": settled, ":d": settled_done, ":p": json.dumps(parts)},
            also="(attribute_not_exists(settled) OR settled <= :s)",
        )

    def record_cancel_counts(self, batch_id: str, counts: dict) -> None:
        """A cancelling batch's counts while its running lines finish (only while it is cancelling: a
        pass that finished it meanwhile wrote the final counts)."""
        self._set_while(batch_id, BatchStatus.CANCELLING, "SET counts = :c", {":c": json.dumps(counts)})

    def unsettle(self, batch_id: str) -> None:
        """Forget the settled marks: a line counted as finished runs again, so the next pass counts
        every line afresh."""
        self.table.update_item(
            Key=batch_key(batch_id),
            UpdateExpression="SET settled = :z, settled_done = :z, settled_parts = :none",
            ExpressionAttributeValues={":z": 0, ":none": "{}"},
        )

    def _set_while(self, batch_id: str, status: BatchStatus, update: str, values: dict, also: str = "") -> bool:
        """An update made only while the batch is in `status` (and `also` holds) -> whether it was."""
        return self._try(
            self.table.update_item,
            Key=batch_key(batch_id),
            UpdateExpression=update,
            ConditionExpression="#s = :while" + (f" AND {also}" if also else ""),
            ExpressionAttributeNames=_STATUS,
            ExpressionAttributeValues={**values, ":while": status.value},
        )

    def _update(self, **kwargs) -> dict | None:
        """A conditional update_item -> the item it returns (ReturnValues); None when the condition failed."""
        try:
            return self.table.update_item(**kwargs)["Attributes"]
        except self._conditional:
            return None

    def _try(self, write, **kwargs) -> bool:
        """A conditional write -> whether its condition held."""
        try:
            write(**kwargs)
        except self._conditional:
            return False
        return True


AT_ONCE = 16  # lines whose DynamoDB calls run at once (ingest, cancel): each line's are independent


def at_once(fn: Callable[[T], U], items: list[T]) -> list[U]:
    """[fn(item) for item in items], AT_ONCE calls at a time (they wait on DynamoDB, not the CPU)."""
    if len(items) < 2:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(AT_ONCE) as pool:
        return list(pool.map(fn, items))
