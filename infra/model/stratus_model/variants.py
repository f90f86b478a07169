"""Graph configurations over one set of weights: rewrites of a built graph that change how its
MatMulNBits linears compute, never the weights (every variant reads model.onnx.data; fused-linear
also holds the same weights in BlockLinear's layout).

  int8-activations    the built graph: accuracy_level 4, onnxruntime quantizes each row of the
                      input to int8 per block of 32 (scale = block max / 127) -> ~0.5-1% error
                      per linear, which adds up over 121 linears to ~4% of the logits' norm
  split-activations   each input row x goes in as two rows, hi = x on the int8 grid and
                      lo = x - hi (the rounding error, again quantized to int8): the same int8
                      kernels, the same weight reads, ~2x the multiply work, and the error of a
                      float32 product (lo's own rounding error is 1/254 of hi's)
  fused-split         split-activations with the split and the sum in two nodes of Stratus's own
                      (infra/worker/kernels: SplitRows, then SumHalves, or JoinRows, which also
                      adds an affine type's block offsets) instead of twelve to sixteen small
                      ones: the split's bits, the offsets summed in another order; served where
                      the kernels library is built (stratus_engine.kernels)
  fused-linear        fused-split with each linear of GGML Q4_1, Q4_0 or Q8_0 blocks one
                      BlockLinear kernel of Stratus's: the split and the integer products in one
                      pass over the weights, held as tiles (stratus_model.tiles) in a file of their own;
                      and attention Stratus's GroupAttention (one task a row's kv head, not two
                      small GEMMs a query head)
  reference           accuracy_level 0 (float32 compute of the same weights): the build records
                      its outputs as the golden outputs a worker checks its host against

Why hi is exact: hi = s * round(x / s) with s = max|x_block| / 127, so hi's block maximum is 127 s
and onnxruntime's own quantization of hi (scale = max / 127, round) gives back the same integers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

from stratus_model import tiles
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


KERNELS_DOMAIN = "ai.stratus"  # the ops of infra/worker/kernels (split_rows.cc, block_linear.cc)


def make_fused_linear(g: Graph, node: onnx.NodeProto, offsets: str | None = None, out: str | None = None) -> None:
    """make_split_linear's graph on Stratus's kernels: x ─SplitRows─▶ [hi; lo] ─MatMulNBits─ SumHalves ─▶ y,
    or with an affine type's offsets initializer (graph.add_block_offsets) ─JoinRows(x, offsets)─▶ out."""
    p = f"{node.name}/fused"
    attrs = _attrs(node)
    x = node.input[0]
    rows = g.op("SplitRows", [x], f"{p}/SplitRows", domain=KERNELS_DOMAIN, block_size=attrs.get("block_size", BLOCK))
    y2 = g.op("MatMulNBits", [rows, *node.input[1:]], f"{p}/MatMulNBits", domain=node.domain, **attrs)
    if offsets is None:
        g.nodes.append(
            helper.make_node("SumHalves", [y2], list(node.output), name=f"{p}/SumHalves", domain=KERNELS_DOMAIN)
        )
    else:
        g.nodes.append(
            helper.make_node("JoinRows", [y2, x, offsets], [out], name=f"{p}/JoinRows", domain=KERNELS_DOMAIN)
        )


def offset_chains(nodes: list[onnx.NodeProto]) -> dict[str, tuple[str, list[onnx.NodeProto]]]:
    """graph.add_block_offsets' chains, by the MatMulNBits they sit beside: its name -> (the offsets
    initializer, the four nodes Reshape(x) ─ReduceSum─MatMul(offsets)─ Add(its y, ·)), each of whose
    outputs only the next one reads."""
    made = {o: n for n in nodes for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def only_reader(name: str, op_type: str) -> onnx.NodeProto | None:
        found = readers.get(name, [])
        return found[0] if len(found) == 1 and found[0].op_type == op_type else None

    def producer(name: str, op_type: str) -> onnx.NodeProto | None:
        node = made.get(name)
        return node if node is not None and node.op_type == op_type else None

    chains = {}
    for linear in (n for n in nodes if n.op_type == "MatMulNBits"):
        y, x = linear.output[0], linear.input[0]
        add = only_reader(y, "Add")
        matmul = add and producer(add.input[1] if add.input[0] == y else add.input[0], "MatMul")
        reduce = matmul and producer(matmul.input[0], "ReduceSum")
        reshape = reduce and producer(reduce.input[0], "Reshape")
        if reshape and reshape.input[0] == x and all(len(readers[n.output[0]]) == 1 for n in (reshape, reduce, matmul)):
            chains[linear.name] = (matmul.input[1], [reshape, reduce, matmul, add])
    return chains


def _blocks_of(size: int) -> str:
    """The Reshape target splitting rows into blocks of `size` inputs: onnxruntime quantizes an
    activation per block of the weight's block size, so hi is computed on the same blocks."""
    return "/split/blocks" if size == BLOCK else f"/split/blocks{size}"


def split_activations(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of `model` with every accuracy_level-4 MatMulNBits computed on split rows; None when
    there is none to split.

    float32-activation builds only: fp16 builds are for CUDA, whose MatMulNBits multiplies in
    float16 and never quantizes activations, so there is nothing to split."""
    linears = _int8_linears(model)
    if linears is None:
        return None
    g = Graph()
    for name, value in SPLIT_CONSTANTS.items():
        g.init(name, value)
    for size in sorted({_attrs(n).get("block_size", BLOCK) for n, s in zip(model.graph.node, linears) if s} - {BLOCK}):
        g.init(_blocks_of(size), np.array([0, 0, -1, size], np.int64))
    return _rewritten(model, g, linears, make_split_linear)


def fused_split(model: onnx.ModelProto, weights: Weights | None = None) -> onnx.ModelProto | None:
    """split_activations over Stratus's kernels (make_fused_linear), each linear's block offsets
    folded into its JoinRows; None when there is none to split.

    Given the build's `weights` (fused-linear), each linear whose weights tiles.from_nbits holds
    exactly is one BlockLinear over its tiles (a new initializer, `<linear>.tiles`), offsets included."""
    linears = _int8_linears(model)
    if linears is None:
        return None
    nodes = list(model.graph.node)
    split = {n.name for n, is_linear in zip(nodes, linears) if is_linear}
    chains = {name: chain for name, chain in offset_chains(nodes).items() if name in split}
    folded = {name: (offsets, chain[-1].output[0]) for name, (offsets, chain) in chains.items()}  # -> JoinRows
    dropped = {id(n) for _, chain in chains.values() for n in chain}
    keep = [id(n) not in dropped for n in nodes]

    def make(g: Graph, node: onnx.NodeProto) -> None:
        offsets, out = folded.get(node.name, (None, None))
        tiled = weights and linear_tiles(node, offsets, weights)
        if tiled is None:
            make_fused_linear(g, node, offsets, out)
            return
        bits, q = tiled
        attrs = _attrs(node)
        g.nodes.append(
            helper.make_node(
                "BlockLinear",
                [node.input[0], g.init(f"{node.input[1].removesuffix('.qweight')}.tiles", q)],
                [out or node.output[0]],
                name=f"{node.name}/tiled",
                domain=KERNELS_DOMAIN,
                K=attrs["K"],
                N=attrs["N"],
                bits=bits,
            )
        )

    out = _rewritten(model, Graph(), linears, make, keep)
    out.opset_import.append(helper.make_opsetid(KERNELS_DOMAIN, 1))
    return out


# what GroupAttention reads of a GroupQueryAttention's attributes
ATTENTION_ATTRIBUTES = ("num_heads", "kv_num_heads", "scale", "softcap", "local_window_size")
LANES = 16  # GroupAttention's head size is a multiple of this


def group_attention(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (changed in place) with each GroupQueryAttention over a float32 cache, rotary by halves and a head
    size GroupAttention takes computed by GroupAttention (infra/worker/kernels/attention.cc) instead; q, k and v
    given apart are packed first (one Concat).

      GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total, cos, sin, position_ids)
      -> GroupAttention(qkv, past_key, past_value, seqlens_k, total, cos, sin, position_ids)"""
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    nodes = []
    for node in model.graph.node:
        cache = inputs.get(node.input[3]) if node.op_type == "GroupQueryAttention" and len(node.input) > 9 else None
        attrs = _attrs(node)
        if (
            cache is None
            or cache.elem_type != onnx.TensorProto.FLOAT
            or not cache.shape.dim[3].dim_value  # (a head size the graph does not fix)
            or cache.shape.dim[3].dim_value % LANES != 0
            or attrs.get("do_rotary") != 1
            or attrs.get("rotary_interleaved", 0) != 0
            or set(attrs) - {"do_rotary", "rotary_interleaved", *ATTENTION_ATTRIBUTES}
        ):
            nodes.append(node)
            continue
        qkv = node.input[0]
        if node.input[1]:  # q, k and v apart (a family whose q and k are normalized per head)
            qkv = f"{node.name}/qkv"
            nodes.append(helper.make_node("Concat", list(node.input[:3]), [qkv], name=f"{node.name}/Concat", axis=-1))
        nodes.append(
            helper.make_node(
                "GroupAttention",
                [qkv, *node.input[3:10]],
                list(node.output),
                name=f"{node.name}/grouped",
                domain=KERNELS_DOMAIN,
                **{k: v for k, v in attrs.items() if k in ATTENTION_ATTRIBUTES},
            )
        )
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


Weights = Callable[[str], np.ndarray]  # an initializer of the built graph by name -> its value


def linear_tiles(node: onnx.NodeProto, offsets: str | None, weights: Weights) -> tuple[int, np.ndarray] | None:
    """A MatMulNBits node's BlockLinear tiles (stratus_model.tiles) and their bits, or None where
    they would not be exact."""
    attrs = _attrs(node)
    zero_points = weights(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    return tiles.from_nbits(
        weights(node.input[1]),
        weights(node.input[2]),
        zero_points,
        weights(offsets) if offsets else None,
        attrs["bits"],
        attrs["N"],
        attrs["K"],
        attrs.get("block_size", BLOCK),
    )


def _int8_linears(model: onnx.ModelProto) -> list[bool] | None:
    """Which nodes are accuracy_level-4 MatMulNBits (None: none, or a float16 build)."""
    linears = [n.op_type == "MatMulNBits" and _attrs(n).get("accuracy_level") == SPLIT_LEVEL for n in model.graph.node]
    return linears if any(linears) and _activation_dtype(model) == np.float32 else None


def _rewritten(
    model: onnx.ModelProto, g: Graph, linears: list[bool], make, keep: list[bool] | None = None
) -> onnx.ModelProto:
    """A copy of `model` whose marked nodes `make(g, node)` replaces (and without those `keep` drops);
    g's initializers added, those no node reads dropped."""
    for i, (node, is_linear) in enumerate(zip(model.graph.node, linears)):
        if is_linear:
            make(g, node)
        elif keep is None or keep[i]:
            g.nodes.append(node)
    out = copy.deepcopy(model)
    del out.graph.node[:]
    out.graph.node.extend(g.nodes)
    out.graph.initializer.extend(g.inits)
    read = {i for n in out.graph.node for i in n.input}  # the replaced linears' operands no node reads now
    kept = [t for t in out.graph.initializer if t.name in read]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out


def _activation_dtype(model: onnx.ModelProto) -> type:
    """float16 for fp16 builds (their embedding table or its scales, so every activation, is float16),
    else float32."""
    for t in model.graph.initializer:
        if t.name in ("model.embed_tokens.weight", "model.embed_tokens.gather_scales"):
            return np.float16 if t.data_type == onnx.TensorProto.FLOAT16 else np.float32
    return np.float32
