"""Bedrock batch records: {"recordId", "modelInput"} in; out, the record with its modelInput
repeated and a modelOutput (or an error)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

from stratus.batches import lines
from stratus.batches.lines import Row, error_code, permanent
from stratus.batches.model import Batch, Line
from stratus.observability import logger

if TYPE_CHECKING:
    from stratus.deps import Deps


def answered(line: Line, model_input: dict | None, body: dict) -> dict:
    return {"recordId": line.custom_id, "modelInput": model_input, "modelOutput": body}


def refused(line: Line, model_input: dict | None, error: dict) -> dict:
    return {"recordId": line.custom_id, "modelInput": model_input, "error": error}


class BedrockInputs:
    """Bedrock output records repeat their modelInput: read back from the input file as the output
    reaches each Bedrock line (lines come in file order, so the file is streamed once, and only
    if a Bedrock line comes)."""

    END = Row(2**62, b"", 0)

    def __init__(self, batch: Batch, deps: Deps) -> None:
        self.batch, self.deps = batch, deps
        self._rows: Iterator[Row] | None = None
        self._row: Row | None = None

    def get(self, n: int) -> dict | None:
        if self._rows is None:
            self._rows = lines.rows(self.batch, self.deps)  # the version the batch read, never a newer file's
        while self._row is None or self._row.n < n:
            try:
                self._row = next(self._rows, self.END)
            except Exception as exc:
                if not permanent(exc):
                    raise  # (the pass writes the output again)
                logger.warning(
                    "the batch's input file was replaced or deleted: its Bedrock records carry no modelInput",
                    extra={"batch_id": self.batch.id, "error": error_code(exc)},
                )
                self._rows, self._row = (r for r in ()), self.END
        if self._row.n != n:
            return None
        try:
            d = json.loads(self._row.raw)
        except ValueError:
            return None
        return d.get("modelInput") if isinstance(d, dict) else None

    def close(self) -> None:
        if self._rows is not None:
            self._rows.close()
