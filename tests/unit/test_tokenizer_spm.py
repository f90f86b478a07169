"""The GGUF tokenizer rebuild: SentencePiece vocabularies (tokenizer.ggml.model "llama": Gemma,
Llama 2, Mistral), Llama 3's and Qwen 2's pre-tokenizers, and add_bos_token.

The SentencePiece vocabulary here is small and made up, so every expected id is worked out by hand
from llama.cpp's SPM rules: spaces become "▁" (one more before the text with add_space_prefix),
adjacent pieces merge while their join is a normal token, best score first, and a character the
vocabulary lacks becomes its UTF-8 bytes (<0xC3><0xA9>)."""

from __future__ import annotations

import pytest
from tokenizers import decoders

from stratus.errors import ModelBuildError
from stratus_model.source import TokenizerSpec
from stratus_model.tokenizer import PRE_TOKENIZERS, adds_bos, build_tokenizer, spm_merges

UNK, BOS, EOS = 0, 1, 2
BYTE0 = 3  # <0x00> .. <0xFF> are ids 3 .. 258
# (piece, score, type): single characters, then joins; "ab" comes before "bc" in the file but
# scores lower, so "abc" splits a + bc (score order, not file order)
NORMAL = [
    ("▁", 0.0),
    ("a", 0.0),
    ("b", 0.0),
    ("c", 0.0),
    ("h", 0.0),
    ("e", 0.0),
    ("l", 0.0),
    ("o", 0.0),
    ("ab", -10.0),
    ("bc", -5.0),
    ("ll", -2.0),
    ("▁h", -3.0),
    ("he", -4.0),
    ("llo", -6.0),
    ("▁he", -7.0),
    ("▁hello", -8.0),
]
FIRST = BYTE0 + 256
ID = {piece: FIRST + i for i, (piece, _) in enumerate(NORMAL)}
SPACES = FIRST + len(NORMAL)  # a user-defined "▁▁", which llama.cpp's converter writes as "  " (Gemma's)
NEWLINE = SPACES + 1  # a user-defined "\n" (Gemma's)
TURN = NEWLINE + 1  # a control token


def spm_spec(add_space_prefix: bool | None = True, add_bos: bool | None = None, **kw) -> TokenizerSpec:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [p for p, _ in NORMAL]
    tokens += ["  ", "\n", "<turn>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(NORMAL) + [4, 4, 3]
    scores = [0.0] * (3 + 256) + [s for _, s in NORMAL] + [-1000.0] * 3
    fields = dict(
        model="llama",
        pre="default",
        tokens=tokens,
        token_types=types,
        merges=[],
        bos_id=BOS,
        eos_id=EOS,
        chat_template=None,
        scores=scores,
        add_bos=add_bos,
        add_space_prefix=add_space_prefix,
    )
    return TokenizerSpec(**{**fields, **kw})


def ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def test_pieces_merge_by_score_with_the_space_prefix():
    tok = build_tokenizer(spm_spec(add_space_prefix=True))
    # ▁ h e l l o: ll (-2), then ▁h (-3), llo (-6), ▁he (-7), ▁hello (-8)
    assert ids(tok, "hello") == [ID["▁hello"]]
    # "abc": bc (-5) beats ab (-10) though ab comes first in the file; "▁a" is no token
    assert ids(tok, "abc") == [ID["▁"], ID["a"], ID["bc"]]
    assert ids(tok, "hello abc") == [ID["▁hello"], ID["▁"], ID["a"], ID["bc"]]
    # a leading space is a second "▁" (SentencePiece's, llama.cpp's: " Hello" -> ▁ ▁Hello)
    assert ids(tok, " hello") == [ID["▁"], ID["▁hello"]]
    assert ids(tok, "") == []


def test_without_the_space_prefix_nothing_is_prepended():
    tok = build_tokenizer(spm_spec(add_space_prefix=False))
    # h e l l o: ll, he (-4), llo; "hello" is no token
    assert ids(tok, "hello") == [ID["he"], ID["llo"]]
    assert ids(tok, " hello") == [ID["▁hello"]]
    assert ids(tok, "abc") == [ID["a"], ID["bc"]]


def test_a_character_outside_the_vocabulary_falls_back_to_its_bytes():
    tok = build_tokenizer(spm_spec(add_space_prefix=False))
    assert ids(tok, "é") == [BYTE0 + 0xC3, BYTE0 + 0xA9]
    assert ids(tok, "a😊b") == [ID["a"], *(BYTE0 + b for b in "😊".encode()), ID["b"]]
    assert UNK not in ids(tok, "ü\x00\uffff")


def test_control_and_user_defined_tokens_are_split_out():
    tok = build_tokenizer(spm_spec(add_space_prefix=True))
    # a control token is one id; the text after it gets the space prefix again (llama.cpp)
    assert ids(tok, "<s>hello</s>") == [BOS, ID["▁hello"], EOS]
    assert ids(tok, "<turn>abc") == [TURN, ID["▁"], ID["a"], ID["bc"]]
    # read as text (a chat's content: tokenizers' encode_special_tokens), it never makes one
    tok.encode_special_tokens = True
    assert not {BOS, EOS, TURN} & set(ids(tok, "<s>x</s><turn>"))

    tok = build_tokenizer(spm_spec(add_space_prefix=False))
    assert ids(tok, "a\nb") == [ID["a"], NEWLINE, ID["b"]]
    assert ids(tok, "a  b") == [ID["a"], SPACES, ID["b"]]  # "  " is the user-defined "▁▁"
    assert ids(tok, "a   b") == [ID["a"], SPACES, ID["▁"], ID["b"]]  # (longest first, from the left)
    assert ids(tok, "a ▁b") == [ID["a"], SPACES, ID["b"]]  # (matched after spaces became "▁": SentencePiece's)
    # with the prefix, matched in the raw text, and the text after it prefixed again (llama.cpp)
    tok = build_tokenizer(spm_spec(add_space_prefix=True))
    assert ids(tok, "a  b") == [ID["▁"], ID["a"], SPACES, ID["▁"], ID["b"]]


@pytest.mark.parametrize(
    "prefix,text",
    [
        (True, "hello abc"),
        (True, " hello world café 😊"),
        (False, " hello  world\n"),
        (False, "<s>hi</s> <turn>a"),
        (False, "  two\n\nlines  "),
    ],
)
def test_decoding_gives_the_text_back(prefix, text):
    # (with the prefix, text after an added token gets a "▁" of its own, which decodes as a space:
    # llama.cpp's and the original Llama 2 tokenizer's way too)
    tok = build_tokenizer(spm_spec(add_space_prefix=prefix))
    assert tok.decode(ids(tok, text), skip_special_tokens=False) == text


def test_decoding_turns_spaces_and_bytes_back_and_skips_control_tokens():
    tok = build_tokenizer(spm_spec(add_space_prefix=True))
    assert tok.decode([ID["▁hello"], ID["▁"], ID["a"]]) == "hello a"  # (the prefix's space dropped)
    assert tok.decode([ID["▁"], ID["▁hello"]]) == " hello"
    assert tok.decode([BOS, ID["▁hello"], BYTE0 + 0xC3, BYTE0 + 0xA9, EOS], skip_special_tokens=True) == "helloé"
    gemma = build_tokenizer(spm_spec(add_space_prefix=False))
    assert gemma.decode([ID["▁hello"]]) == " hello"  # no prefix: no space is stripped
    assert gemma.decode([SPACES, NEWLINE]) == "  \n"


def test_merges_come_from_scores_and_only_make_normal_tokens():
    spec = spm_spec()
    vocab = {t: i for i, t in enumerate(spec.tokens)}
    merges = spm_merges(spec.tokens, spec.token_types, spec.scores, vocab)
    assert merges[:3] == [("l", "l"), ("▁", "h"), ("h", "e")]  # scores -2, -3, -4
    assert merges.index(("b", "c")) < merges.index(("a", "b"))
    assert all("".join(m) in dict(NORMAL) for m in merges)  # none makes "  ", "<s>" or a byte
    # without scores: the file's order
    assert spm_merges(spec.tokens, spec.token_types, [], vocab)[0] == ("a", "b")


def test_merges_in_the_file_are_used_as_they_are():
    tok = build_tokenizer(spm_spec(add_space_prefix=False, merges=["a b", "h e"]))
    assert ids(tok, "abc") == [ID["ab"], ID["c"]]
    assert ids(tok, "hello") == [ID["he"], ID["l"], ID["l"], ID["o"]]


def test_bos_follows_add_bos_token():
    with_bos = build_tokenizer(spm_spec(add_bos=True))
    assert with_bos.encode("hello").ids == [BOS, ID["▁hello"]]
    assert with_bos.encode("hello", add_special_tokens=False).ids == [ID["▁hello"]]  # (chats: the template's)
    assert with_bos.encode("").ids == [BOS]
    assert with_bos.decode(with_bos.encode("hello").ids, skip_special_tokens=True) == "hello"
    without = build_tokenizer(spm_spec(add_bos=False))
    assert without.encode("hello").ids == [ID["▁hello"]]
    # not stated: llama.cpp's default, BOS for a SentencePiece vocabulary
    assert adds_bos(spm_spec(add_bos=None))
    assert build_tokenizer(spm_spec(add_bos=None)).encode("hello").ids[0] == BOS


def test_a_bos_asked_for_but_not_named_is_a_clear_error():
    with pytest.raises(ModelBuildError, match="add_bos_token"):
        build_tokenizer(spm_spec(add_bos=True, bos_id=None))


def byte_level_spec(pre: str, add_bos: bool | None = None) -> TokenizerSpec:
    from stratus_model.synthetic import MERGES, tiny_vocab

    vocab = tiny_vocab()
    return TokenizerSpec("gpt2", pre, vocab, [3, 3, 3] + [1] * (len(vocab) - 3), MERGES, 1, 2, None, add_bos=add_bos)


def test_byte_level_bos_only_when_the_file_says_so_or_llama_3():
    assert build_tokenizer(byte_level_spec("smollm")).post_processor is None  # (SmolLM2: add_bos_token false)
    assert build_tokenizer(byte_level_spec("smollm", add_bos=False)).post_processor is None
    assert build_tokenizer(byte_level_spec("smollm", add_bos=True)).encode("a").ids[0] == 1
    assert adds_bos(byte_level_spec("llama-bpe"))  # llama.cpp's default for Llama 3
    assert not adds_bos(byte_level_spec("qwen2"))


def split(pre: str, text: str) -> list[str]:
    """The pre-tokenizer's pieces, byte-level spelling undone."""
    byte_level = decoders.ByteLevel()
    return [byte_level.decode([p]) for p, _ in PRE_TOKENIZERS[pre]().pre_tokenize_str(text)]


# Pieces as Llama 3's and Qwen 2's own tokenizer.json split them (the same regexes, run through the
# `regex` module: equal): Llama 3 groups digits by three, Qwen 2 reads them one by one.
@pytest.mark.parametrize(
    "pre,text,pieces",
    [
        (
            "llama-bpe",
            "Hello world's 12345 test!!\n\n  x",
            ["Hello", " world", "'s", " ", "123", "45", " test", "!!\n\n", " ", " x"],
        ),
        (
            "llama-bpe",
            "I'LL go, 3.14159e10\r\n\tend  ",
            ["I", "'LL", " go", ",", " ", "3", ".", "141", "59", "e", "10", "\r\n", "\tend", "  "],
        ),
        ("llama-bpe", "  leading 你好世界 123abc", [" ", " leading", " 你好世界", " ", "123", "abc"]),
        (
            "qwen2",
            "Hello world's 12345 test!!\n\n  x",
            ["Hello", " world", "'s", " ", "1", "2", "3", "4", "5", " test", "!!\n\n", " ", " x"],
        ),
        (
            "qwen2",
            "I'LL go, 3.14159e10\r\n\tend  ",
            ["I", "'LL", " go", ",", " ", "3", ".", "1", "4", "1", "5", "9", "e", "1", "0", "\r\n", "\tend", "  "],
        ),
        ("qwen2", "  leading 你好世界 123abc", [" ", " leading", " 你好世界", " ", "1", "2", "3", "abc"]),
    ],
)
def test_llama3_and_qwen2_pre_tokenizers_split_like_the_originals(pre, text, pieces):
    assert split(pre, text) == pieces


def test_llama3_keeps_a_whole_word_token_and_qwen2_normalizes_to_nfc():
    llama3 = build_tokenizer(byte_level_spec("llama-bpe"))
    assert llama3.model.ignore_merges  # (Llama 3's tokenizer.json: a word in the vocabulary is one token)
    qwen2 = build_tokenizer(byte_level_spec("qwen2"))
    assert qwen2.normalizer.normalize_str("e\u0301") == "\u00e9"


def test_an_unknown_tokenizer_model_is_named():
    with pytest.raises(ModelBuildError, match="'bert' is not supported"):
        build_tokenizer(spm_spec(model="bert"))


def test_logprob_bytes_of_sentencepiece_tokens_are_their_bytes():
    # Given "é" spelled as two byte tokens and "▁hello" a piece, when logprobs report each token's
    # bytes, then the bytes join to the text's UTF-8 (not U+FFFD for half a character)
    from stratus_engine.tokens import token_bytes

    tok = build_tokenizer(spm_spec(add_space_prefix=False))
    table = token_bytes(tok)
    got = tok.encode(" helloé", add_special_tokens=False).ids
    assert b"".join(table[i] for i in got) == " helloé".encode()
    assert table[BYTE0 + 0xC3] == b"\xc3" and table[tok.token_to_id("▁hello")] == b" hello"
