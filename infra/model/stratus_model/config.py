"""The architecture facts the graph builder needs, independent of where weights come from."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LlamaConfig:
    num_layers: int
    hidden: int
    ffn: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    context_length: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tied_embeddings: bool = True
    head_dim: int = 0  # 0: hidden // num_heads; some families set their own (Gemma 3: 256 beside hidden 640)
    family: str = "llama"  # stratus_model.families: what the graph adds to the Llama blocks
    sliding_window: int = 0  # local layers attend to this many positions, their own included (0: none)
    global_every: int = 0  # with a window, every n-th layer attends to all (Gemma 3: 6, Gemma 2: 2; 0: none)
    rope_local_theta: float = 0.0  # local layers' RoPE base (0: rope_theta)
    rope_scale: float = 1.0  # linear RoPE scaling of the global layers: positions / rope_scale
    rope_freq_factors: tuple[float, ...] = ()  # Llama 3's RoPE scaling: frequency k divided by factor k
    attn_scale: float = 0.0  # scores = q.k * attn_scale (0: 1/sqrt(head_dim))
    attn_softcap: float = 0.0  # scores -> c * tanh(scores / c) (Gemma 2; 0: none)
    logit_softcap: float = 0.0  # logits -> c * tanh(logits / c) (Gemma 2; 0: none)

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.num_heads)

    def is_local(self, layer: int) -> bool:
        """Whether layer attends through the sliding window only.
        Gemma 3 (window 512, every 6th global): is_local(4) is True, is_local(5) False."""
        return self.sliding_window > 0 and not _is_global(layer, self.global_every)

    @property
    def q_hidden(self) -> int:
        """The query projection's width: num_heads x head_dim (hidden, unless head_dim is set apart)."""
        return self.num_heads * self.head_dim

    @property
    def kv_hidden(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_json(self) -> dict:
        return asdict(self)


def _is_global(layer: int, every: int) -> bool:
    return bool(every) and (layer + 1) % every == 0


def global_every_of(local: list[bool]) -> int | None:
    """One flag a layer (True: local) -> n when exactly every n-th layer is global (0: none is);
    None for any other pattern. [True] * 5 + [False] -> 6"""
    every = next((i + 1 for i, is_local in enumerate(local) if not is_local), 0)
    fits = all(is_local != _is_global(i, every) for i, is_local in enumerate(local))
    return every if fits else None


def llama3_freq_factors(
    head_dim: int, theta: float, factor: float, low: float, high: float, original_context: int
) -> tuple[float, ...]:
    """Llama 3's RoPE scaling as a divisor per frequency (what llama.cpp stores as rope_freqs.weight):
    1 for wavelengths under original_context / high, `factor` over original_context / low, and a
    smooth blend between. -> head_dim / 2 factors"""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = np.clip((original_context / wavelen - low) / (high - low), 0.0, 1.0)
    return tuple(float(f) for f in 1.0 / ((1 - smooth) / factor + smooth))
