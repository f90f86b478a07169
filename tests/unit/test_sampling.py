import numpy as np
import pytest

from stratus.errors import InvalidRequest
from stratus.params import SamplingParams
from stratus_engine.sampling import (
    apply_repetition_penalty,
    draw,
    sample,
    sample_row,
    tempered,
    top_k_filter,
    top_p_filter,
)


def test_top_k_keeps_k_largest():
    x = np.array([1.0, 5.0, 3.0, 4.0])
    assert np.isfinite(top_k_filter(x, 2)).tolist() == [False, True, False, True]


def test_top_p_keeps_smallest_set_reaching_p():
    x = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert np.isfinite(top_p_filter(x, 0.7)).tolist() == [True, True, False, False]
    assert np.isfinite(top_p_filter(x, 0.5)).tolist() == [True, False, False, False]


def full_sort_top_p(x: np.ndarray, p: float) -> np.ndarray:  # the definition: sort everything
    order = np.argsort(-x, kind="stable")
    probs = np.exp(x[order] - x.max()) / np.exp(x - x.max()).sum()
    keep = np.cumsum(probs) - probs < p
    out = np.full_like(x, -np.inf)
    out[order[keep]] = x[order[keep]]
    return out


@pytest.mark.parametrize("scale", [12.0, 3.0, 0.05])  # peaked, Gemma-like, nearly flat (past every level)
@pytest.mark.parametrize("p", [0.5, 0.9, 0.99])
def test_top_p_sorting_only_the_likeliest_keeps_what_sorting_everything_keeps(scale, p):
    x = np.random.default_rng(3).standard_normal(262_144) * scale
    x[[10, 20, 30]] = x.max()  # ties at the top: kept in id order
    np.testing.assert_array_equal(top_p_filter(x, p), full_sort_top_p(x, p))


class Uniform:
    """An rng whose uniform draws are given."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def test_a_draw_follows_the_probabilities_and_never_picks_an_impossible_token():
    x = np.full(1000, -np.inf)
    x[[3, 500, 998]] = np.log([0.2, 0.5, 0.3])  # (max not 0: draw takes any shift)
    x -= x.max()
    rng = np.random.default_rng(4)
    counts = np.bincount([draw(x, rng) for _ in range(20_000)], minlength=1000)
    assert counts.sum() == counts[[3, 500, 998]].sum()
    np.testing.assert_allclose(counts[[3, 500, 998]] / 20_000, [0.2, 0.5, 0.3], atol=0.015)
    # the inverse CDF's edges: a draw of 0 is the first possible token, one rounded up to the total the last
    assert draw(x, Uniform(0.0)) == 3 and draw(x, Uniform(0.3999)) == 500 and draw(x, Uniform(1.0)) == 998


def test_repetition_penalty_pushes_seen_tokens_down():
    x = np.array([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(x, np.array([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_same_seed_same_draws_and_greedy_fast_path():
    logits = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    p = SamplingParams(temperature=1.0, seed=7)
    draws = [
        [sample_row(logits[0], p, np.zeros(0, np.int64), np.random.default_rng(7)) for _ in range(1)] for _ in range(3)
    ]
    assert draws[0] == draws[1] == draws[2]
    greedy = SamplingParams(temperature=0)
    assert sample(logits, [greedy] * 3, [np.zeros(0, np.int64)] * 3, [None] * 3) == logits.argmax(-1).tolist()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-320),  # x / t overflowed to inf, and inf - inf is NaN
        SamplingParams(temperature=0.7, repetition_penalty=1e-320),  # a seen positive logit / 1e-320 = inf
        SamplingParams(temperature=1e-320, repetition_penalty=1e-320),
    ],
)
def test_extreme_but_valid_parameters_draw_a_token_not_a_nan(params):
    logits = np.random.default_rng(1).standard_normal(50).astype(np.float32) * 10
    seen = np.array([int(np.argsort(logits)[-3])])  # the third most likely, positive
    got = sample_row(logits, params, seen, np.random.default_rng(0))
    expected = int(seen[0]) if params.repetition_penalty != 1.0 else int(logits.argmax())  # pushed up / argmax
    assert got == expected


def test_tempering_is_the_same_distribution_shifted():
    x = np.random.default_rng(2).standard_normal(100) * 5
    for t in (0.3, 1.0, 1.7):
        e = np.exp(x / t - (x / t).max())
        np.testing.assert_allclose(np.exp(tempered(x, t)), e, rtol=1e-12)


def test_a_row_whose_sampling_fails_fails_alone():
    logits = np.random.default_rng(3).standard_normal((3, 50)).astype(np.float32)
    p, rngs = SamplingParams(temperature=1.0, seed=5), [np.random.default_rng(5) for _ in range(3)]
    bad = np.zeros(0, np.int64)
    seen = [bad, np.array([10**6]), bad]  # row 1: an index past the vocabulary raises inside the penalty
    failed = {}
    tokens = sample(
        logits, [p, SamplingParams(temperature=1.0, repetition_penalty=1.5), p], seen, rngs, on_error=failed.__setitem__
    )
    assert list(failed) == [1] and tokens[1] == -1
    alone = [sample_row(logits[b], p, bad, np.random.default_rng(5)) for b in (0, 2)]
    assert [tokens[0], tokens[2]] == alone  # the others drew what they would have drawn anyway
    with pytest.raises(IndexError):
        sample(logits, [SamplingParams(temperature=1.0, repetition_penalty=1.5)], [seen[1]], rngs[:1])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"top_p": 1.5}, "top_p must be in (0.0, 1.0], got 1.5"),
        ({"temperature": -1}, "temperature must be in [0.0, 2.0], got -1"),
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1 (0 with echo), got 0"),
        ({"top_k": -2}, "top_k must be an integer >= 0, got -2"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop must be up to 4 non-empty strings"),
    ],
)
def test_params_name_field_range_and_value(kwargs, message):
    with pytest.raises(InvalidRequest) as err:
        SamplingParams(**kwargs)
    assert message in err.value.message
    assert err.value.param == next(iter(kwargs))


def test_params_normalize_stop_and_know_determinism():
    assert SamplingParams(stop="x").stop == ("x",)
    assert SamplingParams(temperature=0).deterministic
    assert SamplingParams(temperature=0.7, seed=1).deterministic
    assert not SamplingParams(temperature=0.7).deterministic
