"""Graph configurations over one set of weights: rewrites of a built graph that change how its
MatMulNBits linears compute, never the weights (every variant reads the same model.onnx.data).

  int8-activations    the built graph: accuracy_level 4, onnxruntime quantizes each row of the
                      input to int8 per block of 32 (scale = block max / 127) -> ~0.5-1% error
                      per linear, which adds up over 121 linears to ~4% of the logits' norm
  split-activations   each input row x goes in as two rows, hi = x on the int8 grid and
                      lo = x - hi (the rounding error, again quantized to int8): the same int8
                      kernels, the same weight reads, ~2x the multiply work, and the error of a
                      float32 product (lo's own rounding error is 1/254 of hi's)
  reference           accuracy_level 0 (float32 compute of the same weights): the build records
                      its outputs as the golden outputs a worker checks its host against

Why hi is exact: hi = s * round(x / s) with s = max|x_block| / 127, so hi's block maximum is 127 s
and onnxruntime's own quantization of hi (scale = max / 127, round) gives back the same integers.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper

from stratus_model.graph import Graph
from stratus_model.quant import BLOCK

SPLIT_LEVEL = 4  # only int8-activation linears (accuracy_level 4) are split


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def with_accuracy_level(model: onnx.ModelProto, level: int) -> onnx.ModelProto:
    """A copy of `model` whose MatMulNBits nodes all compute at `level` (0 = float32)."""
    out = copy.deepcopy(model)
    for node in out.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = level
    return out


SPLIT_CONSTANTS = {  # shared by every split linear (all tiny: they stay inside model.onnx)
    "/split/blocks": np.array([0, 0, -1, BLOCK], np.int64),  # (a linear of other blocks: /split/blocks<size>)
    "/split/last_axis": np.array([-1], np.int64),
    "/split/inv127": np.array(1 / 127, np.float32),
    "/split/tiny": np.array(1e-30, np.float32),  # an all-zero block: scale 0 would give 0/0
}


def make_split_linear(g: Graph, node: onnx.NodeProto) -> None:
    """One MatMulNBits y = x @ W -> the same node over rows [hi; lo], y = y_hi + y_lo.

    x [B, S, K] ─Reshape [B, S, K/32, 32]─┬─Abs─ReduceMax─·(1/127)─Max(tiny)─▶ s [B, S, K/32, 1]
                                          ├─Div(s)─Round─Mul(s)──────────────▶ hi
                                          └─Sub(hi)──────────────────────────▶ lo
    Concat(hi, lo; axis 0) ─Reshape [2B, S, K]─ MatMulNBits ─Split(axis 0)─ Add ─▶ y [B, S, N]
    """
    p = f"{node.name}/split"
    attrs = _attrs(node)
    shape = g.init(f"{p}/shape", np.array([0, 0, attrs["K"]], np.int64))
    blocks = g.op("Reshape", [node.input[0], _blocks_of(attrs.get("block_size", BLOCK))], f"{p}/blocks")
    peak = g.op("ReduceMax", [g.op("Abs", [blocks], f"{p}/Abs"), "/split/last_axis"], f"{p}/ReduceMax", keepdims=1)
    scale = g.op("Max", [g.op("Mul", [peak, "/split/inv127"], f"{p}/scale"), "/split/tiny"], f"{p}/scale_nonzero")
    hi = g.op("Mul", [g.op("Round", [g.op("Div", [blocks, scale], f"{p}/Div")], f"{p}/Round"), scale], f"{p}/hi")
    lo = g.op("Sub", [blocks, hi], f"{p}/lo")
    flat = g.op("Reshape", [g.op("Concat", [hi, lo], f"{p}/rows", axis=0), shape], f"{p}/flat")
    y2 = g.op("MatMulNBits", [flat, *node.input[1:]], f"{p}/MatMulNBits", domain=node.domain, **attrs)
    y_hi, y_lo = g.op("Split", [y2], f"{p}/Split", n_out=2, axis=0, num_outputs=2)
    g.nodes.append(helper.make_node("Add", [y_hi, y_lo], list(node.output), name=f"{p}/Add"))


def _blocks_of(size: int) -> str:
    """The Reshape target splitting rows into blocks of `size` inputs: onnxruntime quantizes an
    activation per block of the weight's block size, so hi is computed on the same blocks."""
    return "/split/blocks" if size == BLOCK else f"/split/blocks{size}"


def split_activations(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of `model` with every accuracy_level-4 MatMulNBits computed on split rows; None when
    there is none to split.

    float32-activation builds only: fp16 builds are for CUDA, whose MatMulNBits multiplies in
    float16 and never quantizes activations, so there is nothing to split."""
    nodes = list(model.graph.node)
    split = [n.op_type == "MatMulNBits" and _attrs(n).get("accuracy_level") == SPLIT_LEVEL for n in nodes]
    if not any(split) or _activation_dtype(model) != np.float32:
        return None
    g = Graph()
    for name, value in SPLIT_CONSTANTS.items():
        g.init(name, value)
    for size in sorted({_attrs(n).get("block_size", BLOCK) for n, s in zip(nodes, split) if s} - {BLOCK}):
        g.init(_blocks_of(size), np.array([0, 0, -1, size], np.int64))
    for node, is_linear in zip(nodes, split):
        if is_linear:
            make_split_linear(g, node)
        else:
            g.nodes.append(node)
    out = copy.deepcopy(model)
    del out.graph.node[:]
    out.graph.node.extend(g.nodes)
    out.graph.initializer.extend(g.inits)
    return out


def _activation_dtype(model: onnx.ModelProto) -> type:
    """float16 for fp16 builds (their embedding table or its scales, so every activation, is float16),
    else float32."""
    for t in model.graph.initializer:
        if t.name in ("model.embed_tokens.weight", "model.embed_tokens.gather_scales"):
            return np.float16 if t.data_type == onnx.TensorProto.FLOAT16 else np.float32
    return np.float32
