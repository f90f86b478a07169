"""Writing an S3 object a piece at a time, holding at most one part in memory.

    w = PartWriter(s3, bucket, key, "application/jsonl")
    w.write(b"...")  # as often as needed
    w.close()        # a single PutObject if it never filled a part, else the multipart upload completed
    w.abort()        # on failure: no object, no upload left open

Parts are PART_BYTES or more (S3 wants 5 MiB at least for every part but the last).
"""

from __future__ import annotations

PART_BYTES = 8 * 1024 * 1024


class PartWriter:
    def __init__(self, s3, bucket: str, key: str, content_type: str) -> None:
        self.s3, self.bucket, self.key, self.content_type = s3, bucket, key, content_type
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._upload_id: str | None = None
        self._parts: list[dict] = []  # [{"PartNumber", "ETag"}] of the parts sent

    def write(self, data: bytes) -> None:
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered >= PART_BYTES:
            self._send_part()

    def close(self) -> None:
        if self._upload_id is None:
            self.s3.put_object(
                Bucket=self.bucket, Key=self.key, Body=b"".join(self._buffer), ContentType=self.content_type
            )
            return
        if self._buffered:
            self._send_part()
        self.s3.complete_multipart_upload(
            Bucket=self.bucket, Key=self.key, UploadId=self._upload_id, MultipartUpload={"Parts": self._parts}
        )

    def abort(self) -> None:
        if self._upload_id is not None:
            self.s3.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self._upload_id)
            self._upload_id = None

    def _send_part(self) -> None:
        if self._upload_id is None:
            self._upload_id = self.s3.create_multipart_upload(
                Bucket=self.bucket, Key=self.key, ContentType=self.content_type
            )["UploadId"]
        number = len(self._parts) + 1
        etag = self.s3.upload_part(
            Bucket=self.bucket, Key=self.key, UploadId=self._upload_id, PartNumber=number, Body=b"".join(self._buffer)
        )["ETag"]
        self._parts.append({"PartNumber": number, "ETag": etag})
        self._buffer, self._buffered = [], 0
