"""Each token's bytes: what logprobs report as `bytes`, and what a grammar engine walks.

Byte-level BPE (GPT-2's scheme: SmolLM2, Llama 3, Qwen) spells a token's bytes with one printable
character per byte; inverting that map gives each token's exact bytes, including tokens that hold
part of a UTF-8 character (which decode() can only show as U+FFFD). SentencePiece vocabularies
(Gemma, Llama 2) spell a space "▁" and a lone byte "<0xF0>": those map back the same way.
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: printable Latin-1 bytes map to themselves, the rest to
    U+0100 onwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def is_byte_level(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer's decoder is GPT-2's byte-level one. (From the objects: serializing
    Gemma's tokenizer to JSON and back costs ~200 MB and seconds.)"""
    return isinstance(tokenizer.decoder, decoders.ByteLevel)


def special_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """The ids decode(skip_special_tokens=True) leaves out."""
    return frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)


def is_sentencepiece(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer is SentencePiece-style: a BPE falling back to <0xXX> byte tokens."""
    return bool(getattr(tokenizer.model, "byte_fallback", False))


def _sentencepiece_bytes(piece: str) -> bytes:
    """ "▁the" -> b" the", "<0x0A>" -> the byte 0x0A"""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode()


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """-> bytes of every token id (added tokens: their text in UTF-8)."""
    byte_level, sentencepiece = is_byte_level(tokenizer), is_sentencepiece(tokenizer)
    table = _unicode_to_byte()
    added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    out = []
    for i in range(tokenizer.get_vocab_size()):
        piece = tokenizer.id_to_token(i) or ""
        if byte_level and piece not in added and all(c in table for c in piece):
            out.append(bytes(table[c] for c in piece))
        elif sentencepiece and piece not in added:
            out.append(_sentencepiece_bytes(piece))
        else:
            out.append(tokenizer.decode([i], skip_special_tokens=False).encode())
    return out
