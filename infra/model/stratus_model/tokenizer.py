"""Rebuild a `tokenizers` tokenizer.json from GGUF tokenizer metadata; a Hugging Face directory's
own tokenizer.json is kept as it is.

Two kinds of GGUF vocabulary (`tokenizer.ggml.model`):

- "gpt2": byte-level BPE (SmolLM2, Llama 3, Qwen 2): the file's merges, after the pre-tokenizer
  `tokenizer.ggml.pre` names (PRE_TOKENIZERS: the regexes of the models' own tokenizer.json).
- "llama": SentencePiece BPE (Llama 2, Mistral, Gemma): pieces spell a space "▁", a character not
  in the vocabulary falls back to its UTF-8 bytes (<0x0A>), and pieces merge best score first, as
  llama.cpp's SPM tokenizer and SentencePiece do. A file without merges (the usual case) gets them
  from the scores: every split of a normal token into two vocabulary pieces, best token first.

Control tokens (and <unk>) become special added tokens, user-defined ones (Gemma's "\\n", "<b>")
plain added tokens matched whole in the text, as llama.cpp matches them (Gemma's runs of spaces
once spaces are "▁", longest first, as SentencePiece matches them). A BOS is added by
encode(add_special_tokens=True) when the GGUF says so (adds_bos); chats encode without it.
"""

from __future__ import annotations

from collections.abc import Callable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from stratus.errors import ModelBuildError
from stratus_model.source import TokenizerSpec

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's "▁"

# Llama 3's and Qwen 2's splits, as their tokenizer.json files write them (Qwen 2 reads digits one by one).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()])


def _split_then_byte_level(pattern: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    def make() -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    return make


# GGUF `tokenizer.ggml.pre` -> pre-tokenizer (llama.cpp's names; same regexes as the originals).
PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": _byte_level,
    "gpt2": _byte_level,
    "gpt-2": _byte_level,  # (llama.cpp's spelling)
    "smollm": _digits_then_byte_level,
    "starcoder": _digits_then_byte_level,
    "refact": _digits_then_byte_level,
    "llama-bpe": _split_then_byte_level(LLAMA3_SPLIT),
    "qwen2": _split_then_byte_level(QWEN2_SPLIT),
}
# A word that is itself a token is that token, whatever the merges say (Llama 3's tokenizer.json:
# "ignore_merges": true; llama.cpp's LLAMA3 pre-tokenizer).
IGNORE_MERGES = frozenset({"llama-bpe"})
# Normalizers of the originals (Qwen 2's tokenizer.json: NFC).
NORMALIZERS: dict[str, Callable[[], normalizers.Normalizer]] = {"qwen2": normalizers.NFC}
# llama.cpp adds a BOS where the file does not say: to every SentencePiece vocabulary, and after
# these pre-tokenizers (Llama 3's tokenizer.json adds <|begin_of_text|>).
BOS_BY_DEFAULT = frozenset({"llama-bpe"})


def build_tokenizer(spec: TokenizerSpec) -> Tokenizer:
    if "tokenizer_json" in spec.extra:  # (stratus_model.hf)
        return Tokenizer.from_str(spec.extra["tokenizer_json"])
    if spec.model == "gpt2":
        tok = _byte_level_bpe(spec)
    elif spec.model == "llama":
        tok = _sentencepiece_bpe(spec)
    else:
        raise ModelBuildError(
            f"tokenizer model {spec.model!r} is not supported (supported: gpt2 byte-level BPE, llama SentencePiece BPE)"
        )
    if adds_bos(spec):
        if spec.bos_id is None or not 0 <= spec.bos_id < len(spec.tokens):
            raise ModelBuildError(f"the GGUF asks for a BOS token (add_bos_token) but names none (bos {spec.bos_id})")
        bos = spec.tokens[spec.bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=[bos, "$A"], pair=[bos, "$A", f"{bos}:1", "$B:1"], special_tokens=[(bos, spec.bos_id)]
        )
    return tok


def adds_bos(spec: TokenizerSpec) -> bool:
    """Whether encode(add_special_tokens=True) leads with BOS: tokenizer.ggml.add_bos_token, else
    llama.cpp's default for the vocabulary."""
    if spec.add_bos is not None:
        return bool(spec.add_bos)
    return spec.model == "llama" or spec.pre in BOS_BY_DEFAULT


def _byte_level_bpe(spec: TokenizerSpec) -> Tokenizer:
    make_pre = PRE_TOKENIZERS.get(spec.pre)
    if make_pre is None:
        raise ModelBuildError(
            f"pre-tokenizer {spec.pre!r} is not supported (supported: {', '.join(sorted(PRE_TOKENIZERS))})"
        )
    vocab = {tok: i for i, tok in enumerate(spec.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in spec.merges]
    tok = Tokenizer(
        models.BPE(
            vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=spec.pre in IGNORE_MERGES
        )
    )
    if spec.pre in NORMALIZERS:
        tok.normalizer = NORMALIZERS[spec.pre]()
    tok.pre_tokenizer = make_pre()
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, kind in zip(spec.tokens, spec.token_types) if kind in (CONTROL, USER_DEFINED)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def _sentencepiece_bpe(spec: TokenizerSpec) -> Tokenizer:
    """llama.cpp's SPM tokenizer as a `tokenizers` BPE: spaces become "▁" (one more before the text
    with add_space_prefix, also after each added token, as llama.cpp does), the whole text is one
    word (no pre-tokenizer), and decoding turns "▁" back into spaces and bytes into characters."""
    types = list(spec.token_types) or [NORMAL] * len(spec.tokens)
    if len(types) != len(spec.tokens):
        raise ModelBuildError(f"{len(spec.tokens)} tokens but {len(types)} token types")
    prefix = True if spec.add_space_prefix is None else bool(spec.add_space_prefix)  # (llama.cpp's default)
    # llama.cpp's converter writes a user-defined "▁▁" (Gemma's runs of spaces) as "  ": spelled
    # back, it is matched in the text after spaces became "▁", longest first, as SentencePiece does.
    # (Not with the prefix: `tokenizers` would prepend one to the token too; there they are matched
    # in the raw text, as llama.cpp matches them.)
    tokens = [t.replace(" ", SPACE) if k == USER_DEFINED and not prefix else t for t, k in zip(spec.tokens, types)]
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if spec.merges:  # (the file's own, as Hugging Face's converter takes them)
        merges = [tuple(m.split(" ", 1)) for m in spec.merges]
    else:
        merges = spm_merges(tokens, types, spec.scores, vocab)
    unk = next((t for t, kind in zip(tokens, types) if kind == UNKNOWN), None)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence(
        ([normalizers.Prepend(SPACE)] if prefix else []) + [normalizers.Replace(" ", SPACE)]
    )
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if prefix else [])
    )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k in (CONTROL, UNKNOWN)]
    )
    tok.add_tokens(  # (matched in the raw text, as llama.cpp does: "\n", "<b>"; the respelled ones normalized)
        [
            AddedToken(t, special=False, normalized=t != raw)
            for t, raw, k in zip(tokens, spec.tokens, types)
            if k == USER_DEFINED
        ]
    )
    return tok


def spm_merges(
    tokens: list[str], types: list[int], scores: list[float], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    """SentencePiece's merge order as BPE merges, best first: each normal token of two or more
    characters, by score (higher first; ties and a file without scores: earlier in the file), as
    every split of it into two vocabulary pieces. Only normal tokens come out of a merge: text
    never turns into a control, user-defined, unused or byte token by merging."""
    if scores and len(scores) != len(tokens):
        raise ModelBuildError(f"{len(tokens)} tokens but {len(scores)} scores")
    order = sorted(
        (i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == NORMAL and len(t) > 1 and vocab.get(t) == i),
        key=(lambda i: (-scores[i], i)) if scores else None,
    )
    merges = []
    for i in order:
        t = tokens[i]
        merges.extend((t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab)
    return merges
