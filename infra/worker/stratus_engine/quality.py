"""Quality probes shared by the tests and `make bench-quality`: perplexity and greedy agreement."""

from __future__ import annotations

import numpy as np

from stratus.params import SamplingParams
from stratus_engine.engine import Engine, GenerationRequest

# A fixed English passage for perplexity (public-domain style prose written for this project).
PERPLEXITY_TEXT = (
    "The city wakes slowly in winter. Before the sun clears the hills, the bakers have already "
    "pulled the first loaves from their ovens, and the smell of bread drifts down the narrow streets "
    "toward the river. Fishermen check their nets by lantern light while the trams begin their first "
    "rounds, half empty, their windows fogged from the cold. By eight o'clock the market square is "
    "full: farmers sell apples and potatoes from wooden crates, a man plays the violin near the "
    "fountain, and children on their way to school stop to watch the pigeons. Nobody is in a hurry. "
    "The old clock on the town hall has been five minutes slow for as long as anyone can remember, "
    "and the people here have simply learned to live five minutes behind the rest of the world."
)


def perplexity(engine: Engine, text: str = PERPLEXITY_TEXT) -> float:
    """exp(mean negative log-likelihood) of `text`'s tokens, teacher-forced in one prefill."""
    return perplexity_of_ids(engine, engine.encode(text))


def perplexity_of_ids(engine: Engine, ids: list[int]) -> float:
    """The same over given ids (a reference's tokenization): every token after the first is scored."""
    logits = engine.score(ids)  # [S, V]
    logits = logits[:-1].astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = logz - logits[np.arange(len(ids) - 1), ids[1:]]
    return float(np.exp(nll.mean()))


def greedy_tokens(engine: Engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    reqs = [GenerationRequest(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)) for p in prompts]
    return [r.token_ids for r in engine.generate(reqs)]


def agreement(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
