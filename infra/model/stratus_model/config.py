"""The architecture facts the graph builder needs, independent of where weights come from."""

from __future__ import annotations

from dataclasses import asdict, dataclass


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

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.num_heads)

    @property
    def q_hidden(self) -> int:
        """The query projection's width: num_heads x head_dim (hidden, unless head_dim is set apart)."""
        return self.num_heads * self.head_dim

    @property
    def kv_hidden(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_json(self) -> dict:
        return asdict(self)
