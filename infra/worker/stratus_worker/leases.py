"""Message leases on the jobs queues (one per tier): a received message stays hidden while its job runs.

  extend   every heartbeat_s, for every held message (10 per ChangeMessageVisibilityBatch, per queue)
  delete   once the job's result is durably written (or the job needs nothing more)
  release  visible again at once: the job goes back to another worker (or, after the queue's
           maxReceiveCount deliveries, to the DLQ)

A Receipt names its queue, so a worker holding messages of both tiers returns each to its own.
"""

from __future__ import annotations

from typing import NamedTuple


class Receipt(NamedTuple):
    queue_url: str
    handle: str


class Leases:
    def __init__(self, sqs, visibility_s: int) -> None:
        self.sqs, self.visibility_s = sqs, visibility_s

    def extend(self, receipts: list[Receipt]) -> list[Receipt]:
        """-> the receipts SQS refused to extend (the batch call reports them instead of raising)."""
        lost = []
        for url in dict.fromkeys(r.queue_url for r in receipts):
            mine = [r for r in receipts if r.queue_url == url]
            for i in range(0, len(mine), 10):
                chunk = mine[i : i + 10]
                entries = [
                    {"Id": str(n), "ReceiptHandle": r.handle, "VisibilityTimeout": self.visibility_s}
                    for n, r in enumerate(chunk)
                ]
                got = self.sqs.change_message_visibility_batch(QueueUrl=url, Entries=entries)
                lost += [chunk[int(f["Id"])] for f in got.get("Failed", [])]
        return lost

    def delete(self, receipt: Receipt) -> None:
        self.sqs.delete_message(QueueUrl=receipt.queue_url, ReceiptHandle=receipt.handle)

    def release(self, receipt: Receipt) -> None:
        self.hide(receipt, 0)

    def hide(self, receipt: Receipt, seconds: int) -> None:
        self.sqs.change_message_visibility(
            QueueUrl=receipt.queue_url, ReceiptHandle=receipt.handle, VisibilityTimeout=seconds
        )
