"""The OpenAI files API, for batch input and output: POST /v1/files (purpose "batch", multipart),
GET /v1/files/{id}/content (an uploaded file, or a batch's output or error file)."""

from __future__ import annotations

import re
import time
import uuid
from typing import TYPE_CHECKING
from urllib.parse import quote

from stratus.batches.api import get
from stratus.batches.model import FILES_PREFIX
from stratus.errors import InvalidRequest, NotFound, PayloadTooLarge

if TYPE_CHECKING:
    from stratus.deps import Deps

FILE_ID = re.compile(r"file-[0-9a-f]{24}")
BATCH_FILE_ID = re.compile(r"file-(batch_[0-9a-f]{24})-(output|errors)")
MAX_CONTENT_BYTES = 5_000_000  # a Lambda response stops at 6 MB; bigger files are read from S3


def read_upload(content_type: str, body: bytes, limit: int) -> tuple[str, bytes]:
    """A multipart/form-data POST /v1/files body -> (filename, data); checks purpose and size."""
    from email.parser import BytesParser
    from email.policy import HTTP

    if len(body) > limit:
        raise PayloadTooLarge(f"the upload must be at most {limit} bytes; put bigger files in S3 under {FILES_PREFIX}")
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequest(f"send multipart/form-data with fields purpose and file, got {content_type or 'none'!r}")
    try:
        message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
        fields = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
        purpose = _field_text(fields["purpose"]) if "purpose" in fields else None
        file = fields.get("file")
        filename, data = (
            (file.get_filename() or "upload.jsonl", file.get_payload(decode=True)) if file else (None, None)
        )
    except Exception as exc:
        raise InvalidRequest(f"the multipart body cannot be read ({type(exc).__name__})") from None
    if purpose != "batch":
        raise InvalidRequest(f"purpose must be 'batch', got {purpose!r}", param="purpose")
    if file is None:
        raise InvalidRequest("the file field is missing", param="file")
    if not isinstance(data, bytes):
        raise InvalidRequest("the file field must hold the file's bytes, not further parts", param="file")
    return filename, data


def _field_text(part) -> str | None:
    """A form field's value as text (whatever its content type says)."""
    raw = part.get_payload(decode=True)
    return raw.decode("utf-8", "replace").strip() if isinstance(raw, bytes) else None


def upload_file(filename: str, data: bytes, tenant: str, deps: Deps) -> dict:
    """POST /v1/files (purpose "batch"): keep the file under the tenant's files prefix."""
    file_id = "file-" + uuid.uuid4().hex[:24]
    deps.s3.put_object(
        Bucket=deps.settings.bucket,
        Key=f"{FILES_PREFIX}{tenant}/{file_id}",
        Body=data,
        ContentType="application/jsonl",
        Metadata={"filename": quote(filename[:200])},
    )  # (S3 metadata is ASCII: percent-encoded)
    return {
        "id": file_id,
        "object": "file",
        "bytes": len(data),
        "created_at": int(time.time()),
        "filename": filename,
        "purpose": "batch",
        "status": "processed",
    }


def file_content(file_id: str, tenant: str, deps: Deps) -> bytes:
    """GET /v1/files/{id}/content: an uploaded file, or a batch's output or error file."""
    if m := BATCH_FILE_ID.fullmatch(file_id):
        batch = get(m.group(1), tenant, deps)
        key = batch.output_file if m.group(2) == "output" else batch.error_file
        if key is None:
            raise NotFound(f"file {file_id!r} does not exist yet: batch {batch.id} is {batch.status}")
    elif FILE_ID.fullmatch(file_id):
        key = f"{FILES_PREFIX}{tenant}/{file_id}"
    else:
        raise NotFound(f"file {file_id!r} not found")
    bucket = deps.settings.bucket
    try:
        size = deps.s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
    except Exception as exc:
        raise NotFound(f"file {file_id!r} not found") from exc
    if size > MAX_CONTENT_BYTES:
        raise PayloadTooLarge(
            f"file {file_id!r} has {size} bytes, over the {MAX_CONTENT_BYTES} an API response "
            f"carries: read s3://{bucket}/{key}"
        )
    return deps.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
