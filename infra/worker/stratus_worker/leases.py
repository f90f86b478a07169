"""Message leases on the jobs queue: a received message stays hidden while its job runs.

  extend   every heartbeat_s, for every held message (10 per ChangeMessageVisibilityBatch)
  delete   once the job's result is durably written (or the job needs nothing more)
  release  visible again at once: the job goes back to another worker (or, after the queue's
           maxReceiveCount deliveries, to the DLQ)
"""

from __future__ import annotations


class Leases:
    def __init__(self, sqs, queue_url: str, visibility_s: int) -> None:
        self.sqs, self.queue_url, self.visibility_s = sqs, queue_url, visibility_s

    def extend(self, receipts: list[str]) -> list[str]:
        """-> the receipts SQS refused to extend (the batch call reports them instead of raising)."""
        lost = []
        for i in range(0, len(receipts), 10):
            chunk = receipts[i:i + 10]
            entries = [{"Id": str(n), "ReceiptHandle": r, "VisibilityTimeout": self.visibility_s}
                       for n, r in enumerate(chunk)]
            got = self.sqs.change_message_visibility_batch(QueueUrl=self.queue_url, Entries=entries)
            lost += [chunk[int(f["Id"])] for f in got.get("Failed", [])]
        return lost

    def delete(self, receipt: str) -> None:
        self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=receipt)

    def release(self, receipt: str) -> None:
        self.hide(receipt, 0)

    def hide(self, receipt: str, seconds: int) -> None:
        self.sqs.change_message_visibility(QueueUrl=self.queue_url, ReceiptHandle=receipt, VisibilityTimeout=seconds)
