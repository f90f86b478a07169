"""Continuous-batching generation over a model directory.

One scheduler thread calls `step()`; any thread may `submit()`. Each step:

  waiting ──admit (free slots, prefill token budget)──▶ prefill new rows ──▶ sample first token
                                                       (on a CPU in chunks: each chunk's first tokens out first)
  active  ──────────────────────────────────────────────▶ one decode step for every row ──▶ sample
  finished rows (EOS, stop string, max_tokens, cancelled) leave at once; their slot is reused.

Admission is decided by scheduler.py (a pure function of the waiting and running rows, the limits and
the time), prompts are run by prefill.py (with shared-prefix reuse), stop strings are matched and
outputs trimmed by stops.py; this module executes those decisions step by step.

A request with n > 1 is admitted as one group of n rows: its prompt is prefilled once and the
KV row copied to its siblings, which then sample apart (seeds seed, seed + 1, ...). The group's
future resolves when its last row finishes. Log-probabilities (params.logprobs) are those of the
model's raw distribution at each step; echo + logprobs also scores every prompt token, which needs
the logits of every prompt position (such a prompt is prefilled on its own). A row with a JSON
schema (response_format) or a grammar (a chat's tools) has its own matcher (guide.py): tokens that
would leave it are masked out of its logits before sampling. A row short of its min_tokens has its
end-of-sequence tokens masked the same way.

Rows 0..n-1 of the KV cache are live (kv_cache.py): our GroupQueryAttention builds update one
buffer in place, so no step copies the cache; standard-attention exports (Hugging Face Optimum)
get the graph's past + new back each step, with unused columns masked out.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from stratus.chat_template import ChatTokenizer
from stratus.errors import ContextLengthExceeded, InvalidRequest
from stratus.params import SamplingParams
from stratus_engine.deltas import TokenText, text_factory
from stratus_engine.guide import Guides
from stratus_engine.kv_cache import make_cache
from stratus_engine.model_dir import LoadedModel, load
from stratus_engine.outputs import Choice, GenerationResult, Timings, TokenLogprob, Usage
from stratus_engine.prefill import SCORE_CHUNK, Prompt, run_prompts, tokens_to_run
from stratus_engine.prefix_cache import PrefixCache
from stratus_engine.sampling import sample, token_logprobs
from stratus_engine.scheduler import (
    Limits,
    Waiting,
    admit,
    default_batch_rows_beside_interactive,
    default_interactive_headroom,
    reachable,
)
from stratus_engine.stops import stop_hit, trim
from stratus_engine.tokens import is_byte_level, special_ids, token_bytes


def _never() -> bool:
    return False


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    is_cancelled: Callable[[], bool] = _never  # polled between steps
    priority: int = 0  # waiting requests are admitted lowest first: 0 interactive, 1 batch (tiers)
    cache_scope: str = ""  # whose stored prompt prefixes it may reuse (prefix_cache.py): "" shares them
    tenant: str = ""  # who asked: admission lets tenants take turns (scheduler.admission_order)
    # each generated token of the first choice as it is sampled, with its TokenLogprob when asked (streaming)
    on_token: Callable[[int, TokenLogprob | None], None] | None = None


class EngineFailed(RuntimeError):
    """The engine's loop died (a kernel error, out of memory): the request cannot be served here."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"the engine stopped: {type(cause).__name__}")


@dataclass(eq=False)  # compared by identity
class _Group:
    """One GenerationRequest: its n rows, admitted together, resolved together."""

    req: GenerationRequest
    future: Future
    submitted: float
    rows: list[_Row] = field(default_factory=list)
    choices: list[Choice | None] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    admitted: float = 0.0
    first_token: float = 0.0
    cached: int = 0  # prompt tokens a stored prefix gave it
    to_run: int = 0  # prompt tokens its prefill runs, as admission counted them (prefill.tokens_to_run)

    @property
    def prompt(self) -> Prompt:
        return Prompt(self.req.prompt_ids, self.req.params.prompt_logprobs, self.req.cache_scope)


@dataclass(eq=False)  # rows are compared by identity
class _Row:
    group: _Group
    index: int  # which choice
    rng: np.random.Generator
    length: int = 0  # tokens in the KV cache
    pending: int = -1  # sampled token not yet fed to the model
    out: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    matcher: object | None = None  # llguidance LLMatcher when the output must match a JSON schema
    text: TokenText | None = None  # the output's text, kept as it grows when stop strings are watched
    seen: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    finished: bool = False

    @property
    def req(self) -> GenerationRequest:
        return self.group.req


# On a CPU a prefill costs about in proportion to its tokens, so prompts prefilled together give no
# one an earlier first token: in chunks, the first chunk's rows have theirs after its own prefill, and
# the last's when all would have, with no decode step between (docs/scheduling.md). [Zen 4, 2 cores]
# eight 49-token prompts at once: first token p50 224-395 ms in chunks of 64-256 tokens, 349-626 ms
# in one prefill, the last one's and the total time alike.
CPU_PREFILL_CHUNK = 128


class Engine:
    score_chunk = SCORE_CHUNK  # echo scoring's prefill chunk (prefill.prefill_scored)

    def __init__(
        self,
        model: LoadedModel,
        max_batch: int = 16,
        prefill_token_budget: int = 4096,
        prefill_chunk_tokens: int | None = None,
        initial_capacity: int = 256,
        prefix_cache_bytes: int = 0,
        batch_rows_beside_interactive: int | None = None,
        interactive_headroom: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """prefill_chunk_tokens: a step's admitted prompts run as prefills of at most this many padded
        tokens, each one's first tokens out before the next runs (None: CPU_PREFILL_CHUNK on a CPU, the
        whole step's on a GPU, where one wide prefill costs about what a narrow one does).
        prefix_cache_bytes: memory for stored prompt prefixes (prefix_cache.py); 0 turns reuse off.
        batch_rows_beside_interactive, interactive_headroom: admission's limits (scheduler.py; None:
        its defaults). The KV cache holds max_batch + interactive_headroom rows."""
        self.model = model
        self.spec = model.spec
        self.max_batch = max_batch
        self.batch_rows_beside_interactive = (
            default_batch_rows_beside_interactive(max_batch, gpu="CUDAExecutionProvider" in model.providers)
            if batch_rows_beside_interactive is None
            else batch_rows_beside_interactive
        )
        self.interactive_headroom = (
            default_interactive_headroom(max_batch) if interactive_headroom is None else interactive_headroom
        )
        self.clock = clock
        self._last_interactive = float("-inf")
        self.prefill_token_budget = prefill_token_budget
        gpu = "CUDAExecutionProvider" in model.providers
        self.prefill_chunk_tokens = prefill_chunk_tokens or (prefill_token_budget if gpu else CPU_PREFILL_CHUNK)
        self.cache = make_cache(model, max_batch + self.interactive_headroom, initial_capacity)
        per_token = (
            2 * self.spec.num_layers * self.spec.num_kv_heads * self.spec.head_dim * np.dtype(model.kv_dtype).itemsize
        )
        self.prefixes = (
            PrefixCache(prefix_cache_bytes, per_token)
            if prefix_cache_bytes > 0 and hasattr(self.cache, "save_prefix")
            else None
        )
        self._eos = set(self.spec.eos_token_ids)
        self._eos_ids = np.array(sorted(t for t in self._eos if t < self.spec.vocab_size), np.int64)
        self._waiting: deque[_Group] = deque()
        self._active: list[_Row] = []
        self.failure: BaseException | None = None  # what stopped run(): no request is taken after it
        self._starting: list[_Group] = []  # admitted, in prefill
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)

    # ---- public API -------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path, threads: int | None = None, *, spin: bool = True, **kwargs) -> Engine:
        return cls(load(path, threads=threads, spin=spin), **kwargs)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """A chat's prompt ids: its messages' text never becomes control tokens (chat_template.encode_chat).
        A model without a chat template (a base model) is refused, naming it."""
        if not self.spec.chat_template:
            raise InvalidRequest(
                f"model {self.spec.model_id} has no chat template (a base model): use /v1/completions with a prompt",
                param="messages",
            )
        return self.chat_tokenizer.encode(self.spec.chat_template, messages)

    def warm(self) -> None:
        """Build at start-up what a first request would wait for: the chat tokenizer and its
        template's render (~0.15-0.2 s on a 2-core host), every token's bytes (~0.1 s)."""
        if self.spec.chat_template:
            self.encode_chat([{"role": "user", "content": "hi"}])
        _ = self.token_bytes

    @cached_property
    def chat_tokenizer(self) -> ChatTokenizer:
        eos = self.spec.eos_token_ids
        return ChatTokenizer(self.model.tokenizer, self.spec.bos_token_id, eos[0] if eos else None)

    @cached_property
    def guides(self) -> Guides:
        return Guides(self.model.tokenizer.to_str(), list(self.spec.eos_token_ids), self.spec.vocab_size)

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """Every token id's exact bytes (logprobs report them)."""
        return token_bytes(self.model.tokenizer)

    @cached_property
    def new_text(self) -> Callable[[], TokenText]:
        """A TokenText for an output (deltas.py): incremental for a byte-level tokenizer whose
        decode it agrees with (checked here, once), else whole decodes."""
        tok = self.model.tokenizer
        return text_factory(
            lambda ids: tok.decode(ids, skip_special_tokens=True),
            self.token_bytes,
            special_ids(tok),
            is_byte_level(tok),
        )

    def encode(self, text: str) -> list[int]:
        """A completion prompt's ids, led by the tokenizer's own specials (a BOS where the model's
        tokenizer adds one: Gemma, Llama), as Hugging Face and vLLM encode a prompt."""
        return self.model.tokenizer.encode(text, add_special_tokens=True).ids

    def check_request(self, prompt_tokens: int, params: SamplingParams) -> None:
        """What only the engine can check: the context length, and logit_bias ids in the vocabulary."""
        self.check_fits(prompt_tokens, params.max_tokens)
        if params.n > self.max_batch:
            raise InvalidRequest(
                f"n must be at most {self.max_batch} on this worker (its batch size), got {params.n}", param="n"
            )
        vocab = self.model.spec.vocab_size
        if params.logit_bias and params.logit_bias[-1][0] >= vocab:
            raise InvalidRequest(
                f"logit_bias names token {params.logit_bias[-1][0]}; this model's vocabulary has "
                f"{vocab} tokens (ids 0-{vocab - 1})",
                param="logit_bias",
            )
        if params.json_schema or params.grammar:
            self.guides.check(params)

    def check_token_ids(self, ids: list[int]) -> None:
        """A client's own token ids must name tokens of this model."""
        vocab = self.model.spec.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(
                f"prompt token id {bad} is not in this model's vocabulary (ids 0-{vocab - 1})", param="prompt"
            )

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens < 1:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if prompt_tokens + max_tokens > self.spec.context_length:
            raise ContextLengthExceeded(prompt_tokens, max_tokens, self.spec.context_length)

    def submit(self, req: GenerationRequest) -> Future:
        """Queue a request; the future resolves to a GenerationResult. Raises on requests that cannot fit."""
        p = req.params
        self.check_request(len(req.prompt_ids), p)
        seed = p.seed if p.seed is not None else int.from_bytes(os.urandom(8), "little")
        group = _Group(req, Future(), time.monotonic(), choices=[None] * p.n)
        rng = lambda i: np.random.default_rng((seed + i) % 2**64)  # noqa: E731 (any int seed: numpy takes >= 0)
        group.rows = [
            _Row(
                group,
                i,
                rng(i),
                logprobs=[] if p.logprobs is not None else None,
                matcher=self.guides.matcher(p) if p.json_schema or p.grammar else None,
                text=self.new_text() if p.stop else None,
            )
            for i in range(p.n)
        ]
        group.future.set_running_or_notify_cancel()
        if req.priority == 0:
            self._last_interactive = self.clock()
        with self._wake:
            if self.failure is not None:
                raise EngineFailed(self.failure)
            self._waiting.append(group)
            self._wake.notify()
        return group.future

    def generate(self, reqs: list[GenerationRequest]) -> list[GenerationResult]:
        """Run requests to completion on the calling thread (CLI, tests, benchmarks)."""
        futures = [self.submit(r) for r in reqs]
        while not all(f.done() for f in futures):
            self.step()
        return [f.result() for f in futures]

    def run(self, stop: threading.Event, idle_wait_s: float = 0.05) -> None:
        """Scheduler loop for a worker thread: step while there is work, sleep when idle. If a step
        raises, every request waiting or running fails with EngineFailed, as does every later
        submit, and the error is raised: nobody waits on a result that can never come."""
        try:
            while not stop.is_set():
                if not self.step():
                    with self._wake:
                        if not self._waiting:
                            self._wake.wait(idle_wait_s)
        except BaseException as exc:
            self._die(exc)
            raise

    def _die(self, exc: BaseException) -> None:
        with self._wake:
            self.failure = exc
            groups = [*self._waiting, *self._starting, *(r.group for r in self._active)]  # (n rows: once each below)
            self._waiting.clear()
        for g in groups:
            if not g.future.done():
                g.future.set_exception(EngineFailed(exc))

    def score(self, ids: list[int]) -> np.ndarray:
        """Teacher-forced logits for one sequence: ids [S] -> [S, V]. Needs an idle engine."""
        if self._active:
            raise RuntimeError("score() needs an idle engine")
        self.check_fits(len(ids), 0)
        arr = np.asarray([ids], np.int64)
        logits = self.cache.prefill(arr, np.ones_like(arr), np.arange(len(ids), dtype=np.int64)[None], 0)
        self.cache.truncate(0)
        return logits[0]

    @property
    def num_running(self) -> int:
        return len(self._active)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # ---- scheduling -------------------------------------------------------------------------

    def step(self) -> bool:
        """One scheduler iteration; returns False when there was nothing to do."""
        self._drop_cancelled()
        new = self._admit()
        for i, chunk in enumerate(chunks := self._chunks(new)):
            # (out of the waiting list, not yet active: _die must still find them)
            self._starting = [g for c in chunks[i:] for g in c]
            self._prefill(chunk)  # its first tokens go out before the next chunk runs
        self._starting = []
        if self._active:
            self._decode()
        return bool(new or self._active)

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled = [g for g in self._waiting if g.req.is_cancelled()]  # one poll per request a step
            gone = {id(g) for g in cancelled}
            self._waiting = deque(g for g in self._waiting if id(g) not in gone)
        for r in [r for g in cancelled for r in g.rows] + [r for r in self._active if r.req.is_cancelled()]:
            self._finish(r, "cancelled")
        self._compact()

    def _admit(self) -> list[_Group]:
        """Take the groups admission picks (scheduler.admit) out of the waiting list, in its order."""
        limits = Limits(
            self.max_batch, self.interactive_headroom, self.batch_rows_beside_interactive, self.prefill_token_budget
        )
        clock = self.clock()  # (the engine's clock, which tests move; admitted times are monotonic)
        running, tenants = [r.req.priority for r in self._active], [r.req.tenant for r in self._active]
        with self._lock:
            # only the groups admission can reach pay for a stored-prefix lookup
            groups = [*self._waiting]
            near = reachable([(g.req.priority, g.req.tenant) for g in groups], limits.rows - len(running), tenants)
            groups = [groups[i] for i in near]
            for g in groups:
                g.to_run = tokens_to_run(self.prefixes, g.prompt)
            waiting = [Waiting(g.req.priority, g.req.params.n, g.to_run, g.req.tenant) for g in groups]
            new = [groups[i] for i in admit(waiting, running, limits, clock, self._last_interactive, tenants)]
            chosen = {id(g) for g in new}
            self._waiting = deque(g for g in self._waiting if id(g) not in chosen)
        now = time.monotonic()
        for g in new:
            g.admitted = now
        return new

    def _chunks(self, groups: list[_Group]) -> list[list[_Group]]:
        """The admitted groups, in order, as prefills of at most prefill_chunk_tokens padded prompt
        tokens each (a chunk's first group goes whatever its length)."""
        chunks: list[list[_Group]] = []
        longest = 0
        for g in groups:
            if chunks and max(longest, g.to_run) * (len(chunks[-1]) + 1) <= self.prefill_chunk_tokens:
                chunks[-1].append(g)
                longest = max(longest, g.to_run)
            else:
                chunks.append([g])
                longest = g.to_run
        return chunks

    def _prefill(self, groups: list[_Group]) -> None:
        """Prefill each group's prompt once into the slots after the active rows, then copy it to
        the group's other rows."""
        start = len(self._active)
        groups, last = self._run_prompts(groups, start)  # last: [V] per group, in the returned order
        self._active.extend(g.rows[0] for g in groups)
        for b, g in enumerate(groups):
            for r in g.rows[1:]:
                self.cache.copy_row(start + b, len(self._active))
                self._active.append(r)
        now = time.monotonic()
        rows, logits = [], []
        for g, x in zip(groups, last):
            g.first_token = now
            seen = np.unique(np.asarray(g.req.prompt_ids, np.int64))
            for r in g.rows:
                r.length, r.seen = len(g.req.prompt_ids), seen
            if g.req.params.max_tokens == 0:  # echo only: the prompt was the work
                for r in g.rows:
                    self._finish(r, "length")
                continue
            rows.extend(g.rows)
            logits.extend([x] * len(g.rows))
        if rows:
            self._accept(rows, np.stack(logits))
        else:
            self._compact()

    def _run_prompts(self, groups: list[_Group], start: int) -> tuple[list[_Group], list[np.ndarray]]:
        """Run each group's prompt into row start + i (prefill.run_prompts; i: its place in the
        returned order) -> the groups in that order and each one's logits at its last prompt token."""
        done = run_prompts(self.cache, self.prefixes, [g.prompt for g in groups], start, self.score_chunk)
        for i, scored in done.prompt_logprobs.items():
            groups[i].prompt_logprobs = scored
        for i, length in done.reused.items():
            groups[i].cached = length
        return [groups[i] for i in done.order], done.last

    def _decode(self) -> None:
        rows = self._active
        ids = np.array([[r.pending] for r in rows], np.int64)
        logits = self.cache.decode(ids, np.array([r.length for r in rows]))
        for r in rows:
            r.length += 1
        self._accept(list(rows), logits[:, -1])

    def _accept(self, rows: list[_Row], logits: np.ndarray) -> None:
        """Sample one token per row, record it, and finish rows that are done."""
        failed: dict[int, Exception] = {}
        tokens = sample(
            self._masked(rows, logits),
            [r.req.params for r in rows],
            [r.seen for r in rows],
            [r.rng for r in rows],
            [r.out for r in rows],
            on_error=failed.__setitem__,
        )
        for b, (r, tok) in enumerate(zip(rows, tokens)):
            if b in failed:
                self._fail(r, failed[b])
            if r.finished:  # (its request failed)
                continue
            p = r.req.params
            if r.logprobs is not None:  # the end-of-sequence token too: it was generated (vLLM's way)
                r.logprobs.append(TokenLogprob(*token_logprobs(logits[b : b + 1], np.array([tok]), p.logprobs)[0]))
            if tok in self._eos and not p.ignore_eos:
                self._finish(r, "stop")
                continue
            r.out.append(tok)
            r.pending = tok
            if r.text is not None:
                r.text.push(tok)
            if r.req.on_token is not None and r.index == 0:
                r.req.on_token(tok, r.logprobs[-1] if r.logprobs else None)
            if p.repetition_penalty != 1.0 and tok not in r.seen:
                r.seen = np.append(r.seen, tok)
            if r.matcher is not None and (not r.matcher.consume_token(tok) or r.matcher.is_stopped()):
                self._finish(r, "stop")  # the document is complete (nothing but its end could follow)
            elif p.stop and stop_hit(r.text, p.stop):
                self._finish(r, "stop")
            elif len(r.out) >= p.max_tokens:
                self._finish(r, "length")
        self._compact()

    def _masked(self, rows: list[_Row], logits: np.ndarray) -> np.ndarray:  # [B, V] -> [B, V]
        """Mask (-inf) what each row may not generate now: the tokens a guided row's grammar
        forbids, and the end of sequence of a row short of its min_tokens (a grammar decides where
        its document ends: min_tokens leaves guided rows alone). Other rows are untouched."""
        guided = [b for b, r in enumerate(rows) if r.matcher is not None]
        early = [
            b
            for b, r in enumerate(rows)
            if r.matcher is None and not r.req.params.ignore_eos and len(r.out) < r.req.params.min_tokens
        ]
        if not guided and not (early and len(self._eos_ids)):
            return logits
        out = logits.copy()
        if guided:
            allowed = self.guides.allowed([rows[b].matcher for b in guided])
            out[guided] = np.where(allowed, out[guided], -np.inf)
        if early:
            out[np.ix_(early, self._eos_ids)] = -np.inf
        return out

    def _fail(self, r: _Row, exc: Exception) -> None:
        """A row that cannot go on fails its whole request; the other requests go on."""
        for row in r.group.rows:
            row.finished = True
        if not r.group.future.done():
            r.group.future.set_exception(exc)

    def _finish(self, r: _Row, reason: str) -> None:
        """Record a row's choice; the last row of its group resolves the group's future."""
        if r.finished:
            return
        decoded = self.model.tokenizer.decode(r.out, skip_special_tokens=True)
        text, logprobs = trim(decoded, r.logprobs, r.req.params.stop, r.text)
        r.finished = True
        g = r.group
        g.choices[r.index] = Choice(list(r.out), text, reason, logprobs)
        if any(c is None for c in g.choices):
            return
        now = time.monotonic()
        first = g.first_token or now
        timings = Timings(
            queue_s=(g.admitted or now) - g.submitted,
            ttft_s=first - g.submitted,
            decode_s=now - first,
            total_s=now - g.submitted,
        )
        usage = Usage(len(g.req.prompt_ids), sum(len(c.token_ids) for c in g.choices), g.cached)
        if not g.future.done():
            g.future.set_result(GenerationResult(g.req.request_id, list(g.choices), usage, timings, g.prompt_logprobs))

    def _compact(self) -> None:
        """Remove finished rows, moving the last live row into each hole so rows stay 0..n-1."""
        rows = self._active
        i = 0
        while i < len(rows):
            if not rows[i].finished:
                i += 1
                continue
            last = rows.pop()
            if i < len(rows):
                self.cache.move_row(len(rows), i, last.length)
                rows[i] = last
        self.cache.truncate(len(rows))
