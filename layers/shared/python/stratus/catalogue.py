"""The models a deployment serves: public ids, their artifacts, limits and queues.

  STRATUS_MODELS = [{"id", "digest", "context_length", "uri", "queue_url", "batch_queue_url",
                     "aliases": [...]}, ...]          (JSON; the template writes it)

Unset, the deployment serves one model: the one the single-model variables name
(STRATUS_MODEL_ID, _DIGEST, _URI, STRATUS_CONTEXT_LENGTH and the two jobs queues). The first
entry is the default: a Bedrock record (which names no model) runs on it, and the alias "default"
names it. An alias is another public name for an entry (a version-less name pinned to a digest):
pointing it at a new entry is a rollout, and the new digest brings new cache keys.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from stratus.errors import ModelNotFound, shown

ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")  # what clients send as `model`
DEFAULT = "default"


@dataclass(frozen=True)
class ModelEntry:
    id: str  # the public id (the manifest's model_id)
    digest: str  # its artifact's digest: part of every cache key
    context_length: int
    uri: str = ""  # s3://bucket/models/<id>/<digest>/ (`stratus model publish`): the tokenizer routes read it
    queue_url: str = ""  # its interactive jobs queue
    batch_queue_url: str = ""  # its batch jobs queue ("" = the interactive one)
    aliases: tuple[str, ...] = ()

    def queue_for(self, tier: str) -> str:
        """The jobs queue of a tier."""
        return tier_queue(tier, self.queue_url, self.batch_queue_url)


def tier_queue(tier: str, queue_url: str, batch_queue_url: str) -> str:
    """A tier's jobs queue of a model's two: the batch one for batch work, when it has one."""
    return (batch_queue_url or queue_url) if tier == "batch" else queue_url


@dataclass(frozen=True)
class Catalogue:
    models: tuple[ModelEntry, ...]
    _names: dict = field(default_factory=dict, init=False, compare=False, repr=False)  # id or alias -> entry

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("a catalogue names at least one model")
        names = {DEFAULT: self.models[0]}
        for m in self.models:
            for name in (m.id, *m.aliases):
                if not ID.fullmatch(name):
                    raise ValueError(f"model name {name!r}: letters, digits and . _ : - only, at most 128")
                if name in names and name != DEFAULT:
                    raise ValueError(f"model name {name!r} is given twice")
                names[name] = m
        self._names.update(names)

    @property
    def default(self) -> ModelEntry:
        return self.models[0]

    def find(self, name: object) -> ModelEntry:
        """The entry a request's `model` names (an id or an alias); NotFound says how to list them."""
        entry = self._names.get(name) if isinstance(name, str) else None
        if entry is None:
            raise ModelNotFound(
                f"model {shown(name)} does not exist on this deployment; GET /v1/models lists the models it "
                f"serves ({', '.join(m.id for m in self.models)})",
                param="model",
            )
        return entry

    def aliases_of(self, entry: ModelEntry) -> list[str]:
        return [n for n, m in self._names.items() if m is entry and n != entry.id]

    @classmethod
    def from_json(cls, text: str) -> Catalogue:
        """STRATUS_MODELS -> Catalogue (ValueError naming what is wrong)."""
        raw = json.loads(text)
        if not isinstance(raw, list):
            raise ValueError("expected a JSON list of models")
        out = []
        for i, d in enumerate(raw):
            if not isinstance(d, dict) or not isinstance(d.get("id"), str) or not isinstance(d.get("digest"), str):
                raise ValueError(f"models[{i}]: needs an id and a digest")
            out.append(
                ModelEntry(
                    id=d["id"],
                    digest=d["digest"],
                    context_length=int(d.get("context_length", 8192)),
                    uri=d.get("uri", ""),
                    queue_url=d.get("queue_url", ""),
                    batch_queue_url=d.get("batch_queue_url", ""),
                    aliases=tuple(d.get("aliases") or ()),
                )
            )
        return cls(tuple(out))
