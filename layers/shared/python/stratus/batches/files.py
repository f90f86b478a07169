"""The OpenAI files API, for batch input and output: POST /v1/files (purpose "batch", multipart),
GET /v1/files (the uploaded ones), GET /v1/files/{id} and GET /v1/files/{id}/content (an uploaded
file, or a batch's output or error file), DELETE /v1/files/{id} (an uploaded file)."""

from __future__ import annotations

import re
import time
import uuid
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

from stratus.batches.api import get
from stratus.batches.model import FILES_PREFIX
from stratus.errors import InvalidRequest, NotFound, PayloadTooLarge
from stratus.shapes import list_body, list_page, list_params

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
    key, bucket = _key_of(file_id, tenant, deps), deps.settings.bucket
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


def _file_object(file_id: str, head_or_listing: dict, filename: str) -> dict:
    return {
        "id": file_id,
        "object": "file",
        "bytes": int(head_or_listing.get("ContentLength", head_or_listing.get("Size", 0))),
        "created_at": int(head_or_listing["LastModified"].timestamp()),
        "filename": filename,
        "purpose": "batch" if FILE_ID.fullmatch(file_id) else "batch_output",
        "status": "processed",
    }


def _key_of(file_id: str, tenant: str, deps: Deps) -> str:
    """The S3 key of a file id the tenant may read (NotFound otherwise)."""
    if m := BATCH_FILE_ID.fullmatch(file_id):
        batch = get(m.group(1), tenant, deps)
        key = batch.output_file if m.group(2) == "output" else batch.error_file
        if key is None:
            raise NotFound(f"file {file_id!r} does not exist yet: batch {batch.id} is {batch.status}")
        return key
    if FILE_ID.fullmatch(file_id):
        return f"{FILES_PREFIX}{tenant}/{file_id}"
    raise NotFound(f"file {file_id!r} not found")


def retrieve_file(file_id: str, tenant: str, deps: Deps) -> dict:
    """GET /v1/files/{id}: an uploaded file's object (or a batch's output or error file's)."""
    key = _key_of(file_id, tenant, deps)
    try:
        head = deps.s3.head_object(Bucket=deps.settings.bucket, Key=key)
    except Exception as exc:
        raise NotFound(f"file {file_id!r} not found") from exc
    filename = unquote((head.get("Metadata") or {}).get("filename", "")) or key.rsplit("/", 1)[-1]
    return _file_object(file_id, head, filename)


def list_files(query: dict, tenant: str, deps: Deps) -> dict:
    """GET /v1/files (?limit= 1-100, default 20, &after=<file id>, &order=desc|asc by created_at):
    the files the tenant uploaded through POST /v1/files."""
    limit, after, newest_first = list_params(query)
    if query.get("purpose") not in (None, "batch"):
        return list_body([], False)
    prefix, found = f"{FILES_PREFIX}{tenant}/", []
    for page in deps.s3.get_paginator("list_objects_v2").paginate(Bucket=deps.settings.bucket, Prefix=prefix):
        found += [o for o in page.get("Contents", []) if FILE_ID.fullmatch(o["Key"].removeprefix(prefix))]
    found.sort(key=lambda o: (o["LastModified"], o["Key"]), reverse=newest_first)
    ids, more = list_page([o["Key"].removeprefix(prefix) for o in found], after, limit)
    return list_body([retrieve_file(file_id, tenant, deps) for file_id in ids], more)  # (a HEAD each: the filename)


def delete_file(file_id: str, tenant: str, deps: Deps) -> dict:
    """DELETE /v1/files/{id}: an uploaded file (a batch's own files expire with it)."""
    if BATCH_FILE_ID.fullmatch(file_id):
        raise InvalidRequest(f"{file_id!r} is a batch's output: it expires with the batch", param="file_id")
    retrieve_file(file_id, tenant, deps)  # NotFound for another tenant's, or none
    deps.s3.delete_object(Bucket=deps.settings.bucket, Key=_key_of(file_id, tenant, deps))
    return {"id": file_id, "object": "file", "deleted": True}
