"""The served model's tokenizer, in the API: POST /tokenize, POST /detokenize, GET /tokenizer_info
(vLLM's shapes, which evaluation harnesses such as lm-eval use instead of loading a tokenizer).

The API reads it from the published model (ModelUri: `stratus model publish`): the manifest first,
whose digest must be this deployment's ModelDigest, then the few files a tokenizer needs, each
checked against the manifest's SHA-256. Loaded once per container (~2 MB), on the first call.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from stratus.chat_template import ChatTokenizer
from stratus.errors import InvalidRequest, ModelLoadError, NotConfigured
from stratus.manifest import MANIFEST, artifact_digest, split_uri
from stratus.tools import tool_chat
from stratus.wire import chat_message, tools_field

FILES = ("tokenizer.json", "config.json", "generation_config.json", "chat_template.jinja")
MAX_DETOKENIZE = 1 << 17  # token ids in one /detokenize body


@dataclass(frozen=True)
class ModelTokenizer:
    tokenizer: object  # tokenizers.Tokenizer
    chat_template: str | None
    eos_token: str | None
    bos_token: str | None
    context_length: int
    chat: ChatTokenizer  # chats: control tokens only where the template put them

    def tokenize(self, body: dict) -> dict:
        """{"prompt": str, "add_special_tokens"?} or {"messages": [...], "add_generation_prompt"?}
        -> {"count", "max_model_len", "tokens", "token_strs"}"""
        if not isinstance(body, dict) or ("prompt" in body) == ("messages" in body):
            raise InvalidRequest('send {"prompt": "..."} or {"messages": [...]}')
        if "prompt" in body:
            if not isinstance(body["prompt"], str):
                raise InvalidRequest("prompt must be a string", param="prompt")
            special = _flag(body, "add_special_tokens", True)
            return self._tokens(self.tokenizer.encode(body["prompt"], add_special_tokens=special).ids, body)
        messages = body["messages"]
        if not isinstance(messages, list):
            raise InvalidRequest("messages must be a list", param="messages")
        messages = tool_chat([chat_message(i, m) for i, m in enumerate(messages)], tools_field(body))
        ids = self.chat.encode(self.chat_template, messages, _flag(body, "add_generation_prompt", True))
        if _flag(body, "add_special_tokens", False):  # the tokenizer's own (a BOS) lead the prompt
            ids = self.tokenizer.encode("", add_special_tokens=True).ids + ids
        return self._tokens(ids, body)

    def _tokens(self, ids: list[int], body: dict) -> dict:
        strs = [self.tokenizer.id_to_token(i) for i in ids] if _flag(body, "return_token_strs", False) else None
        return {"count": len(ids), "max_model_len": self.context_length, "tokens": ids, "token_strs": strs}

    def detokenize(self, body: dict) -> dict:
        """{"tokens": [ids]} -> {"prompt": text}"""
        tokens = body.get("tokens") if isinstance(body, dict) else None
        vocab = self.tokenizer.get_vocab_size()
        if (
            not isinstance(tokens, list)
            or len(tokens) > MAX_DETOKENIZE
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens)
        ):
            raise InvalidRequest(
                f"tokens must be a list of at most {MAX_DETOKENIZE} token ids in [0, {vocab - 1}]", param="tokens"
            )
        return {"prompt": self.tokenizer.decode(tokens, skip_special_tokens=False)}

    def info(self) -> dict:
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "bos_token": self.bos_token,
            "pad_token": None,
            "chat_template": self.chat_template,
            "model_max_length": self.context_length,
            "vocab_size": self.tokenizer.get_vocab_size(),
        }


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false, got {value!r}", param=name)
    return value


def load(files: dict[str, bytes]) -> ModelTokenizer:
    """The tokenizer files (name -> bytes; chat_template.jinja optional) -> ModelTokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(files["tokenizer.json"].decode())
    cfg = json.loads(files.get("config.json", b"{}"))
    gen = json.loads(files.get("generation_config.json", b"{}"))
    eos = gen.get("eos_token_ids", gen.get("eos_token_id", cfg.get("eos_token_id")))
    eos = eos[0] if isinstance(eos, list) and eos else eos
    bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
    template = files.get("chat_template.jinja", b"").decode() or None
    context = gen.get("context_length", cfg.get("context_length", cfg.get("max_position_embeddings", 2048)))
    return ModelTokenizer(
        tok,
        template,
        None if eos is None else tok.id_to_token(eos),
        None if bos is None else tok.id_to_token(bos),
        int(context),
        ChatTokenizer(tok, bos, eos),
    )


def fetch(uri: str, s3, expected_digest: str) -> ModelTokenizer:
    """The tokenizer of the model published at `uri` (s3://bucket/prefix/), verified."""
    if not uri:
        raise NotConfigured(
            "the tokenizer routes read the published model: set the ModelUri parameter "
            "(`stratus model publish` prints it)"
        )
    bucket, prefix = split_uri(uri)

    def get(name: str) -> bytes:
        return s3.get_object(Bucket=bucket, Key=prefix + name)["Body"].read()

    manifest = json.loads(get(MANIFEST))
    if artifact_digest(manifest.get("files", {})) != manifest.get("digest"):
        raise ModelLoadError(f"{uri}{MANIFEST}: its digest does not match its file list")
    if manifest.get("digest") != expected_digest:
        raise ModelLoadError(
            f"{uri} holds model {manifest.get('digest')}, but this deployment serves {expected_digest} (ModelDigest)"
        )
    files = {}
    for name in FILES:
        meta = manifest.get("files", {}).get(name)
        if meta is None:
            continue
        data = get(name)
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise ModelLoadError(f"{uri}{name} differs from its manifest")
        files[name] = data
    if "tokenizer.json" not in files:
        raise ModelLoadError(f"{uri} has no tokenizer.json in its manifest")
    return load(files)
