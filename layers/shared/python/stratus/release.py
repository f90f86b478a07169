"""Metered release of batch lines: the batch queue holds a few minutes of work, shared fairly
between tenants, instead of every line of every file in arrival order.

At ingest a batch's queue messages go to an outbox in S3, in line order, PART messages a file:

  batches/state/<batch id>/outbox/<part, 5 digits>.jsonl    one QueueMessage body a line

and the batch item counts them (`outbox`) and how many have been sent (`released`, a cursor). A
release step (after each ingest, and every `batch_release_every_s` during the scheduled pass)
reads the batch queue's depth, sizes a target of visible messages from what workers hold and took
since the last step, and splits the room between the tenants with lines left so that each gets the
same tokens (max-min fair: what one tenant cannot use goes to the others; a line weighs its
batch's mean estimated tokens, prompt and max_tokens, so a tenant whose lines are ten times longer
gets a tenth of the lines), then between each tenant's batches the same way. A tenant's new file
therefore waits behind at most one target's worth of other files' lines (about two steps of work),
not behind whole files; see docs/scheduling.md. A tenant's lines also spend its batch budget
(stratus.keys.charge_batch: estimated tokens a minute, charged as they are released): a tenant
past it waits for the next minute, and its share of the room goes to the others.

Sending is at least once: messages go first, then the cursor moves with a condition on its old
value; a step that dies in between, or a second step racing it, sends some lines twice, and the
worker that finds a job already running or done drops the copy.
"""

from __future__ import annotations

from dataclasses import dataclass

from aws_lambda_powertools.metrics import MetricUnit

from stratus.contracts import QueueMessage, Status
from stratus.deps import Deps
from stratus.errors import ModelNotFound, Unavailable
from stratus.jobstore import SQS_LIMIT_BYTES
from stratus.keys import BatchRoom, batch_room, charge_batch
from stratus.observability import logger, metrics

PART = 100  # messages per outbox file: a step reads only the files its lines are in
SEND_ROUNDS, SEND_PAUSE_S = 4, 0.1  # SendMessageBatch rounds for entries SQS failed on its side, pause doubling


@dataclass(frozen=True)
class Pending:
    """An open batch with lines still to send."""

    batch_id: str
    tenant: str
    released: int  # lines sent so far (the cursor)
    outbox: int  # lines to send in all
    created_at: int  # the batch's (epoch seconds)
    line_tokens: float = 1.0  # a line's estimated tokens, the batch's mean: what a line weighs in a share


@dataclass
class Meter:
    """What the last step saw and did, to measure how many lines workers took since."""

    visible: int | None = None
    released: int = 0


# ---- the outbox -----------------------------------------------------------------------------


def _part_key(batch_id: str, part: int) -> str:
    return f"batches/state/{batch_id}/outbox/{part:05d}.jsonl"


def write_outbox(batch_id: str, messages: list[QueueMessage], deps: Deps, start: int = 0) -> int:
    """Store a batch's messages in line order after the `start` already stored (a part left short is
    rewritten with the new ones appended); returns how many it stored."""
    bodies = [m.to_body() for m in messages]
    if start % PART and bodies:
        bodies = read_outbox(batch_id, start - start % PART, start, deps) + bodies
        start -= start % PART
    for i in range(0, len(bodies), PART):
        deps.s3.put_object(
            Bucket=deps.settings.bucket,
            Key=_part_key(batch_id, (start + i) // PART),
            Body="".join(b + "\n" for b in bodies[i : i + PART]).encode(),
        )
    return len(messages)


def delete_outbox(batch_id: str, messages: int, deps: Deps) -> None:
    """Delete a finished batch's outbox (its messages carry the lines' prompts)."""
    keys = [{"Key": _part_key(batch_id, part)} for part in range(-(-messages // PART))]
    for i in range(0, len(keys), 1000):  # DeleteObjects takes 1,000 keys a call
        deps.s3.delete_objects(Bucket=deps.settings.bucket, Delete={"Objects": keys[i : i + 1000], "Quiet": True})


def read_outbox(batch_id: str, start: int, stop: int, deps: Deps) -> list[str]:
    """Message bodies [start, stop) of a batch's outbox."""
    out: list[str] = []
    for part in range(start // PART, (stop - 1) // PART + 1):
        raw = deps.s3.get_object(Bucket=deps.settings.bucket, Key=_part_key(batch_id, part))["Body"].read()
        lines = raw.decode().splitlines()
        lo, hi = max(start - part * PART, 0), min(stop - part * PART, len(lines))
        out += lines[lo:hi]
    return out


# ---- how much, and to whom ----------------------------------------------------------------------


def target(floor: int, visible: int, in_flight: int, meter: Meter) -> int:
    """Visible batch messages to keep: two steps of what workers took, twice what they hold, or the
    floor, whichever is most (so workers never run dry between steps, and a new file waits little)."""
    taken = meter.visible + meter.released - visible if meter.visible is not None else 0
    return max(floor, 2 * in_flight, 2 * taken)


def fair_shares(room: int, wants: dict[str, int], weights: dict[str, float] | None = None) -> dict[str, int]:
    """Split `room` lines between claimants so that each gets the same weight of lines (a line of
    claimant k weighs weights[k], 1 by default) as far as their wants allow (max-min fair); lines
    the split leaves over go one each to those who would take the next line soonest, the first
    claimants first (dict order: oldest batch first).
      fair_shares(10, {"a": 100, "b": 3, "c": 100}) == {"a": 4, "b": 3, "c": 3}
      fair_shares(11, {"a": 100, "b": 100}, {"a": 10.0, "b": 1.0}) == {"a": 1, "b": 10}"""
    weight = {k: max((weights or {}).get(k, 1.0), 1e-9) for k in wants}
    lines_at = lambda level: {k: min(w, int(level / weight[k] + 1e-9)) for k, w in wants.items()}  # noqa: E731
    level, top = 0.0, max((w * weight[k] for k, w in wants.items()), default=0.0)  # the highest level the room fills
    for _ in range(100):
        mid = (level + top) / 2
        level, top = (mid, top) if sum(lines_at(mid).values()) <= room else (level, mid)
    shares = lines_at(level)
    extra = room - sum(shares.values())
    order = sorted((k for k in wants if wants[k] > shares[k]), key=lambda k: (shares[k] + 1) * weight[k])
    for k in order[: max(extra, 0)]:  # (sorted is stable: ties keep dict order, oldest first)
        shares[k] += 1
    return shares


def _line_tokens(ps: list[Pending]) -> float:
    """A tenant's line weight: the mean estimated tokens of its lines left."""
    left = sum(p.outbox - p.released for p in ps)
    return sum((p.outbox - p.released) * p.line_tokens for p in ps) / max(left, 1)


def affordable(room: BatchRoom, line_tokens: float) -> int:
    """Lines a tenant's batch budget still pays for this minute (one at least in a fresh minute,
    so a line larger than the whole budget still goes, one a minute).
      affordable(BatchRoom(budget=1000, used=400), 100.0) == 6"""
    lines = int(room.left / max(line_tokens, 1e-9) + 1e-9)
    return max(lines, 1) if room.used == 0 else lines


def plan(room: int, pending: list[Pending], budgets: dict[str, BatchRoom] | None = None) -> dict[str, int]:
    """Lines to send from each batch: tenants share the room evenly, as far as their batch budgets
    (`budgets`, none: unlimited) pay for, then each tenant's batches share the tenant's lines."""
    by_tenant: dict[str, list[Pending]] = {}
    for p in pending:  # oldest batch first, so tenants are ordered by their oldest batch
        by_tenant.setdefault(p.tenant, []).append(p)
    weight = {t: _line_tokens(ps) for t, ps in by_tenant.items()}
    wants = {t: sum(p.outbox - p.released for p in ps) for t, ps in by_tenant.items()}
    if budgets is not None:
        wants = {t: min(n, affordable(budgets[t], weight[t])) for t, n in wants.items()}
    tenant_share = fair_shares(room, wants, weight)
    out: dict[str, int] = {}
    for t, ps in by_tenant.items():
        out.update(
            fair_shares(
                tenant_share[t],
                {p.batch_id: p.outbox - p.released for p in ps},
                {p.batch_id: p.line_tokens for p in ps},
            )
        )
    return {b: n for b, n in out.items() if n}


def charged(shares: dict[str, int], pending: list[Pending], budgets: dict[str, BatchRoom], deps: Deps) -> set[str]:
    """Charge each tenant's planned lines to its batch budget -> the tenants whose charge went
    through (a step racing this one may have spent the room: that tenant sends nothing now)."""
    tokens: dict[str, float] = {}
    for p in pending:
        tokens[p.tenant] = tokens.get(p.tenant, 0.0) + shares.get(p.batch_id, 0) * p.line_tokens
    now = deps.clock()
    return {
        t for t, n in tokens.items() if n and charge_batch(deps.table, t, max(round(n), 1), budgets[t].budget, now=now)
    }


# ---- sending ------------------------------------------------------------------------------------


def _groups(bodies: list[str]) -> list[list[int]]:
    """Indexes of bodies in SendMessageBatch calls: at most ten, and their bodies' bytes within what
    one call carries."""
    groups: list[list[int]] = []
    size = 0
    for i, body in enumerate(bodies):
        n = len(body.encode())
        if not groups or len(groups[-1]) == 10 or size + n > SQS_LIMIT_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    return groups


def send(bodies: list[str], deps: Deps, tenant: str) -> None:
    """Send a tenant's batch-tier messages. A message SQS refused as the sender's fault fails its job visibly
    (never stays QUEUED); one SQS failed on its own side is sent again, SEND_ROUNDS rounds, and
    raises if it still fails, so the step's cursor stays and the next step sends it again. A line
    whose model left the catalogue since it was read fails its job: nothing serves it any more."""
    queues: dict[str, list[tuple[str, str]]] = {}  # each model's batch queue -> (body, job id) (a file may mix models)
    for body in bodies:
        message = QueueMessage.from_body(body)  # (read once: its model picks the queue, its job id fails it)
        try:
            model = deps.settings.catalogue.find(message.request.model)
        except ModelNotFound as exc:
            error = {"message": exc.message, "type": exc.error_type, "code": exc.code}
            deps.store.transition(message.job_id, [Status.QUEUED], Status.FAILED, error=error)
            continue
        queues.setdefault(model.queue_for("batch"), []).append((body, message.job_id))
    for url, some in queues.items():
        _send_to(url, [body for body, _ in some], [job_id for _, job_id in some], deps, tenant)


def _send_to(url: str, bodies: list[str], job_ids: list[str], deps: Deps, tenant: str) -> None:
    for group in _groups(bodies):
        for attempt in range(SEND_ROUNDS):
            if attempt:
                deps.sleep(SEND_PAUSE_S * 2 ** (attempt - 1))
            out = deps.sqs.send_message_batch(
                QueueUrl=url,
                # MessageGroupId: SQS fair queues deliver a quiet tenant's lines ahead of a backlog
                Entries=[{"Id": str(i), "MessageBody": bodies[i], "MessageGroupId": tenant} for i in group],
            )
            failed = out.get("Failed", [])
            for f in (f for f in failed if f.get("SenderFault", True)):
                deps.store.transition(
                    job_ids[int(f["Id"])],
                    [Status.QUEUED],
                    Status.FAILED,
                    error={
                        "message": f"could not enqueue the job: {f.get('Message', f.get('Code'))}",
                        "type": "server_error",
                        "code": "enqueue_failed",
                    },
                )
            group = [int(f["Id"]) for f in failed if not f.get("SenderFault", True)]
            if not group:
                break
        else:
            raise Unavailable(f"SQS failed {len(group)} batch messages on its side {SEND_ROUNDS} times running")


def _move_cursor(batch_id: str, old: int, new: int, deps: Deps) -> bool:
    try:
        deps.table.update_item(
            Key={"pk": f"batch#{batch_id}"},
            UpdateExpression="SET released = :new",
            ConditionExpression="released = :old",
            ExpressionAttributeValues={":old": old, ":new": new},
        )
        return True
    except deps.table.meta.client.exceptions.ConditionalCheckFailedException:
        logger.info("another step moved the cursor first (some lines went twice)", extra={"batch_id": batch_id})
        return False


def step(pending: list[Pending], meter: Meter, deps: Deps) -> int:
    """One release step over the open batches with lines left (oldest first); returns lines sent."""
    s = deps.settings
    visible = in_flight = 0  # over every model's batch queue
    for url in s.batch_queues():
        attrs = deps.sqs.get_queue_attributes(
            QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        )["Attributes"]
        visible += int(attrs["ApproximateNumberOfMessages"])
        in_flight += int(attrs["ApproximateNumberOfMessagesNotVisible"])
    goal = target(s.batch_release_floor, visible, in_flight, meter)
    sent = queued = 0  # lines this step's cursor moves counted; lines it put in the queue
    tenants = list(dict.fromkeys(p.tenant for p in pending))
    budgets = batch_room(deps.store.items, tenants, s.batch_tpm, now=deps.clock())
    shares = plan(max(goal - visible, 0), pending, budgets)
    paid = charged(shares, pending, budgets, deps)
    for p in pending:
        n = shares.get(p.batch_id, 0)
        if not n or p.tenant not in paid:
            continue
        send(read_outbox(p.batch_id, p.released, p.released + n, deps), deps, p.tenant)
        queued += n
        if _move_cursor(p.batch_id, p.released, p.released + n, deps):
            sent += n
    meter.visible, meter.released = visible, queued
    unsent = sum(p.outbox - p.released for p in pending) - sent
    metrics.add_metric(name="BatchLinesReleased", unit=MetricUnit.Count, value=sent)
    metrics.add_metric(name="BatchLinesUnreleased", unit=MetricUnit.Count, value=unsent)
    metrics.add_metric(
        name="OldestUnreleasedBatchAge",
        unit=MetricUnit.Seconds,
        value=max(deps.clock() - min(p.created_at for p in pending), 0),
    )
    logger.info(
        "batch lines released",
        extra={
            "visible": visible,
            "in_flight": in_flight,
            "target": goal,
            "released": sent,
            "unreleased": unsent,
            "batches": len(pending),
            "shares": shares,
            "batch_budget_left": {t: budgets[t].left for t in tenants},  # before this step's charge
        },
    )
    return sent
