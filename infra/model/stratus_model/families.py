"""Model families the graph builder implements, as small specs rather than branches in the builder.

A family names what differs between architectures that share the Llama skeleton (RMSNorm, rotary
attention with grouped KV heads, a gated MLP): how GGUF stores its q/k rows, which tensors it adds,
its MLP's activation, and how Hugging Face names and stores what GGUF stores otherwise. Families
with other blocks (Phi 3's fused projections and partial rotary) are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    name: str  # GGUF general.architecture
    hf_types: tuple[str, ...]  # config.json model_type values it reads
    permute_qk: bool  # llama.cpp's converter interleaves q/k rows for Llama-style RoPE only
    qkv_bias: bool = False  # q, k and v projections carry biases (Qwen 2)
    qk_norm: bool = False  # q and k are RMS-normalized per head before RoPE (Qwen 3, Gemma 3)
    sandwich_norms: bool = False  # attention and MLP outputs are normalized too, before the residual (Gemma)
    embed_scale: bool = False  # embeddings are multiplied by sqrt(hidden) (Gemma)
    activation: str = "silu"  # the gated MLP's (graph.ACTIVATIONS): SwiGLU or GeGLU
    hf_norm_offset: float = 0.0  # Hugging Face stores norm weights w for (offset + w); GGUF the sum
    global_every: int = 0  # with a sliding window, every n-th layer is global (llama.cpp's fixed pattern)
    rope_local_theta: float = 0.0  # local layers' RoPE base where GGUF does not carry one (0: rope_theta)
    hf_names: dict[str, str] = field(default_factory=dict)  # canonical -> HF name where it differs


def _gemma_names(pre_mlp: str) -> dict[str, str]:
    """Gemma's four norms a layer: HF's post_attention_layernorm is the norm after attention (GGUF
    post_attention_norm), not the one before the MLP as in Llama."""
    layer = "model.layers.{i}."
    return {
        "layers.{i}.post_attn_norm": layer + "post_attention_layernorm.weight",
        "layers.{i}.mlp_norm": layer + pre_mlp,
        "layers.{i}.post_mlp_norm": layer + "post_feedforward_layernorm.weight",
    }


GEMMA = dict(
    permute_qk=False,
    sandwich_norms=True,
    embed_scale=True,
    activation="gelu_tanh",
    hf_norm_offset=1.0,
    hf_names=_gemma_names("pre_feedforward_layernorm.weight"),
)

FAMILIES = {
    f.name: f
    for f in (
        Family("llama", hf_types=("llama", "mistral"), permute_qk=True),
        Family("qwen2", hf_types=("qwen2",), permute_qk=False, qkv_bias=True),
        Family("qwen3", hf_types=("qwen3",), permute_qk=False, qk_norm=True),
        Family("gemma2", hf_types=("gemma2",), global_every=2, **GEMMA),
        Family("gemma3", hf_types=("gemma3_text",), qk_norm=True, global_every=6, rope_local_theta=10000.0, **GEMMA),
    )
}

# Architectures recognised and refused, with what is missing (a clearer error than "not supported").
REFUSED = {
    "phi3": "Phi 3's fused qkv and gate_up projections and partial rotary embedding are not built yet",
}


def for_hf_type(model_type: str) -> Family | None:
    return next((f for f in FAMILIES.values() if model_type in f.hf_types), None)
