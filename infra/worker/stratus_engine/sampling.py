"""Sampling as a pipeline: penalties -> temperature -> top-k / top-p -> probabilities -> draw.

Rows are independent (each request has its own parameters and random generator); an all-greedy
batch takes the argmax fast path. A change here that can change a greedy or seeded request's
tokens bumps stratus.params.SAMPLING_VERSION (cache keys name it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from stratus.params import SamplingParams


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:  # [V] -> [V]
    """CTRL-style: divide positive logits of seen tokens by `penalty`, multiply negative ones."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    out = logits.copy()
    vals = out[seen]
    with np.errstate(over="ignore"):  # (a tiny penalty -> +-inf: tempered() holds +inf at the largest float)
        out[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def apply_logit_bias(logits: np.ndarray, bias: tuple[tuple[int, float], ...]) -> np.ndarray:  # [V] -> [V]
    """OpenAI logit_bias: add each bias to its token's logit (ids past the vocabulary are refused
    before the request runs: Engine.check_request)."""
    if not bias:
        return logits
    out = logits.copy()
    ids, values = zip(*bias)
    out[list(ids)] += np.asarray(values)
    return out


def apply_presence_frequency(
    logits: np.ndarray, generated: list[int], presence: float, frequency: float
) -> np.ndarray:  # [V] -> [V]
    """OpenAI/vLLM: logit[j] -= frequency * count[j] + presence * (count[j] > 0), counting the
    tokens generated so far (not the prompt)."""
    if (presence == 0.0 and frequency == 0.0) or not generated:
        return logits
    ids, counts = np.unique(np.asarray(generated, np.int64), return_counts=True)
    out = logits.copy()
    out[ids] -= frequency * counts + presence
    return out


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:  # [V] -> [V]
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


def exp_weights(x: np.ndarray) -> np.ndarray:  # [V] float64, max 0 -> [V] float32 exp(x)
    """Unnormalised probabilities in float32: ~10x faster than float64's exp over Gemma's 262,144
    logits. A logit below float32's range becomes -inf: weight 0, as it should be."""
    with np.errstate(over="ignore"):
        return np.exp(x.astype(np.float32))


# top_p sorts the tokens within these log-ratios of the likeliest first (1e-4, then 1e-8), and all
# of them only when the nucleus reaches past those: a real distribution's nucleus rarely does
TOP_P_LEVELS = (-9.2, -18.4, -np.inf)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:  # [V] -> [V]
    """Keep the smallest set of most likely tokens whose probability mass reaches p (ties in
    order of id). A full sort of Gemma's 262,144 logits took ~35 ms a row; the likeliest few
    hundred take well under one."""
    if p >= 1.0:
        return logits
    z = logits - logits.max()
    weights = exp_weights(z)
    total = weights.astype(np.float64).sum()  # (a dtype= argument makes numpy's loop several times slower)
    for level in TOP_P_LEVELS:
        cand = np.flatnonzero(z >= level)  # a prefix of the order below: every token at least this likely
        order = cand[np.argsort(-z[cand], kind="stable")]  # (cand is in id order: ties stay so)
        probs = weights[order] / total
        keep = np.cumsum(probs) - probs < p  # a token stays if the mass before it is below p
        if not keep.all():  # the nucleus ends inside the candidates
            break
    out = np.full_like(logits, -np.inf)
    out[order[keep]] = logits[order[keep]]
    return out


def sample_row(
    logits: np.ndarray, params: SamplingParams, seen: np.ndarray, rng: np.random.Generator, generated: list[int] = ()
) -> int:
    """logits [V] float32 -> one token id. Edits in vLLM's order: bias, then penalties."""
    x = apply_logit_bias(logits.astype(np.float64), params.logit_bias)
    x = apply_repetition_penalty(x, seen, params.repetition_penalty)
    x = apply_presence_frequency(x, list(generated), params.presence_penalty, params.frequency_penalty)
    if params.greedy:
        return int(np.argmax(x))
    x = top_p_filter(top_k_filter(tempered(x, params.temperature), params.top_k), params.top_p)
    return draw(x, rng)


def draw(x: np.ndarray, rng: np.random.Generator) -> int:
    """x [V], max 0 (tempered) -> a token id drawn with probability exp(x) / sum exp(x): inverse
    CDF over one uniform draw (rng.choice(p=softmax(x)) took 3.5 ms a row of Gemma's 262,144)."""
    weights = exp_weights(x)
    cdf = np.cumsum(weights.astype(np.float64))  # (a dtype= argument makes numpy's loop several times slower)
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))  # (skips zero-weight tokens)
    return i if i < len(cdf) else int(np.flatnonzero(weights)[-1])  # (a draw rounded up to the total)


def tempered(x: np.ndarray, temperature: float) -> np.ndarray:  # [V] float64 -> [V], max 0
    """x / temperature without overflow: shifted by the max first (the same distribution), and a
    logit a tiny repetition_penalty pushed to +inf held at the largest float. (Plain x / 1e-320
    overflows to inf, and inf - inf is NaN.)"""
    x = np.minimum(x, np.finfo(x.dtype).max)
    with np.errstate(over="ignore"):  # (far below the max -> -inf: probability 0, as it should be)
        return (x - x.max()) / temperature


def sample(
    logits: np.ndarray,
    params: list[SamplingParams],
    seen: list[np.ndarray],
    rngs: list[np.random.Generator],
    generated: list[list[int]] | None = None,
    on_error: Callable[[int, Exception], None] | None = None,
) -> list[int]:
    """logits [B, V] -> B token ids; generated: each row's tokens so far (presence/frequency).
    With on_error, a row whose sampling raises is reported (row, error) and gets -1, and the
    other rows are sampled as ever (one request's parameters never fail the batch)."""
    if all(p.greedy and not p.edits_logits for p in params):
        return [int(t) for t in logits.argmax(-1)]
    generated = generated or [[] for _ in params]
    out = []
    for b in range(len(params)):
        try:
            out.append(sample_row(logits[b], params[b], seen[b], rngs[b], generated[b]))
        except Exception as exc:
            if on_error is None:
                raise
            on_error(b, exc)
            out.append(-1)
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:  # [..., V] float32 -> [..., V] float32
    x = x.astype(np.float32, copy=False)
    m = x.max(-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def top_logprobs(lp: np.ndarray, k: int) -> tuple[tuple[int, float], ...]:  # [V] -> k (id, logprob), best first
    if k <= 0:
        return ()
    ids = np.argpartition(-lp, k - 1)[:k]
    ids = ids[np.lexsort((ids, -lp[ids]))]  # by log-probability, ties by id: the same on every host
    return tuple((int(i), float(lp[i])) for i in ids)


def token_logprobs(logits: np.ndarray, tokens: np.ndarray, k: int) -> list[tuple[int, float, tuple]]:
    """Log-probabilities of `tokens` under the model's own distribution (float32 log-softmax of the
    raw logits: before bias, penalties, temperature, top-k/top-p or a grammar's mask).
    logits [T, V], tokens [T] -> T of (token, logprob, the k most likely as (id, logprob))."""
    out = []
    for t in range(len(tokens)):
        lp = log_softmax(logits[t])
        out.append((int(tokens[t]), float(lp[tokens[t]]), top_logprobs(lp, k)))
    return out
