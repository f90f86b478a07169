"""Structured output: response_format's JSON schema, or a chat's tools (stratus.tools' Lark
grammar), enforced while decoding with llguidance.

llguidance compiles a JSON schema into a grammar over this model's tokenizer (from its
tokenizer.json: no torch, no transformers) and, at each step, gives the set of tokens that keep
the text a prefix of some valid document. The engine sets every other token's logit to -inf
before sampling, so greedy and sampled rows alike produce only schema-valid JSON; once the
document is complete only end-of-sequence remains (or the matcher stops by itself).

  Guides.check(params)      compile once (cached by the grammar's SHA-256); InvalidRequest if it cannot
  Guides.matcher(params)    a fresh matcher for one row (a copy of the cached, compiled one)
  Guides.check_lark(...)    one grammar alone, its refusal naming the request field it came from
  Guides.allowed(matchers)  [B, V] bool: the tokens each row may sample next

Compact JSON: no whitespace between tokens (whitespace_flexible off), which keeps a small model
from spending its tokens on spaces.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np

from stratus.errors import InvalidRequest

COMPILE = {"whitespace_flexible": False}
CACHE_SIZE = 64  # compiled schemas kept per engine


class Guides:
    def __init__(self, tokenizer_json: str, eos: list[int], vocab_size: int) -> None:
        self._tokenizer_json, self._eos, self.vocab_size = tokenizer_json, eos, vocab_size
        self._tokenizer = None  # built on first use (~0.4 s)
        self._compiled: OrderedDict[str, object] = OrderedDict()  # schema sha256 -> LLMatcher template
        self._lock = threading.Lock()

    def check(self, params) -> None:
        """Compile the grammar of `params` (SamplingParams) or raise InvalidRequest naming its field."""
        self._template(*_grammar(params))

    def matcher(self, params):
        return self._template(*_grammar(params)).deep_copy()

    def check_lark(self, lark: str, param: str) -> None:
        self._template("lark", lark, param)

    def allowed(self, matchers: list) -> np.ndarray:  # B matchers -> [B, V] bool
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

        words = allocate_token_bitmask(len(matchers), self._llg_tokenizer().vocab_size)
        for b, m in enumerate(matchers):
            fill_next_token_bitmask(m, words, b)
        bits = np.unpackbits(words.astype("<i4").view(np.uint8), axis=1, bitorder="little")  # token t: bit t
        out = np.zeros((len(matchers), self.vocab_size), bool)
        n = min(self.vocab_size, bits.shape[1])
        out[:, :n] = bits[:, :n].astype(bool)
        return out

    def _template(self, kind: str, text: str, param: str = ""):
        """kind "json": a JSON schema (response_format); "lark": a Lark grammar (tools)."""
        import llguidance as llg

        param = param or ("response_format" if kind == "json" else "tools")
        key = hashlib.sha256(f"{kind}:{text}".encode()).hexdigest()
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        what = "the JSON schema" if kind == "json" else "its JSON schema"
        try:
            if kind == "json":
                grammar = llg.LLMatcher.grammar_from_json_schema(text, overrides=COMPILE)
            else:
                grammar = llg.LLMatcher.grammar_from_lark(text)
        except (ValueError, TypeError, RuntimeError) as exc:  # llguidance's words for a schema it cannot read
            raise InvalidRequest(f"{param}: {what} is not valid: {exc}", param=param) from None
        m = llg.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if m.is_error():
            raise InvalidRequest(f"{param}: {what} cannot be enforced: {m.get_error()}", param=param)
        with self._lock:
            self._compiled[key] = m
            while len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        return m

    def _llg_tokenizer(self):
        import llguidance as llg

        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llg.LLTokenizer(self._tokenizer_json, n_vocab=self.vocab_size, eos_token=self._eos)
            return self._tokenizer


def _grammar(params) -> tuple[str, str]:
    """-> (kind, text) of the grammar a request's output must match (tools' first)."""
    return ("lark", params.grammar) if params.grammar else ("json", params.json_schema)
