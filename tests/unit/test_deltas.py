"""Streaming text deltas: joined, they are the engine's final text; nothing shown is ever taken back."""

import pytest

from stratus.params import SamplingParams
from stratus_engine.deltas import TextDeltas, visible_text
from stratus_engine.engine import Engine, GenerationRequest


@pytest.mark.parametrize("text, stop, shown", [
    ("Hello wor", (), "Hello wor"),
    ("caf\ufffd", (), "caf"),  # half of "é": held until its second byte arrives
    ("one\n", ("\n\n",), "one"),  # may become the stop string
    ("one\n\ntwo", ("\n\n",), "one"),  # cut at the stop, even mid-token
    ("a END b", ("END", "b"), "a "),  # the earliest stop wins
    ("xEN", ("END",), "x"),
    ("xENDy", ("END", "y"), "x"),
])
def test_visible_text(text, stop, shown):
    assert visible_text(text, stop) == shown


def test_deltas_never_repeat_and_skip_what_is_not_final():
    pieces = ["He", "llo", " caf", "", "é", "\n", "\n", "tail"]  # token 3 + 4: the two bytes of "é"

    def decode(ids):  # as the tokenizer does: an unfinished UTF-8 sequence shows as U+FFFD
        return "".join(pieces[i] for i in ids) + ("\ufffd" if ids[-1] == 3 else "")
    d = TextDeltas(decode, stop=("\n\n",))
    out = []
    for i in range(len(pieces)):
        d.push(i)
        out.append(d.take())
    assert out == ["He", "llo", " caf", "", "é", "", "", ""]
    assert "".join(out) == d.sent == "Hello café"


@pytest.fixture(scope="module")
def engine(tiny):
    return Engine.from_dir(tiny.dirs["int8"], threads=1, max_batch=4)


@pytest.mark.parametrize("stop", [(), ("a",), ("the", "\n")])
def test_deltas_joined_are_the_engines_text(engine, stop):
    # Given a row whose every token is streamed, taking deltas after each token
    tok = engine.model.tokenizer
    rows = []
    for seed in range(4):
        deltas = TextDeltas(lambda ids: tok.decode(ids, skip_special_tokens=True), stop)
        taken = []

        def on_token(t, _logprob, d=deltas, out=taken):
            d.push(t)
            out.append(d.take())
        params = SamplingParams(max_tokens=24, temperature=1.0, seed=seed, stop=stop)
        rows.append((GenerationRequest([1, 40 + seed, 90], params, on_token=on_token), deltas, taken))
    results = engine.generate([r for r, _, _ in rows])
    # Then the deltas joined are a prefix of the final text, and the final text is what remains
    for result, (_, deltas, taken) in zip(results, rows):
        assert result.text.startswith("".join(taken))
        assert "".join(taken) == deltas.sent
        assert deltas.tokens == len(result.token_ids)
