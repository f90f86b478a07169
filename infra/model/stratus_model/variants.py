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
from onnx import helper, numpy_helper

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


class _Emitter:
    """Appends nodes named under one path; returns output names."""

    def __init__(self, nodes: list, path: str) -> None:
        self.nodes, self.path = nodes, path

    def __call__(self, op_type: str, inputs: list[str], suffix: str, n_out: int = 1, **attrs) -> str | list[str]:
        outs = [f"{self.path}/{suffix}/output_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"{self.path}/{suffix}", **attrs))
        return outs[0] if n_out == 1 else outs


SPLIT_CONSTANTS = {  # shared by every split linear (all tiny: they stay inside model.onnx)
    "/split/blocks": np.array([0, 0, -1, BLOCK], np.int64),
    "/split/last_axis": np.array([-1], np.int64),
    "/split/inv127": np.array(1 / 127, np.float32),
    "/split/tiny": np.array(1e-30, np.float32),  # an all-zero block: scale 0 would give 0/0
}


def make_split_linear(nodes: list, inits: list, node: onnx.NodeProto) -> None:
    """One MatMulNBits y = x @ W -> the same node over rows [hi; lo], y = y_hi + y_lo.

    x [B, S, K] ─Reshape [B, S, K/32, 32]─┬─Abs─ReduceMax─·(1/127)─Max(tiny)─▶ s [B, S, K/32, 1]
                                          ├─Div(s)─Round─Mul(s)──────────────▶ hi
                                          └─Sub(hi)──────────────────────────▶ lo
    Concat(hi, lo; axis 0) ─Reshape [2B, S, K]─ MatMulNBits ─Split(axis 0)─ Add ─▶ y [B, S, N]
    """
    op = _Emitter(nodes, f"{node.name}/split")
    shape = f"{node.name}/split/shape"
    inits.append(numpy_helper.from_array(np.array([0, 0, _attrs(node)["K"]], np.int64), shape))
    blocks = op("Reshape", [node.input[0], "/split/blocks"], "blocks")
    peak = op("ReduceMax", [op("Abs", [blocks], "Abs"), "/split/last_axis"], "ReduceMax", keepdims=1)
    scale = op("Max", [op("Mul", [peak, "/split/inv127"], "scale"), "/split/tiny"], "scale_nonzero")
    hi = op("Mul", [op("Round", [op("Div", [blocks, scale], "Div")], "Round"), scale], "hi")
    lo = op("Sub", [blocks, hi], "lo")
    rows = op("Concat", [hi, lo], "rows", axis=0)
    flat = op("Reshape", [rows, shape], "flat")
    y2 = op("MatMulNBits", [flat, *node.input[1:]], "MatMulNBits", domain=node.domain, **_attrs(node))
    y_hi, y_lo = op("Split", [y2], "Split", n_out=2, axis=0, num_outputs=2)
    nodes.append(helper.make_node("Add", [y_hi, y_lo], list(node.output), name=f"{node.name}/split/Add"))


def split_activations(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every accuracy_level-4 MatMulNBits computed on split rows.

    float32-activation builds only: fp16 builds are for CUDA, whose MatMulNBits multiplies in
    float16 and never quantizes activations, so there is nothing to split."""
    out = copy.deepcopy(model)
    g = out.graph
    if _activation_dtype(out) != np.float32:
        return out
    nodes: list = []
    extra: list = []
    for node in g.node:
        if node.op_type != "MatMulNBits" or _attrs(node).get("accuracy_level") != SPLIT_LEVEL:
            nodes.append(node)
            continue
        make_split_linear(nodes, extra, node)
    if not extra:
        return out
    extra += [numpy_helper.from_array(value, name) for name, value in SPLIT_CONSTANTS.items()]
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(extra)
    return out


def _activation_dtype(model: onnx.ModelProto) -> type:
    """float16 for fp16 builds (their KV cache inputs are float16), float32 otherwise."""
    for i in model.graph.input:
        if i.name.startswith("past_key_values."):
            return np.float16 if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else np.float32
    return np.float32
