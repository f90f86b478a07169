"""Rebuild a `tokenizers` tokenizer.json from GGUF tokenizer metadata (vocab, merges, specials); a
Hugging Face directory's own tokenizer.json is kept as it is."""

from __future__ import annotations

from collections.abc import Callable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from stratus.errors import ModelBuildError
from stratus_model.source import TokenizerSpec

CONTROL, USER_DEFINED = 3, 4


def _byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()])


# GGUF `tokenizer.ggml.pre` -> pre-tokenizer (llama.cpp's names; same regexes as the originals).
PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": _byte_level,
    "gpt2": _byte_level,
    "smollm": _digits_then_byte_level,
    "starcoder": _digits_then_byte_level,
    "refact": _digits_then_byte_level,
}


def build_tokenizer(spec: TokenizerSpec) -> Tokenizer:
    if "tokenizer_json" in spec.extra:  # (stratus_model.hf)
        return Tokenizer.from_str(spec.extra["tokenizer_json"])
    if spec.model != "gpt2":
        raise ModelBuildError(f"tokenizer model {spec.model!r} is not supported (supported: gpt2 byte-level BPE)")
    make_pre = PRE_TOKENIZERS.get(spec.pre)
    if make_pre is None:
        raise ModelBuildError(
            f"pre-tokenizer {spec.pre!r} is not supported (supported: {', '.join(sorted(PRE_TOKENIZERS))})"
        )
    vocab = {tok: i for i, tok in enumerate(spec.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in spec.merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = make_pre()
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, kind in zip(spec.tokens, spec.token_types) if kind in (CONTROL, USER_DEFINED)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok
