"""Where weights come from. The graph builder only sees `WeightSource`; GGUF is one adapter.

Canonical tensor names (Hugging Face layout, linear weights [out, in]):
  embed                 [vocab, hidden]
  layers.{i}.attn_norm  [hidden]        layers.{i}.mlp_norm [hidden]
  layers.{i}.q|k|v|o    [out, in]       layers.{i}.gate|up|down [out, in]
  layers.{i}.q_bias|k_bias|v_bias [out] (families with qkv_bias)
  layers.{i}.q_norm|k_norm [head_dim]   (families with qk_norm)
  final_norm            [hidden]        lm_head [vocab, hidden]  (absent when tied)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from stratus.errors import ModelBuildError
from stratus_model.config import LlamaConfig, global_every_of
from stratus_model.families import FAMILIES, REFUSED


@dataclass(frozen=True)
class SourceTensor:
    """One weight: its raw encoding plus a way to get float32 values.

    `qtype` is the GGML type name ("F32", "Q4_1", "Q8_0", ...). For block-quantized types `raw` is
    [rows, n_blocks * block_bytes] uint8 with rows already in Hugging Face order, so quantized
    encoders can reuse the published blocks bit for bit.
    """

    name: str
    qtype: str
    raw: np.ndarray
    shape: tuple[int, ...]  # logical shape, HF order: [out, in] or [n]

    def dense(self) -> np.ndarray:  # -> float32 of `shape`
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        try:
            values = dequantize(self.raw, GGMLQuantizationType[self.qtype])
        except (NotImplementedError, KeyError) as exc:
            raise ModelBuildError(f"tensor {self.name}: cannot dequantize type {self.qtype}") from exc
        return np.ascontiguousarray(values, dtype=np.float32).reshape(self.shape)

    def take_rows(self, order: np.ndarray) -> SourceTensor:
        """Reorder output rows (whole quantization blocks move together, so this is exact)."""
        return SourceTensor(self.name, self.qtype, np.ascontiguousarray(self.raw[order]), self.shape)


@dataclass(frozen=True)
class PackedBlocks(SourceTensor):
    """Weights of different GGML block types stacked along rows (graph.concat_rows), held as their
    integers, scales and offsets (stratus_model.ggml.packed): qtype "PACKED", raw unused."""

    blocks: object = None  # stratus_model.ggml.Blocks

    def dense(self) -> np.ndarray:
        return self.blocks.values().reshape(self.shape)


@dataclass(frozen=True)
class TokenizerSpec:
    model: str  # "gpt2" = byte-level BPE, "llama" = SentencePiece-style BPE (scores, byte fallback)
    pre: str  # pre-tokenizer name as GGUF spells it ("smollm", "gpt2", ...)
    tokens: list[str]
    token_types: list[int]  # 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    chat_template: str | None
    scores: list[float] = field(default_factory=list)  # SentencePiece: higher merges first
    add_bos: bool | None = None  # tokenizer.ggml.add_bos_token (None: not stated; see tokenizer.adds_bos)
    add_space_prefix: bool | None = None  # SentencePiece: "▁" before the text (None: not stated)
    extra: dict = field(default_factory=dict)


class WeightSource(Protocol):
    config: LlamaConfig
    tokenizer: TokenizerSpec
    description: dict

    def tensor(self, name: str) -> SourceTensor: ...


def unpermute_rotary_rows(n_heads: int, rows: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation (interleaved -> half-split rotary).

    The GGUF converter stores rows of each head as (head_dim/2, 2) pairs; Hugging Face keeps
    (2, head_dim/2) halves. Returns indices such that gguf_rows[order] is in HF order.
    """
    half = rows // n_heads // 2
    idx = np.arange(rows).reshape(n_heads, half, 2)  # gguf row index at (head, pair, lane)
    return idx.transpose(0, 2, 1).reshape(rows)  # HF row (head, lane, pair) <- gguf (head, pair, lane)


# GGUF tensor name -> canonical name ("{i}" is the layer index).
_GGUF_NAMES = {
    "token_embd.weight": "embed",
    "output_norm.weight": "final_norm",
    "output.weight": "lm_head",
    "blk.{i}.attn_norm.weight": "layers.{i}.attn_norm",
    "blk.{i}.ffn_norm.weight": "layers.{i}.mlp_norm",
    "blk.{i}.post_attention_norm.weight": "layers.{i}.post_attn_norm",
    "blk.{i}.post_ffw_norm.weight": "layers.{i}.post_mlp_norm",
    "blk.{i}.attn_q.weight": "layers.{i}.q",
    "blk.{i}.attn_k.weight": "layers.{i}.k",
    "blk.{i}.attn_v.weight": "layers.{i}.v",
    "blk.{i}.attn_output.weight": "layers.{i}.o",
    "blk.{i}.attn_q.bias": "layers.{i}.q_bias",
    "blk.{i}.attn_k.bias": "layers.{i}.k_bias",
    "blk.{i}.attn_v.bias": "layers.{i}.v_bias",
    "blk.{i}.attn_q_norm.weight": "layers.{i}.q_norm",
    "blk.{i}.attn_k_norm.weight": "layers.{i}.k_norm",
    "blk.{i}.ffn_gate.weight": "layers.{i}.gate",
    "blk.{i}.ffn_up.weight": "layers.{i}.up",
    "blk.{i}.ffn_down.weight": "layers.{i}.down",
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)
GEMMA_27B_LAYERS = {("gemma2", 46), ("gemma3", 62)}  # (llama.cpp tells the 27B models by their depth)


class GGUFSource:
    """Reads a GGUF file of a family the builder implements (memory-mapped) into canonical tensors."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelBuildError(f"GGUF file not found: {self.path}")
        try:
            self._reader = GGUFReader(self.path)
        except Exception as exc:  # the reader raises ValueError, struct errors, IndexError...
            raise ModelBuildError(f"{self.path}: not a readable GGUF file ({exc})") from exc
        arch = self._field("general.architecture")
        if arch in REFUSED:
            raise ModelBuildError(f"{self.path}: architecture {arch!r} is not supported: {REFUSED[arch]}")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelBuildError(
                f"{self.path}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.config = self._read_config(arch)
        self.tokenizer = self._read_tokenizer()
        self.description = {
            "format": "gguf",
            "file": self.path.name,
            "name": self._field("general.name", None),
            "architecture": arch,
            "tensor_types": dict(Counter(t.tensor_type.name for t in self._reader.tensors).most_common()),
        }

    def _field(self, key: str, default=...):
        f = self._reader.fields.get(key)
        if f is None:
            if default is ...:
                raise ModelBuildError(f"{self.path}: metadata key {key!r} is missing")
            return default
        return f.contents()

    def _read_config(self, arch: str) -> LlamaConfig:
        heads = int(self._field(f"{arch}.attention.head_count"))
        tokens = self._field("tokenizer.ggml.tokens", None)
        vocab = self._field(f"{arch}.vocab_size", None) or (len(tokens) if tokens else None)
        if vocab is None:
            raise ModelBuildError(f"{self.path}: cannot tell the vocabulary size")
        return LlamaConfig(
            num_layers=int(self._field(f"{arch}.block_count")),
            hidden=int(self._field(f"{arch}.embedding_length")),
            ffn=int(self._field(f"{arch}.feed_forward_length")),
            num_heads=heads,
            num_kv_heads=int(self._field(f"{arch}.attention.head_count_kv", heads)),
            vocab_size=int(vocab),
            context_length=int(self._field(f"{arch}.context_length")),
            rope_theta=float(self._field(f"{arch}.rope.freq_base", 10000.0)),
            rms_eps=float(self._field(f"{arch}.attention.layer_norm_rms_epsilon")),
            tied_embeddings="output.weight" not in {t.name for t in self._reader.tensors},
            head_dim=int(self._field(f"{arch}.attention.key_length", 0)),
            family=arch,
            rope_freq_factors=self._freq_factors(),
            **self._window_config(arch, heads),
        )

    def _freq_factors(self) -> tuple[float, ...]:
        """Llama 3's RoPE scaling, as llama.cpp stores it: rope_freqs.weight, a divisor per frequency."""
        t = self._tensors.get("rope_freqs.weight")
        return () if t is None else tuple(float(x) for x in np.asarray(t.data, np.float32).reshape(-1))

    def _window_config(self, arch: str, heads: int) -> dict:
        """Sliding window, RoPE scaling, attention scale and soft-caps, where the family has them.
        llama.cpp fixes what Gemma files do not carry: the window pattern, the local RoPE base, and
        the 27B models' query scale (hidden / heads instead of head_dim)."""
        family = FAMILIES[arch]
        out: dict = {}
        window = int(self._field(f"{arch}.attention.sliding_window", 0))
        if window:
            out.update(sliding_window=window, global_every=self._global_every(arch, family.global_every))
            out["rope_local_theta"] = float(self._field(f"{arch}.rope.freq_base_swa", family.rope_local_theta))
        scaling = self._field(f"{arch}.rope.scaling.type", "none")
        if scaling == "linear":
            out["rope_scale"] = float(self._field(f"{arch}.rope.scaling.factor"))
        elif scaling != "none":
            raise ModelBuildError(f"{self.path}: RoPE scaling {scaling!r} is not supported (supported: linear)")
        if (arch, int(self._field(f"{arch}.block_count"))) in GEMMA_27B_LAYERS:
            out["attn_scale"] = float(heads / int(self._field(f"{arch}.embedding_length"))) ** 0.5
        out["attn_softcap"] = float(self._field(f"{arch}.attn_logit_softcapping", 0.0))
        out["logit_softcap"] = float(self._field(f"{arch}.final_logit_softcapping", 0.0))
        return out

    def _read_tokenizer(self) -> TokenizerSpec:
        model = self._field("tokenizer.ggml.model")
        return TokenizerSpec(
            model=model,
            pre=self._field("tokenizer.ggml.pre", "default"),
            tokens=list(self._field("tokenizer.ggml.tokens")),
            token_types=[int(t) for t in self._field("tokenizer.ggml.token_type", [])],
            merges=list(self._field("tokenizer.ggml.merges", [])),
            bos_id=self._field("tokenizer.ggml.bos_token_id", None),
            eos_id=self._field("tokenizer.ggml.eos_token_id", None),
            chat_template=self._field("tokenizer.chat_template", None),
            scores=[float(s) for s in self._field("tokenizer.ggml.scores", [])],
            add_bos=self._field("tokenizer.ggml.add_bos_token", None),
            add_space_prefix=self._field("tokenizer.ggml.add_space_prefix", None),
        )

    def _global_every(self, arch: str, default: int) -> int:
        """The window pattern: `attention.sliding_window_pattern` as n (every n-th layer global) or
        as one flag a layer (true: local) where the file has it, else the family's."""
        pattern = self._field(f"{arch}.attention.sliding_window_pattern", default)
        if not isinstance(pattern, list):
            return int(pattern)
        every = global_every_of([bool(x) for x in pattern])
        if every is None:
            raise ModelBuildError(f"{self.path}: a sliding-window pattern other than every n-th layer global")
        return every

    def tensor(self, name: str) -> SourceTensor:
        gguf_name = _gguf_name(name)
        t = self._tensors.get(gguf_name)
        if t is None:
            raise ModelBuildError(f"{self.path}: tensor {gguf_name!r} is missing")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        raw = np.asarray(t.data)
        if t.tensor_type.name in ("F32", "F16"):  # (typed arrays; BF16 arrives as raw bytes, like the block types)
            raw = raw.reshape(shape)
        src = SourceTensor(name, t.tensor_type.name, raw, shape)
        cfg = self.config
        if not FAMILIES[cfg.family].permute_qk:
            return src
        if name.endswith(".q"):
            src = src.take_rows(unpermute_rotary_rows(cfg.num_heads, shape[0]))
        elif name.endswith(".k"):
            src = src.take_rows(unpermute_rotary_rows(cfg.num_kv_heads, shape[0]))
        return src


def _gguf_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "layers":
        key = "layers.{i}." + parts[2]
        gguf = next((g for g, c in _GGUF_NAMES.items() if c == key), None)
        return gguf.format(i=parts[1]) if gguf else name
    return next((g for g, c in _GGUF_NAMES.items() if c == name), name)
