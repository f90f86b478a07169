"""Local event sources: what Lambda's event source mappings and S3 notifications do in AWS.

  SQS       receive up to BatchSize messages -> one SQS event -> the function; delete what
            succeeded (with ReportBatchItemFailures, all but the reported items; if the function
            raised, nothing), so failures come back after the visibility timeout, as in AWS.
  S3        new objects matching an EventBridge rule on aws.s3 "Object Created" (bucket name,
            key prefix) -> that EventBridge event.
  Schedule  the function every `rate(...)`, as an EventBridge scheduled event.

Subscriptions are read from the template's function Events.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from stratus_local.template import resolve

Invoke = Callable[[str, dict], dict]
IDLE_WAIT_S = 1


@dataclass(frozen=True)
class Subscription:
    function: str
    kind: str  # "SQS" | "EventBridgeRule" | "Schedule"
    props: dict


def subscriptions(template: dict) -> list[Subscription]:
    out = []
    for name, res in template["Resources"].items():
        for event in res.get("Properties", {}).get("Events", {}).values():
            if event.get("Type") in ("SQS", "EventBridgeRule", "Schedule"):
                out.append(Subscription(name, event["Type"], event["Properties"]))
    return out


def _ref_name(value) -> str:
    """!GetAtt Queue.Arn / !Ref Bucket -> the logical name."""
    ((k, v),) = value.items()
    return v[0] if k == "Fn::GetAtt" else v


def sqs_event(messages: list[dict], arn: str, region: str) -> dict:
    return {
        "Records": [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": {k: v for k, v in m.get("Attributes", {}).items()},
                "messageAttributes": m.get("MessageAttributes", {}),
                "md5OfBody": m.get("MD5OfBody", ""),
                "eventSource": "aws:sqs",
                "eventSourceARN": arn,
                "awsRegion": region,
            }
            for m in messages
        ]
    }


def s3_object_created(bucket: str, key: str, size: int, etag: str, region: str) -> dict:
    """What S3 sends EventBridge for a new object."""
    return {
        "version": "0",
        "id": uuid.uuid4().hex,
        "detail-type": "Object Created",
        "source": "aws.s3",
        "account": "000000000000",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "region": region,
        "resources": [f"arn:aws:s3:::{bucket}"],
        "detail": {
            "version": "0",
            "bucket": {"name": bucket},
            "object": {"key": key, "size": size, "etag": etag, "sequencer": uuid.uuid4().hex[:16]},
            "request-id": uuid.uuid4().hex,
            "requester": "000000000000",
            "reason": "PutObject",
        },
    }


def scheduled_event(function: str, region: str) -> dict:
    return {
        "version": "0",
        "id": uuid.uuid4().hex,
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "000000000000",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "region": region,
        "resources": [f"arn:aws:events:{region}:000000000000:rule/{function}"],
        "detail": {},
    }


def rate_seconds(expression: str) -> float:
    m = re.fullmatch(r"rate\((\d+) (minute|minutes|hour|hours|day|days)\)", expression.strip())
    if not m:
        raise ValueError(f"unsupported schedule {expression!r}; local mode runs rate(N minutes|hours|days)")
    return int(m.group(1)) * {"minute": 60, "hour": 3600, "day": 86400}[m.group(2).rstrip("s")]


class EventSources:
    """One thread per subscription; stop() ends them all."""

    def __init__(
        self,
        template: dict,
        refs: dict,
        invoke: Invoke,
        session,
        *,
        schedule_every_s: float | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.refs, self.invoke, self.log = refs, invoke, log
        self.sqs, self.s3 = session.client("sqs"), session.client("s3")
        self.region = session.region_name
        self.schedule_every_s = schedule_every_s  # local mode runs schedules faster than AWS would
        self.stopped = threading.Event()
        self.threads = [
            threading.Thread(target=self._guard, args=(s,), daemon=True, name=f"{s.kind}->{s.function}")
            for s in subscriptions(template)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stopped.set()
        for t in self.threads:
            t.join(timeout=IDLE_WAIT_S + 5)

    def _guard(self, sub: Subscription) -> None:
        loop = {"SQS": self._sqs, "EventBridgeRule": self._s3, "Schedule": self._schedule}[sub.kind]
        while not self.stopped.is_set():
            try:
                loop(sub)
            except Exception as exc:
                self.log(f"event source {sub.kind} -> {sub.function}: {exc}")
                self.stopped.wait(1)

    def _sqs(self, sub: Subscription) -> None:
        name = _ref_name(sub.props["Queue"])
        url, arn = self.refs[name], self.refs[(name, "Arn")]
        report = "ReportBatchItemFailures" in sub.props.get("FunctionResponseTypes", [])
        while not self.stopped.is_set():
            got = self.sqs.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=min(10, sub.props.get("BatchSize", 10)),
                WaitTimeSeconds=IDLE_WAIT_S,
                AttributeNames=["All"],
                MessageAttributeNames=["All"],
            ).get("Messages", [])
            if not got:
                continue
            try:
                out = self.invoke(sub.function, sqs_event(got, arn, self.region)) or {}
            except Exception as exc:
                self.log(f"{sub.function} failed on {len(got)} messages: {exc}")
                continue
            failed = {f["itemIdentifier"] for f in out.get("batchItemFailures", [])} if report else set()
            done = [m for m in got if m["MessageId"] not in failed]
            for i in range(0, len(done), 10):
                self.sqs.delete_message_batch(
                    QueueUrl=url,
                    Entries=[
                        {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(done[i : i + 10])
                    ],
                )

    def _s3(self, sub: Subscription) -> None:
        pattern = resolve(sub.props["Pattern"], self.refs)
        if pattern.get("source") != ["aws.s3"] or pattern.get("detail-type") != ["Object Created"]:
            raise ValueError(f"local mode delivers S3 Object Created rules only, not {pattern}")
        [bucket] = pattern["detail"]["bucket"]["name"]
        key_rules = pattern["detail"].get("object", {}).get("key", [{}])
        prefix, suffix = key_rules[0].get("prefix", ""), key_rules[0].get("suffix", "")
        seen: set[str] = set()
        while not self.stopped.is_set():
            pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for obj in (o for page in pages for o in page.get("Contents", [])):
                tag = hashlib.sha1(f"{obj['Key']}|{obj['ETag']}".encode()).hexdigest()
                if tag in seen or not obj["Key"].endswith(suffix):
                    continue
                seen.add(tag)
                self.invoke(
                    sub.function,
                    s3_object_created(bucket, obj["Key"], obj["Size"], obj["ETag"].strip('"'), self.region),
                )
            self.stopped.wait(0.5)

    def _schedule(self, sub: Subscription) -> None:
        every = self.schedule_every_s or rate_seconds(sub.props["Schedule"])
        while not self.stopped.wait(every):
            self.invoke(sub.function, scheduled_event(sub.function, self.region))
