"""Streaming text deltas: joined, they are the engine's final text; nothing shown is ever taken back."""

import pytest

from stratus.params import SamplingParams
from stratus_engine.deltas import TextDeltas, visible_text
from stratus_engine.engine import Engine, GenerationRequest


@pytest.mark.parametrize(
    "text, stop, shown",
    [
        ("Hello wor", (), "Hello wor"),
        ("caf\ufffd", (), "caf"),  # half of "é": held until its second byte arrives
        ("one\n", ("\n\n",), "one"),  # may become the stop string
        ("one\n\ntwo", ("\n\n",), "one"),  # cut at the stop, even mid-token
        ("a END b", ("END", "b"), "a "),  # the earliest stop wins
        ("xEN", ("END",), "x"),
        ("xENDy", ("END", "y"), "x"),
    ],
)
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


def test_byte_text_is_the_tokenizers_decode_token_by_token(engine):
    # Given random outputs, half of their tokens single bytes of multi-byte characters, some special
    import random

    from stratus_engine.deltas import ByteText

    tok = engine.model.tokenizer
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)
    special = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
    table = engine.token_bytes
    partial = [i for i, b in enumerate(table) if b.decode("utf-8", "replace") != b.decode("utf-8", "ignore")]
    assert len(partial) > 100
    rng = random.Random(5)
    for _ in range(500):
        ids = [
            rng.choice(partial) if rng.random() < 0.5 else rng.randrange(len(table)) for _ in range(rng.randint(1, 30))
        ]
        ids.insert(rng.randrange(len(ids) + 1), rng.choice(sorted(special)))
        t = ByteText(table, special)
        for k, i in enumerate(ids, 1):
            t.push(i)
            # Then after each token its text is the decode of the tokens so far, less the unfinished
            # character the decoder shows as U+FFFD, and the last token's text ends it
            whole = decode(ids[:k])
            assert whole.startswith(t.text) and set(whole[len(t.text) :]) <= {"\ufffd"}
            assert t.text.endswith(t.recent(0))
        assert t.text + t._utf8.decode(b"", final=True) == decode(ids)
    # and an id past the tokenizer's vocabulary (a padded LM head) adds nothing, as decode() drops it
    t = ByteText(table, special)
    for i in (40, len(table) + 7, 41):
        t.push(i)
    assert t.text == decode([40, len(table) + 7, 41]) == decode([40, 41])


@pytest.mark.parametrize("text", ["Hello, world!", "café au lait — ça va? 日本語 🙂🙂", "a\n\nb  c"])
def test_byte_text_counts_the_tokens_within_a_text_as_whole_decodes_do(engine, text):
    from stratus_engine.deltas import ByteText, WholeText

    tok = engine.model.tokenizer
    ids = engine.encode(text)
    special = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
    fast, slow = ByteText(engine.token_bytes, special), WholeText(lambda x: tok.decode(x, skip_special_tokens=True))
    for i in ids:
        fast.push(i)
        slow.push(i)
    assert fast.text == slow.text == text
    assert [fast.tokens_within(0, c) for c in range(len(text) + 1)] == [
        slow.tokens_within(0, c) for c in range(len(text) + 1)
    ]


def test_the_engine_picks_byte_text_only_where_it_agrees(engine):
    from stratus_engine.deltas import ByteText, WholeText, text_factory

    tok = engine.model.tokenizer
    special = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
    assert isinstance(engine.new_text(), ByteText)  # our byte-level tokenizer
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)
    assert isinstance(text_factory(decode, engine.token_bytes, special, byte_level=False)(), WholeText)
    strips = lambda ids: decode(ids).lstrip()  # a decoder that drops a leading space (sentencepiece's)
    assert isinstance(text_factory(strips, engine.token_bytes, special, byte_level=True)(), WholeText)
