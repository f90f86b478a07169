"""Model families the graph builder implements, as small specs rather than branches in the builder.

A family names what differs between architectures that share the Llama graph (RMSNorm, rotary
attention with grouped KV heads, SwiGLU MLP): how GGUF stores its q/k rows, and which tensors it
adds. Families with other blocks (Gemma's extra norms and GeGLU, Phi's fused projections) are not
built yet and are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str  # GGUF general.architecture
    hf_types: tuple[str, ...]  # config.json model_type values it reads
    permute_qk: bool  # llama.cpp's converter interleaves q/k rows for Llama-style RoPE only
    qkv_bias: bool = False  # q, k and v projections carry biases (Qwen 2)
    qk_norm: bool = False  # q and k are RMS-normalized per head before RoPE (Qwen 3)


FAMILIES = {
    f.name: f
    for f in (
        Family("llama", hf_types=("llama", "mistral"), permute_qk=True),
        Family("qwen2", hf_types=("qwen2",), permute_qk=False, qkv_bias=True),
        Family("qwen3", hf_types=("qwen3",), permute_qk=False, qk_norm=True),
    )
}


def for_hf_type(model_type: str) -> Family | None:
    return next((f for f in FAMILIES.values() if model_type in f.hf_types), None)
