"""Build a Llama-family decoder as one fused ONNX graph with the KV cache as inputs/outputs.

I/O follows the layout Hugging Face Optimum and onnxruntime-genai use:
  inputs   input_ids [B, S] int64, attention_mask [B, T] int64, position_ids [B, S] int64,
           past_key_values.{i}.key|value [B, kv_heads, P, head_dim]
  outputs  logits [B, S, vocab], present.{i}.key|value [B, kv_heads, T', head_dim]
  optional num_logits_to_keep [1] int64 (default 0 = all): logits for the last k positions only,
           so a prefill does not pay the LM head (a fifth of the model) for every prompt token

Attention is onnxruntime's GroupQueryAttention: rows are right-padded (row b holds its first
sum(attention_mask[b]) positions), and when past and present are bound to the same buffer the
cache is updated in place (T' = P). Norms are (Skip)SimplifiedLayerNormalization, rotary is the
GroupQueryAttention's own (fed by position_ids, q/k/v packed in one input), linears are MatMul or MatMulNBits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from stratus_model.config import LlamaConfig
from stratus_model.families import FAMILIES
from stratus_model.ggml import DECODERS, PACKABLE, Blocks, packed
from stratus_model.quant import (
    BLOCK,
    FOUR_BIT_TYPES,
    QUANT_SCHEMES,
    NBits,
    QuantScheme,
    exact_nbits,
    q4_1_split,
    to_nbits,
)
from stratus_model.source import PackedBlocks, SourceTensor, WeightSource

MS = "com.microsoft"
OPSET = 21


@dataclass(frozen=True)
class Precision:
    activations: type  # the residual stream, norms, linears and LM head (and their float initializers)
    attention: type  # GroupQueryAttention's inputs and outputs, and the KV cache


# Activation types (`stratus model build --activations`). fp32 everywhere on the CPU. CUDA's
# GroupQueryAttention takes float16 only, so CUDA builds keep attention and the KV cache in float16:
# fp16-attn casts around it and keeps everything else float32 (the residual stream, whose outliers
# reach ~3000 where float16 steps by 2, and the logits); fp16 is float16 throughout (the least memory).
# Logits are float32 for sampling in every build.
ACTIVATIONS = {
    "fp32": Precision(np.float32, np.float32),
    "fp16-attn": Precision(np.float32, np.float16),
    "fp16": Precision(np.float16, np.float16),
}


def elem_type(dtype: type) -> int:
    """numpy dtype -> ONNX element type."""
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


@dataclass
class Graph:
    """Collects nodes and initializers; `op` returns the (first) output name. Float initializers
    are stored in the activation type."""

    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    dtype: type = np.float32  # activations
    kv_dtype: type = np.float32  # attention and the KV cache

    def init(self, name: str, array: np.ndarray, dtype: type | None = None) -> str:
        if np.issubdtype(array.dtype, np.floating):
            array = array.astype(dtype or self.dtype)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    @property
    def elem(self) -> int:  # the ONNX element type of activations
        return elem_type(self.dtype)

    def cast(self, x: str, dtype: type, name: str) -> str:
        """x, cast to dtype where it is of the other activation type (no node when they agree)."""
        return x if self.dtype == self.kv_dtype else self.op("Cast", [x], name, to=elem_type(dtype))

    def op(
        self, op_type: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "", **attrs
    ) -> str | list[str]:
        outputs = [f"{name}/output_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs[0] if n_out == 1 else outputs


Linear = Callable[[Graph, str, str, SourceTensor], str]  # (graph, path, x, weight) -> y


def concat_rows(tensors: list[SourceTensor], name: str) -> SourceTensor:
    """Stack weights along the output dimension; keeps raw blocks when every part shares a type,
    and the parts' integers when they are block types that differ (ggml.packed)."""
    cols = tensors[0].shape[1]
    rows = sum(t.shape[0] for t in tensors)
    if len({t.qtype for t in tensors}) == 1 and tensors[0].raw.ndim == 2:
        raw = np.concatenate([t.raw for t in tensors], axis=0)
        return SourceTensor(name, tensors[0].qtype, raw, (rows, cols))
    if all(t.qtype in PACKABLE for t in tensors):
        blocks = packed([PACKABLE[t.qtype](t.raw) for t in tensors])
        return PackedBlocks(name, "PACKED", np.empty(0, np.uint8), (rows, cols), blocks)
    dense = np.concatenate([t.dense() for t in tensors], axis=0)
    return SourceTensor(name, "F32", dense, (rows, cols))


def make_linear_fp32(g: Graph, path: str, x: str, w: SourceTensor) -> str:
    return g.op("MatMul", [x, g.init(f"{path}.weight", w.dense().T)], f"{path}/MatMul")


def linear_nbits(bits: int, accuracy_level: int) -> Linear:
    def make(g: Graph, path: str, x: str, w: SourceTensor) -> str:
        n, k = w.shape
        q: NBits = to_nbits(w, bits)
        inputs = [x, g.init(f"{path}.qweight", q.B), g.init(f"{path}.scales", q.scales)]
        if q.zero_points is not None:
            inputs.append(g.init(f"{path}.qzeros", q.zero_points))
        return g.op(
            "MatMulNBits",
            inputs,
            f"{path}/MatMulNBits",
            domain=MS,
            K=k,
            N=n,
            bits=bits,
            block_size=32,
            accuracy_level=accuracy_level,
        )

    return make


def add_block_offsets(g: Graph, path: str, x: str, y: str, offsets: np.ndarray, k: int, block: int) -> str:
    """y + (x's sums over each block of `block` inputs) @ offsets [K/block, N]: the per-block float
    offset of an affine block type (w = s*q + offset), which MatMulNBits cannot hold."""
    blocks = g.op(
        "Reshape",
        [x, g.init(f"{path}/block_shape", np.array([0, 0, k // block, block], np.int64))],
        f"{path}/blocks/Reshape",
    )
    sums = g.op(
        "ReduceSum",
        [blocks, g.init(f"{path}/block_axis", np.array([-1], np.int64))],
        f"{path}/blocks/ReduceSum",
        keepdims=0,
    )
    corr = g.op("MatMul", [sums, g.init(f"{path}.block_offsets", offsets)], f"{path}/offsets/MatMul")
    return g.op("Add", [y, corr], f"{path}/Add")


def linear_exact(g: Graph, path: str, x: str, w: SourceTensor, bits: int, accuracy_level: int) -> str:
    """A GGML block type's integers as they are (stratus_model.ggml, quant.exact_nbits): 4-bit where
    the type's are and `bits` is 4, else 8-bit (a pack of mixed types: 8-bit), at the type's block
    size, offsets added beside."""
    n, k = w.shape
    blocks: Blocks = w.blocks if isinstance(w, PackedBlocks) else DECODERS[w.qtype](w.raw)
    bits = 4 if bits == 4 and w.qtype in FOUR_BIT_TYPES else 8
    q, offsets = exact_nbits(blocks, bits)
    inputs = [x, g.init(f"{path}.qweight", q.B), g.init(f"{path}.scales", q.scales)]
    if q.zero_points is not None:
        inputs.append(g.init(f"{path}.qzeros", q.zero_points))
    y = g.op(
        "MatMulNBits",
        inputs,
        f"{path}/MatMulNBits",
        domain=MS,
        K=k,
        N=n,
        bits=bits,
        block_size=blocks.size,
        accuracy_level=accuracy_level,
    )
    return y if offsets is None else add_block_offsets(g, path, x, y, offsets, k, blocks.size)


def linear_q4_1(accuracy_level: int, bits: int = 4) -> Linear:
    """Exact GGML Q4_1: W = d*(q - 8) + c per 32-weight block (q in 4 or 8 bits, quant.q4_1_split);
    the other GGML block types exact too (linear_exact); float weights quantized (linear_nbits).

    x ─MatMulNBits(q, d, zero point 8)──────────────────────┐
    x ─Reshape[.., K/32, 32]─ReduceSum─MatMul(c [K/32, N])─ Add ─▶ y
    """
    fallback = linear_nbits(bits, accuracy_level)

    def make(g: Graph, path: str, x: str, w: SourceTensor) -> str:
        if w.qtype in DECODERS or isinstance(w, PackedBlocks):
            return linear_exact(g, path, x, w, bits, accuracy_level)
        if w.qtype != "Q4_1":
            return fallback(g, path, x, w)
        n, k = w.shape
        q, c = q4_1_split(w.raw, n, k, bits)
        y = g.op(
            "MatMulNBits",
            [x, g.init(f"{path}.qweight", q.B), g.init(f"{path}.scales", q.scales)],
            f"{path}/MatMulNBits",
            domain=MS,
            K=k,
            N=n,
            bits=bits,
            block_size=BLOCK,
            accuracy_level=accuracy_level,
        )
        return add_block_offsets(g, path, x, y, c, k, BLOCK)

    return make


def linear_for(bits: int | None, accuracy_level: int) -> Linear:
    if bits is None:
        return make_linear_fp32
    return linear_q4_1(accuracy_level, bits)


def rotary_cache(
    cfg: LlamaConfig, theta: float, scale: float = 1.0, factors: tuple[float, ...] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """-> cos, sin [context, head_dim/2] for RoPE base theta, positions divided by scale (linear
    scaling), each frequency divided by its factor (Llama 3 scaling)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    if factors:
        inv_freq = inv_freq / np.asarray(factors, np.float64)
    angles = np.outer(np.arange(cfg.context_length, dtype=np.float64) / scale, inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@dataclass(frozen=True)
class Rotary:
    """The cos/sin initializers each kind of layer reads (local layers may have their own base)."""

    global_: tuple[str, str]
    local: tuple[str, str]

    def of(self, cfg: LlamaConfig, layer: int) -> tuple[str, str]:
        return self.local if cfg.is_local(layer) else self.global_


def make_rotary(g: Graph, cfg: LlamaConfig) -> Rotary:
    """One pair of tables for the global layers, and one for the local layers where they differ."""

    def tables(prefix: str, theta: float, scale: float, factors: tuple[float, ...] = ()) -> tuple[str, str]:
        cos, sin = rotary_cache(cfg, theta, scale, factors)
        return g.init(f"{prefix}cos_cache", cos, g.kv_dtype), g.init(f"{prefix}sin_cache", sin, g.kv_dtype)

    global_ = tables("", cfg.rope_theta, cfg.rope_scale, cfg.rope_freq_factors)
    local_theta = cfg.rope_local_theta or cfg.rope_theta
    if not cfg.sliding_window or (local_theta, 1.0) == (cfg.rope_theta, cfg.rope_scale):
        return Rotary(global_, global_)
    return Rotary(global_, tables("local_", local_theta, 1.0))


def make_inputs(cfg: LlamaConfig, elem: int = TensorProto.FLOAT) -> tuple[list, list]:
    ins = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", cfg.vocab_size])
    ]
    kv = ["batch_size", cfg.num_kv_heads, None, cfg.head_dim]
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            ins.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}", elem, [kv[0], kv[1], "past_sequence_length", kv[3]]
                )
            )
            outs.append(
                helper.make_tensor_value_info(
                    f"present.{i}.{kind}", elem, [kv[0], kv[1], "total_sequence_length", kv[3]]
                )
            )
    return ins, outs


def make_sequence_lengths(g: Graph) -> tuple[str, str]:
    """attention_mask [B, T] -> seqlens_k [B] int32 (valid length - 1), total_sequence_length int32.

    attention_mask ─ReduceSum(axis 1)─Sub(1)─Cast─▶ seqlens_k
    attention_mask ─Shape─Gather(1)─Cast──────────▶ total_sequence_length
    """
    one = g.init("/model/constants/one_i64", np.array(1, np.int64))
    axis1 = g.init("/model/constants/axes_1", np.array([1], np.int64))
    total = g.op("ReduceSum", ["attention_mask", axis1], "/model/attn_mask_reformat/ReduceSum", keepdims=0)
    minus = g.op("Sub", [total, one], "/model/attn_mask_reformat/Sub")
    seqlens = g.op("Cast", [minus], "/model/attn_mask_reformat/seqlens_k", to=TensorProto.INT32)
    shape = g.op("Shape", ["attention_mask"], "/model/attn_mask_reformat/Shape")
    width = g.op("Gather", [shape, one], "/model/attn_mask_reformat/Gather", axis=0)
    total_len = g.op("Cast", [width], "/model/attn_mask_reformat/total_seq_len", to=TensorProto.INT32)
    return seqlens, total_len


def make_attention(
    g: Graph,
    cfg: LlamaConfig,
    i: int,
    h: str,
    src: WeightSource,
    linear: Linear,
    seqlens: str,
    total_len: str,
    rotary: Rotary,
) -> str:
    """h [B, S, hidden] -> attention output [B, S, hidden]; writes present.{i}.key|value.

    h ─qkv (packed [B, S, q+k+v])─ GroupQueryAttention(rotary from position_ids, past, seqlens_k) ─ o ─▶
    (fp16-attn: Cast to float16 before attention and back to float32 after it). A local layer's
    GroupQueryAttention sees the last cfg.sliding_window positions (local_window_size keeps as
    many keys, the query's own included, as Hugging Face's window does).
    """
    p = f"/model/layers.{i}/attn"
    qkv_w = concat_rows([src.tensor(f"layers.{i}.{n}") for n in ("q", "k", "v")], f"layers.{i}.qkv")
    qkv = linear(g, f"{p}/qkv_proj", h, qkv_w)
    if FAMILIES[cfg.family].qkv_bias:
        bias = np.concatenate([src.tensor(f"layers.{i}.{n}_bias").dense() for n in ("q", "k", "v")])
        qkv = g.op("Add", [qkv, g.init(f"model.layers.{i}.attn.qkv_proj.bias", bias)], f"{p}/qkv_proj/bias")
    qkv = g.cast(qkv, g.kv_dtype, f"{p}/qkv_proj/Cast")
    q, k, v = make_qk_norm(g, cfg, i, qkv, src) if FAMILIES[cfg.family].qk_norm else (qkv, "", "")
    name = f"{p}/GroupQueryAttention"
    cos, sin = rotary.of(cfg, i)
    optional = {
        "scale": cfg.attn_scale,
        "softcap": cfg.attn_softcap,
        "local_window_size": cfg.sliding_window if cfg.is_local(i) else 0,
    }
    g.nodes.append(
        helper.make_node(
            "GroupQueryAttention",
            [
                q,
                k,
                v,
                f"past_key_values.{i}.key",
                f"past_key_values.{i}.value",
                seqlens,
                total_len,
                cos,
                sin,
                "position_ids",
            ],
            [f"{name}/output_0", f"present.{i}.key", f"present.{i}.value"],
            name=name,
            domain=MS,
            num_heads=cfg.num_heads,
            kv_num_heads=cfg.num_kv_heads,
            do_rotary=1,
            rotary_interleaved=0,
            **{k: v for k, v in optional.items() if v},
        )
    )
    attn = g.cast(f"{name}/output_0", g.dtype, f"{name}/Cast")
    return linear(g, f"{p}/o_proj", attn, src.tensor(f"layers.{i}.o"))


def make_qk_norm(g: Graph, cfg: LlamaConfig, i: int, qkv: str, src: WeightSource) -> tuple[str, str, str]:
    """Packed qkv -> (q, k, v) with q and k RMS-normalized per head (Qwen 3), for GroupQueryAttention's
    unpacked inputs, which then applies RoPE. An explicit node: the CPU kernel ignores GQA's own
    q/k norm inputs.
      qkv ─Split─ q ─Reshape [B, S, heads, head_dim]─SimplifiedLayerNormalization─Reshape─▶ q
                  k ─(the same, kv heads)───────────────────────────────────────────────▶ k
                  v ────────────────────────────────────────────────────────────────────▶ v"""
    p = f"/model/layers.{i}/attn"
    widths = g.init(f"{p}/qkv_split", np.array([cfg.q_hidden, cfg.kv_hidden, cfg.kv_hidden], np.int64))
    q, k, v = g.op("Split", [qkv, widths], f"{p}/qkv_proj/Split", n_out=3, axis=-1)
    flat = g.init(f"{p}/flat_heads", np.array([0, 0, -1], np.int64))
    heads = g.init(f"{p}/heads", np.array([0, 0, -1, cfg.head_dim], np.int64))
    out = []
    for name, x in (("q", q), ("k", k)):
        weight = g.init(
            f"model.layers.{i}.self_attn.{name}_norm.weight", src.tensor(f"layers.{i}.{name}_norm").dense(), g.kv_dtype
        )
        per_head = g.op("Reshape", [x, heads], f"{p}/{name}_norm/Reshape_in")
        normed = g.op(
            "SimplifiedLayerNormalization",
            [per_head, weight],
            f"{p}/{name}_norm",
            axis=-1,
            epsilon=cfg.rms_eps,
            stash_type=1,
        )
        out.append(g.op("Reshape", [normed, flat], f"{p}/{name}_norm/Reshape_out"))
    return out[0], out[1], v


def silu(g: Graph, x: str, p: str) -> str:
    return g.op("Mul", [x, g.op("Sigmoid", [x], f"{p}/Sigmoid")], f"{p}/Mul")


def gelu_tanh(g: Graph, x: str, p: str) -> str:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): FastGelu is this tanh approximation."""
    return g.op("FastGelu", [x], f"{p}/FastGelu", domain=MS)


MLP_ACTIVATIONS: dict[str, Callable[[Graph, str, str], str]] = {"silu": silu, "gelu_tanh": gelu_tanh}


def make_mlp(g: Graph, cfg: LlamaConfig, i: int, h: str, src: WeightSource, linear: Linear) -> str:
    """Gated MLP: h ─gate_up─Split─▶ act(gate) * up ─down─▶ [B, S, hidden] (act: SiLU, or Gemma's tanh GELU)."""
    p = f"/model/layers.{i}/mlp"
    gu_w = concat_rows([src.tensor(f"layers.{i}.gate"), src.tensor(f"layers.{i}.up")], f"layers.{i}.gate_up")
    gu = linear(g, f"{p}/gate_up_proj", h, gu_w)
    split = g.init(f"{p}/gate_up_split", np.array([cfg.ffn, cfg.ffn], np.int64))
    gate, up = g.op("Split", [gu, split], f"{p}/gate_up_proj/Split", n_out=2, axis=-1)
    act = MLP_ACTIVATIONS[FAMILIES[cfg.family].activation](g, gate, f"{p}/act_fn")
    prod = g.op("Mul", [act, up], f"{p}/Mul")
    return linear(g, f"{p}/down_proj", prod, src.tensor(f"layers.{i}.down"))


def make_skip_norm(g: Graph, path: str, x: str, residual: str, weight: str, eps: float) -> tuple[str, str]:
    """(x + residual) -> (rms_norm(x + residual) * weight, x + residual)."""
    outs = g.op("SkipSimplifiedLayerNormalization", [x, residual, weight], path, n_out=4, domain=MS, epsilon=eps)
    return outs[0], outs[3]


KEEP = "num_logits_to_keep"


def make_keep_last(g: Graph, h: str) -> str:
    """h [B, S, H] -> h[:, S-k:] with k = num_logits_to_keep (0 keeps all: -0 = 0)."""
    g.init(KEEP, np.array([0], np.int64))  # the default for the optional input of the same name
    start = g.op("Neg", [KEEP], "/model/keep_last/Neg")
    end = g.init("/model/keep_last/end", np.array([np.iinfo(np.int64).max], np.int64))
    axis = g.init("/model/keep_last/axis", np.array([1], np.int64))
    return g.op("Slice", [h, start, end, axis], "/model/keep_last/Slice")


@dataclass(frozen=True)
class Embedding:
    """The token table as the graph holds it: float (fp32 builds), or 8-bit blocks that a tied LM
    head reads too (one copy of the weights in the file, whatever the vocabulary)."""

    table: str  # the float table, or the blocks' initializer [vocab, k_blocks, block]
    nbits: NBits | None = None
    offsets: np.ndarray | None = None  # an affine type's per-block offsets [k_blocks, vocab]
    block: int = BLOCK


def embed_nbits(w: SourceTensor) -> tuple[NBits, np.ndarray | None, int]:
    """The embedding as 8-bit blocks: a GGML block type's integers as they are (exact), a float
    table quantized per block of 32. -> (operands, offsets or None, block size)"""
    if w.qtype in PACKABLE:
        blocks = PACKABLE[w.qtype](w.raw)
        q, offsets = exact_nbits(blocks, 8)
        return q, offsets, blocks.size
    return to_nbits(w, 8), None, BLOCK


def make_embedding(g: Graph, cfg: LlamaConfig, src: WeightSource, quantized: bool) -> tuple[str, Embedding]:
    """input_ids [B, S] -> x [B, S, hidden] (times sqrt(hidden) for Gemma).

    quantized: input_ids ─GatherBlockQuantized(8-bit blocks)─ [B, S, K/block, block] (+ Gather(offsets))
               ─Reshape─▶ x; onnxruntime's kernel computes (q - zero point) * scale, exact for GGML's
               integers times their float16-derived scales."""
    p = "/model/embed_tokens"
    w = src.tensor("embed")
    if not quantized:
        table = g.init("model.embed_tokens.weight", w.dense())
        x, emb = g.op("Gather", [table, "input_ids"], f"{p}/Gather"), Embedding(table)
    else:
        q, offsets, block = embed_nbits(w)
        n, kb = cfg.vocab_size, cfg.hidden // block
        table = g.init("model.embed_tokens.qweight", q.B.reshape(n, kb, -1))
        inputs = [table, "input_ids", g.init("model.embed_tokens.gather_scales", q.scales.reshape(n, kb, 1))]
        if q.zero_points is not None:
            inputs.append(g.init("model.embed_tokens.gather_zeros", q.zero_points.reshape(n, kb, 1)))
        y = g.op(
            "GatherBlockQuantized", inputs, f"{p}/GatherBlockQuantized", domain=MS,
            gather_axis=0, quantize_axis=2, block_size=block, bits=8,
        )  # fmt: skip
        if offsets is not None:
            per_block = g.op("Gather", [g.init("model.embed_tokens.offsets", offsets.T), "input_ids"], f"{p}/offsets")
            tail = g.init(f"{p}/last_axis", np.array([-1], np.int64))
            y = g.op("Add", [y, g.op("Unsqueeze", [per_block, tail], f"{p}/offsets/Unsqueeze")], f"{p}/offsets/Add")
        flat = g.init(f"{p}/flat", np.array([0, 0, cfg.hidden], np.int64))
        x, emb = g.op("Reshape", [y, flat], f"{p}/Reshape"), Embedding(table, q, offsets, block)
    if FAMILIES[cfg.family].embed_scale:
        x = g.op("Mul", [x, g.init(f"{p}/scale", np.array(np.sqrt(cfg.hidden), np.float32))], f"{p}/scale")
    return x, emb


def tied_head_nbits(g: Graph, cfg: LlamaConfig, h: str, emb: Embedding, accuracy_level: int) -> str:
    """A tied LM head on the embedding's own blocks: h [B, S, hidden] -> [B, S, vocab]."""
    p, q = "/model/lm_head", emb.nbits
    inputs = [h, emb.table, g.init("lm_head.scales", q.scales)]
    if q.zero_points is not None:
        inputs.append(g.init("lm_head.qzeros", q.zero_points))
    y = g.op(
        "MatMulNBits", inputs, f"{p}/MatMulNBits", domain=MS,
        K=cfg.hidden, N=cfg.vocab_size, bits=8, block_size=emb.block, accuracy_level=accuracy_level,
    )  # fmt: skip
    return y if emb.offsets is None else add_block_offsets(g, p, h, y, emb.offsets, cfg.hidden, emb.block)


def make_lm_head(
    g: Graph, cfg: LlamaConfig, h: str, src: WeightSource, scheme: QuantScheme, accuracy_level: int, emb: Embedding
) -> None:
    """h [B, S, hidden] -> logits [B, S, vocab] (soft-capped: c * tanh(logits / c), Gemma 2). A tied
    head reads the embedding's table: Gemm on the float table, MatMulNBits on its blocks."""
    p = "/model/lm_head"
    if cfg.tied_embeddings and emb.nbits is not None:
        y = tied_head_nbits(g, cfg, h, emb, accuracy_level)
    elif scheme.lm_head_bits is None and cfg.tied_embeddings:
        shape_in = g.init(f"{p}/shape_2d", np.array([-1, cfg.hidden], np.int64))
        flat = g.op("Reshape", [h, shape_in], f"{p}/Reshape_in")
        mm = g.op("Gemm", [flat, emb.table], f"{p}/Gemm", transB=1)
        shape_h = g.op("Shape", [h], f"{p}/Shape", start=0, end=2)
        vocab = g.init(f"{p}/vocab", np.array([cfg.vocab_size], np.int64))
        out_shape = g.op("Concat", [shape_h, vocab], f"{p}/Concat", axis=0)
        y = g.op("Reshape", [mm, out_shape], f"{p}/Reshape_out")
    else:
        weight = src.tensor("embed" if cfg.tied_embeddings else "lm_head")
        y = linear_for(scheme.lm_head_bits, accuracy_level)(g, p, h, weight)
    if cfg.logit_softcap:
        cap = g.init(f"{p}/softcap", np.array(cfg.logit_softcap, np.float32))
        y = g.op(
            "Mul", [g.op("Tanh", [g.op("Div", [y, cap], f"{p}/softcap/Div")], f"{p}/softcap/Tanh"), cap], f"{p}/softcap"
        )
    if g.dtype == np.float32:
        g.nodes.append(helper.make_node("Identity", [y], ["logits"], name=f"{p}/logits"))
    else:  # sampling works in float32
        g.nodes.append(helper.make_node("Cast", [y], ["logits"], name=f"{p}/logits", to=TensorProto.FLOAT))


def make_norm(g: Graph, cfg: LlamaConfig, path: str, x: str, weight: str) -> str:
    return g.op("SimplifiedLayerNormalization", [x, weight], path, axis=-1, epsilon=cfg.rms_eps, stash_type=1)


def build_model(
    src: WeightSource,
    quant: str = "fp32",
    accuracy_level: int = 4,
    progress: Callable[[str], None] = lambda _msg: None,
    activations: str = "fp32",
) -> onnx.ModelProto:
    """The decoder. Each layer (Gemma's sandwich norms in brackets):

    x ─norm─attention─[norm]─(+x)─▶ r ─norm─mlp─[norm]─(+r)─▶ the next layer's x
    with each residual add fused into the next norm (SkipSimplifiedLayerNormalization).
    """
    cfg = src.config
    family = FAMILIES[cfg.family]
    scheme = QUANT_SCHEMES[quant]
    linear = linear_for(scheme.linear_bits, accuracy_level)
    precision = ACTIVATIONS[activations]
    g = Graph(dtype=precision.activations, kv_dtype=precision.attention)

    def weight(name: str) -> str:  # a norm's weight, by canonical name
        return g.init(f"model.{name}.weight", src.tensor(name).dense())

    x, emb = make_embedding(g, cfg, src, quantized=scheme.lm_head_bits is not None)
    rotary = make_rotary(g, cfg)
    seqlens, total_len = make_sequence_lengths(g)
    h = make_norm(g, cfg, "/model/layers.0/input_layernorm", x, weight("layers.0.attn_norm"))
    residual = out = x  # out: the layer before's MLP output, which layer i > 0 normalizes first
    for i in range(cfg.num_layers):
        progress(f"layer {i + 1}/{cfg.num_layers}")
        p = f"/model/layers.{i}"
        if i > 0:
            h, residual = make_skip_norm(
                g, f"{p}/input_layernorm", out, residual, weight(f"layers.{i}.attn_norm"), cfg.rms_eps
            )
        attn = make_attention(g, cfg, i, h, src, linear, seqlens, total_len, rotary)
        if family.sandwich_norms:
            attn = make_norm(g, cfg, f"{p}/post_attention_norm", attn, weight(f"layers.{i}.post_attn_norm"))
        h, residual = make_skip_norm(
            g, f"{p}/pre_mlp_norm", attn, residual, weight(f"layers.{i}.mlp_norm"), cfg.rms_eps
        )
        out = make_mlp(g, cfg, i, h, src, linear)
        if family.sandwich_norms:
            out = make_norm(g, cfg, f"{p}/post_mlp_norm", out, weight(f"layers.{i}.post_mlp_norm"))
    h, _ = make_skip_norm(g, "/model/norm", out, residual, weight("final_norm"), cfg.rms_eps)
    progress("lm head")
    make_lm_head(g, cfg, make_keep_last(g, h), src, scheme, accuracy_level, emb)

    ins, outs = make_inputs(cfg, elem_type(g.kv_dtype))
    ins.append(helper.make_tensor_value_info(KEEP, TensorProto.INT64, [1]))  # overridable: default below
    graph = helper.make_graph(g.nodes, "stratus_llama", ins, outs, initializer=g.inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)], producer_name="stratus"
    )
    model.ir_version = 10
    return model
