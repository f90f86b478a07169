"""A Hugging Face model directory as a WeightSource: config.json, *.safetensors (one file, or shards
named by model.safetensors.index.json), tokenizer.json, tokenizer_config.json (chat template and
special tokens) and generation_config.json (EOS ids).

Safetensors files are read here, not with the `safetensors` library: its numpy path cannot give
bfloat16 (numpy has no such type), the type most checkpoints are published in. The format is a
little-endian u64 header length, a JSON header ({name: {dtype, shape, data_offsets}}), then the
tensors' bytes; each tensor is memory-mapped and widened to float32 when the builder asks for it.

Families (stratus_model.families): llama and mistral (without a sliding window), qwen2, qwen3, and
gemma2 and gemma3_text with their sliding windows and soft-caps; linear and Llama 3 RoPE scaling.
Anything this builder does not implement (other RoPE scaling, a Llama-family window, biases a family lacks, another
activation or model_type) is refused, naming the field.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from stratus.errors import ModelBuildError
from stratus_model.config import LlamaConfig, global_every_of, llama3_freq_factors
from stratus_model.families import FAMILIES, REFUSED, for_hf_type
from stratus_model.source import SourceTensor, TokenizerSpec

HF_ACTIVATIONS = {
    "silu": "silu",
    "gelu_tanh": "gelu_pytorch_tanh",
}  # a family's MLP activation, as config.json names it
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # BF16: the top half of a float32

# canonical name -> Hugging Face name ("{i}": the layer)
_HF_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "layers.{i}.attn_norm": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.q": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.k": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.v": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.o": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.q_bias": "model.layers.{i}.self_attn.q_proj.bias",
    "layers.{i}.k_bias": "model.layers.{i}.self_attn.k_proj.bias",
    "layers.{i}.v_bias": "model.layers.{i}.self_attn.v_proj.bias",
    "layers.{i}.q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "layers.{i}.k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    "layers.{i}.gate": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.up": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.down": "model.layers.{i}.mlp.down_proj.weight",
}


def hf_name(name: str, family: str = "llama") -> str:
    """Canonical tensor name -> its Hugging Face name in that family.
    hf_name("layers.3.q") == "model.layers.3.self_attn.q_proj.weight" """
    names = {**_HF_NAMES, **FAMILIES[family].hf_names}
    parts = name.split(".")
    if parts[0] == "layers":
        return names["layers.{i}." + parts[2]].format(i=parts[1])
    return names[name]


def read_header(path: Path) -> tuple[int, dict]:
    """A safetensors file's (offset of its data, header without __metadata__); ModelBuildError
    naming the file when it is not one."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(100 << 20, path.stat().st_size - 8):
                raise ValueError(f"a header of {length} bytes")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise ModelBuildError(f"{path}: not a safetensors file ({exc})") from exc
    header.pop("__metadata__", None)
    return 8 + length, header


def load(path: Path, offset: int, entry: dict, name: str) -> np.ndarray:
    """One tensor of a safetensors file as float32."""
    dtype = DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise ModelBuildError(
            f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r} (supported: {', '.join(DTYPES)})"
        )
    start, end = entry["data_offsets"]
    shape = tuple(int(d) for d in entry["shape"])
    if end - start != int(np.prod(shape)) * np.dtype(dtype).itemsize:
        raise ModelBuildError(f"{path}: tensor {name!r} holds {end - start} bytes, not what its shape {shape} needs")
    raw = np.memmap(path, dtype=dtype, mode="r", offset=offset + start, shape=shape)
    if entry["dtype"] == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(raw, dtype=np.float32)


class HFSource:
    """Reads a Llama-architecture Hugging Face directory into canonical tensors."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ModelBuildError(f"{self.path}: not a Hugging Face model directory (no config.json)")
        hf = self._json("config.json")
        self._where = self._index()  # tensor name -> (file, data offset, header entry)
        self.config = _config(hf, self.path, tied="lm_head.weight" not in self._where)
        self.tokenizer = self._tokenizer(hf)
        self.description = {
            "format": "safetensors",
            "file": self.path.name,
            "name": hf.get("_name_or_path") or self.path.name,
            "architecture": hf.get("model_type"),
        }

    def _json(self, name: str, required: bool = True) -> dict:
        p = self.path / name
        if not p.is_file():
            if required:
                raise ModelBuildError(f"{self.path}: {name} is missing")
            return {}
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise ModelBuildError(f"{p}: not readable JSON ({exc})") from exc

    def _index(self) -> dict[str, tuple[Path, int, dict]]:
        index = self._json("model.safetensors.index.json", required=False)
        files = sorted(set(index.get("weight_map", {}).values())) if index else ["model.safetensors"]
        where = {}
        for name in files:
            p = self.path / name
            if not p.is_file():
                raise ModelBuildError(f"{self.path}: shard {name} is missing")
            offset, header = read_header(p)
            where.update({t: (p, offset, e) for t, e in header.items()})
        return where

    def _tokenizer(self, hf: dict) -> TokenizerSpec:
        from tokenizers import Tokenizer

        path = self.path / "tokenizer.json"
        if not path.is_file():
            raise ModelBuildError(f"{self.path}: tokenizer.json is missing")
        text = path.read_text()
        try:
            tok = Tokenizer.from_str(text)
        except Exception as exc:  # the tokenizers library raises its own exception type
            raise ModelBuildError(f"{path}: not a tokenizer the tokenizers library reads ({exc})") from exc
        vocab = tok.get_vocab(with_added_tokens=True)
        tokens = [""] * (max(vocab.values()) + 1)
        for t, i in vocab.items():
            tokens[i] = t
        special = {a.content for a in tok.get_added_tokens_decoder().values() if a.special}
        cfg = self._json("tokenizer_config.json", required=False)
        gen = self._json("generation_config.json", required=False)
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (self.path / "chat_template.jinja").is_file():
            template = (self.path / "chat_template.jinja").read_text()
        eos = gen.get("eos_token_id", hf.get("eos_token_id"))
        eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        return TokenizerSpec(
            model="hf",
            pre="hf",
            tokens=tokens,
            token_types=[3 if t in special else 1 for t in tokens],
            merges=[],
            bos_id=gen.get("bos_token_id", hf.get("bos_token_id")),
            eos_id=eos_ids[0] if eos_ids else None,
            chat_template=template,
            extra={"tokenizer_json": text, "eos_ids": eos_ids},
        )

    def tensor(self, name: str) -> SourceTensor:
        key = hf_name(name, self.config.family)
        found = self._where.get(key)
        if found is None:
            raise ModelBuildError(f"{self.path}: tensor {key!r} is missing")
        values = load(found[0], found[1], found[2], key)
        offset = FAMILIES[self.config.family].hf_norm_offset
        if offset and name.endswith("norm"):  # (Gemma: the weight a norm applies is 1 + w; GGUF stores that)
            values = values + np.float32(offset)
        return SourceTensor(name, "F32", values, values.shape)


def _window(hf: dict, family, path: Path) -> dict:
    """Gemma's sliding window, its pattern (layer_types, or every n-th layer global), local RoPE
    base, query scale and soft-caps -> LlamaConfig fields."""
    out: dict = {"attn_scale": float(hf.get("query_pre_attn_scalar") or hf["head_dim"]) ** -0.5}
    if hf.get("sliding_window"):
        every = family.global_every
        if hf.get("sliding_window_pattern"):
            every = int(hf["sliding_window_pattern"])
        if hf.get("layer_types"):
            every = global_every_of([k == "sliding_attention" for k in hf["layer_types"]])
            if every is None:
                raise ModelBuildError(
                    f"{path}: config.json's layer_types are not every n-th layer global, which this builder implements"
                )
        out.update(sliding_window=int(hf["sliding_window"]), global_every=every)
        out["rope_local_theta"] = float(hf.get("rope_local_base_freq") or hf.get("rope_theta", 10000.0))
    out["attn_softcap"] = float(hf.get("attn_logit_softcapping") or 0.0)
    out["logit_softcap"] = float(hf.get("final_logit_softcapping") or 0.0)
    return out


def _rope_scaling(hf: dict, path: Path) -> dict:
    """rope_scaling -> LlamaConfig fields: linear (positions / factor; Gemma 3's global layers) or
    Llama 3's (a divisor per frequency); another kind is refused."""
    scaling = hf.get("rope_scaling")
    if not scaling:
        return {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return {"rope_scale": float(scaling["factor"])}
    if kind == "llama3":
        head_dim = int(hf.get("head_dim") or int(hf["hidden_size"]) // int(hf["num_attention_heads"]))
        factors = llama3_freq_factors(
            head_dim,
            float(hf.get("rope_theta", 10000.0)),
            float(scaling["factor"]),
            float(scaling["low_freq_factor"]),
            float(scaling["high_freq_factor"]),
            int(scaling["original_max_position_embeddings"]),
        )
        return {"rope_freq_factors": factors}
    raise ModelBuildError(f"{path}: config.json sets rope_scaling ({scaling!r}), which this builder does not implement")


def _config(hf: dict, path: Path, tied: bool) -> LlamaConfig:
    """config.json -> LlamaConfig; ModelBuildError naming what this builder does not implement.
    tied: the checkpoint has no lm_head.weight (the head is the embedding)."""
    kind = hf.get("model_type")
    family = for_hf_type(kind) if isinstance(kind, str) else None
    if kind in REFUSED:
        raise ModelBuildError(f"{path}: model_type {kind!r} is not supported: {REFUSED[kind]}")
    if family is None:
        known = ", ".join(t for f in FAMILIES.values() for t in f.hf_types)
        raise ModelBuildError(f"{path}: model_type {kind!r} is not supported (supported: {known})")
    gemma = family.sandwich_norms  # (Gemma's windows, scaling and caps are read by _window)
    act_key = "hidden_activation" if "hidden_activation" in hf else "hidden_act"
    sliding = hf.get("use_sliding_window") if "use_sliding_window" in hf else hf.get("sliding_window") is not None
    unsupported = {
        "attention_bias": bool(hf.get("attention_bias")) and not family.qkv_bias,
        "mlp_bias": bool(hf.get("mlp_bias")),
        "use_sliding_window" if "use_sliding_window" in hf else "sliding_window": bool(sliding) and not gemma,
        act_key: hf.get(act_key, HF_ACTIVATIONS[family.activation]) != HF_ACTIVATIONS[family.activation],
    }
    for field, present in unsupported.items():
        if present:
            raise ModelBuildError(
                f"{path}: config.json sets {field} ({hf[field]!r}), which this builder does not implement"
            )
    try:
        heads = int(hf["num_attention_heads"])
        cfg = LlamaConfig(
            num_layers=int(hf["num_hidden_layers"]),
            hidden=int(hf["hidden_size"]),
            ffn=int(hf["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            vocab_size=int(hf["vocab_size"]),
            context_length=int(hf["max_position_embeddings"]),
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tied_embeddings=tied,
            head_dim=int(hf.get("head_dim") or 0),
            family=family.name,
            **(_window(hf, family, path) if gemma else {}),
            **_rope_scaling(hf, path),
        )
    except KeyError as exc:
        raise ModelBuildError(f"{path}: config.json lacks {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ModelBuildError(f"{path}: config.json has a value of the wrong type ({exc})") from None
    if cfg.head_dim % 2 or cfg.num_heads % cfg.num_kv_heads or min(cfg.num_layers, cfg.hidden, cfg.head_dim) < 1:
        raise ModelBuildError(f"{path}: config.json's sizes do not fit together (hidden, heads, kv heads)")
    return cfg
