"""One job, several generations: a completions request may carry several prompts (each a
GenerationRequest of its own, with n choices) and ask for log-probabilities. This module turns a
request into the engine's prompts and the engine's results back into the job's result:

  {"text", "finish_reason"[, "logprobs"]}                  one choice
  {"choices": [{"text", "finish_reason"[, "logprobs"]}]}   several (prompt-major: index = p * n + i)

"logprobs" entries are OpenAI's chat shape, {"token", "logprob", "bytes", "top_logprobs"}, made
here because only the worker has the tokenizer; the API reshapes them for /v1/completions.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

from stratus import tools
from stratus.contracts import InferenceRequest
from stratus_engine.engine import Engine
from stratus_engine.outputs import GenerationResult, TokenLogprob


def encode_prompts(engine: Engine, req: InferenceRequest) -> list[list[int]]:
    """-> each prompt's token ids (a chat: its rendered template); a client's ids used exactly.
    Raises InvalidRequest when one cannot run (ids outside the vocabulary, too long, ...)."""
    if req.tools is not None and req.params.grammar:  # a function whose schema cannot be enforced, by name
        for i, f in enumerate(req.tools.functions):
            engine.guides.check_lark(tools.function_grammar(f), f"tools[{i}] ({f['name']})")
    if req.route == "chat":
        prompts = [engine.encode_chat(tools.tool_chat(list(req.messages), req.tools))]
    else:
        prompts = [engine.encode(p) if isinstance(p, str) else list(p) for p in req.prompts]
    for ids in prompts:
        engine.check_token_ids(ids)
        engine.check_request(len(ids), req.params)
    return prompts


def gather(futures: list[Future]) -> Future:
    """Futures of GenerationResults -> one future of their list, in order (the first error wins)."""
    out: Future = Future()
    lock, left = threading.Lock(), [len(futures)]

    def done(f: Future) -> None:
        if f.exception() is not None:
            if not out.done():
                out.set_exception(f.exception())
            return
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last and not out.done():
            out.set_result([g.result() for g in futures])

    for f in futures:
        f.add_done_callback(done)
    return out


def result_body(
    req: InferenceRequest, results: list[GenerationResult], token_bytes: list[bytes], decode, job_id: str = ""
) -> dict:
    """The job's result (see the module docstring); decode: token ids -> text (echoed id prompts).
    A chat whose output is a call (tools) adds its "tool_calls" (finish_reason "tool_calls")."""
    p = req.params
    choices = []
    for prompt, r in zip(req.prompts if req.route == "completion" else [None], results):
        echo = "" if not p.echo else prompt if isinstance(prompt, str) else decode(list(prompt))
        for c in r.choices:
            choice = {"text": echo + c.text, "finish_reason": c.finish_reason}
            if req.params.grammar and (calls := tools.calls(c.text, job_id, len(choices))):
                choice["tool_calls"] = calls
                choice["finish_reason"] = "tool_calls" if c.finish_reason == "stop" else c.finish_reason
            if p.logprobs is not None:
                scored = (r.prompt_logprobs or []) if p.echo else []
                choice["logprobs"] = [entry(t, token_bytes) for t in scored + (c.logprobs or [])]
            choices.append(choice)
    return choices[0] if len(choices) == 1 else {"choices": choices}


def usage(results: list[GenerationResult]) -> dict:
    """OpenAI's usage object; prompt_tokens_details.cached_tokens: the prompt tokens a stored prefix gave."""
    prompt = sum(r.usage.prompt_tokens for r in results)
    completion = sum(r.usage.completion_tokens for r in results)
    cached = sum(r.usage.cached_tokens for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def entry(t: TokenLogprob, token_bytes: list[bytes]) -> dict:
    """One token's log-probability in OpenAI's chat shape: {token, logprob, bytes, top_logprobs}."""

    def one(token: int, logprob) -> dict:
        raw = token_bytes[token]
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    entry = one(t.token, t.logprob)
    entry["top_logprobs"] = None if t.top is None else [one(i, lp) for i, lp in t.top]
    return entry
