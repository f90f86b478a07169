"""A plain numpy Llama forward pass (Hugging Face semantics) to check the ONNX graph against; q/k/v
biases are added where the weights have them (Qwen 2)."""

from __future__ import annotations

import numpy as np

from stratus_model.config import LlamaConfig


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:  # [..., H] -> [..., H]
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rotate_half(x: np.ndarray) -> np.ndarray:  # [..., D] -> [..., D]
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:  # [N, S, D], [S] -> [N, S, D]
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = np.outer(pos, inv)
    cos = np.concatenate([np.cos(ang)] * 2, -1)
    sin = np.concatenate([np.sin(ang)] * 2, -1)
    return x * cos + rotate_half(x) * sin


def forward(w: dict[str, np.ndarray], cfg: LlamaConfig, ids: list[int]) -> np.ndarray:
    """ids [S] -> logits [S, vocab], float64, causal attention over the whole sequence."""
    x = w["embed"][ids].astype(np.float64)
    s, hd, g = len(ids), cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    pos = np.arange(s)
    mask = np.triu(np.full((s, s), -np.inf), 1)
    for i in range(cfg.num_layers):
        h = rms_norm(x, w[f"layers.{i}.attn_norm"], cfg.rms_eps)
        proj = {n: h @ w[f"layers.{i}.{n}"].T + w.get(f"layers.{i}.{n}_bias", 0.0) for n in "qkv"}  # (Qwen 2: biases)
        q = proj["q"].reshape(s, cfg.num_heads, hd).transpose(1, 0, 2)
        k = proj["k"].reshape(s, cfg.num_kv_heads, hd).transpose(1, 0, 2)
        v = proj["v"].reshape(s, cfg.num_kv_heads, hd).transpose(1, 0, 2)
        if f"layers.{i}.q_norm" in w:  # (Qwen 3: per-head RMSNorm before RoPE)
            q, k = rms_norm(q, w[f"layers.{i}.q_norm"], cfg.rms_eps), rms_norm(k, w[f"layers.{i}.k_norm"], cfg.rms_eps)
        q, k = rope(q, pos, cfg.rope_theta), rope(k, pos, cfg.rope_theta)
        k, v = np.repeat(k, g, axis=0), np.repeat(v, g, axis=0)
        att = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = (att @ v).transpose(1, 0, 2).reshape(s, cfg.num_heads * hd)
        x = x + o @ w[f"layers.{i}.o"].T
        h = rms_norm(x, w[f"layers.{i}.mlp_norm"], cfg.rms_eps)
        gate = h @ w[f"layers.{i}.gate"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ w[f"layers.{i}.up"].T)) @ w[f"layers.{i}.down"].T
    x = rms_norm(x, w["final_norm"], cfg.rms_eps)
    return x @ w.get("lm_head", w["embed"]).T
