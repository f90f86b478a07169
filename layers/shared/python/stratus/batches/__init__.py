"""Batch files: a JSONL file of requests in, an output file (and an error file) out.

  batches/input/<tenant>/<name>.jsonl    uploading here creates a batch (S3 -> EventBridge -> batch fn)
  batches/files/<tenant>/<name>.jsonl    POST /v1/batches {"input_file_id": "<name>.jsonl"} copies it
                                         to the input prefix (ingested like an upload) and answers at once
  batches/output/<batch id>/             output.jsonl, errors.jsonl, manifest.json when every line is done
  batches/state/<batch id>/lines/        which job serves each line, a file per slice of lines
  batches/state/<batch id>/outbox/       the lines' queue messages, sent a few at a time (stratus.release)

The modules, in the order a batch meets them:

  model      Batch (the item), BatchStatus, Line (a line's fate), LineOutcome
  store      BatchStore: every read and conditional write of the batch item
  lines      reading the file (streamed, a slice at a time) and the lines files
  ingest     creating a batch (upload, POST /v1/batches) and reading its lines into jobs
  schedule   the scheduled pass: advance, go on ingesting, release lines
  progress   counting finished lines; finishing an in-progress batch
  cancelling POST /v1/batches/{id}/cancel and the pass's work on a cancelling batch
  output     writing output.jsonl, errors.jsonl and manifest.json
  bedrock    Bedrock batch records ({"recordId", "modelInput"})
  files      the OpenAI files API (upload, content)
  api        reading batches for GET /v1/batches[/{id}]

Handlers call the names below; the modules are the place to read and to test.
"""

from stratus.batches.api import MAX_PAGE, get, get_any, list_page, list_recent
from stratus.batches.cancelling import cancel
from stratus.batches.files import (
    MAX_CONTENT_BYTES,
    delete_file,
    file_content,
    list_files,
    read_upload,
    retrieve_file,
    upload_file,
)
from stratus.batches.ingest import batch_id_for_upload, create, create_from_request, tenant_of_upload
from stratus.batches.model import Batch, BatchStatus, Line
from stratus.batches.schedule import advance, ingest_left, open_batches, release_for, release_step, run_pass
from stratus.batches.store import BatchStore

__all__ = [
    "MAX_CONTENT_BYTES",
    "MAX_PAGE",
    "Batch",
    "BatchStatus",
    "BatchStore",
    "Line",
    "advance",
    "batch_id_for_upload",
    "cancel",
    "create",
    "create_from_request",
    "delete_file",
    "file_content",
    "get",
    "get_any",
    "ingest_left",
    "list_files",
    "list_page",
    "list_recent",
    "open_batches",
    "read_upload",
    "release_for",
    "release_step",
    "retrieve_file",
    "run_pass",
    "tenant_of_upload",
    "upload_file",
]
