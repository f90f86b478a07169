"""A plain numpy Llama forward pass (Hugging Face semantics) to check the ONNX graph against; q/k/v
biases are added where the weights have them (Qwen 2), and Gemma's pieces where its family has them
(scaled embeddings, norms after attention and the MLP, tanh GELU, sliding windows, soft-caps)."""

from __future__ import annotations

import numpy as np

from stratus_model.config import LlamaConfig
from stratus_model.families import FAMILIES


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:  # [..., H] -> [..., H]
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rotate_half(x: np.ndarray) -> np.ndarray:  # [..., D] -> [..., D]
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope(x: np.ndarray, pos: np.ndarray, theta: float, scale: float = 1.0, factors=()) -> np.ndarray:  # [N, S, D]
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d) / (np.asarray(factors) if len(factors) else 1.0)
    ang = np.outer(pos / scale, inv)
    cos = np.concatenate([np.cos(ang)] * 2, -1)
    sin = np.concatenate([np.sin(ang)] * 2, -1)
    return x * cos + rotate_half(x) * sin


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    return cap * np.tanh(x / cap) if cap else x


def forward(w: dict[str, np.ndarray], cfg: LlamaConfig, ids: list[int]) -> np.ndarray:
    """ids [S] -> logits [S, vocab], float64, causal attention over the whole sequence (local
    layers: over the last cfg.sliding_window positions, the query's own included)."""
    family = FAMILIES[cfg.family]
    act = gelu_tanh if family.activation == "gelu_tanh" else silu
    x = w["embed"][ids].astype(np.float64) * (np.sqrt(cfg.hidden) if family.embed_scale else 1.0)
    s, hd, g = len(ids), cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    pos = np.arange(s)
    causal = np.triu(np.full((s, s), -np.inf), 1)
    window = np.where(pos[:, None] - pos[None, :] >= (cfg.sliding_window or s + 1), -np.inf, 0.0)
    for i in range(cfg.num_layers):
        local = cfg.is_local(i)
        theta, scale, factors = (
            (cfg.rope_local_theta or cfg.rope_theta, 1.0, ())
            if local
            else (cfg.rope_theta, cfg.rope_scale, cfg.rope_freq_factors)
        )
        h = rms_norm(x, w[f"layers.{i}.attn_norm"], cfg.rms_eps)
        proj = {n: h @ w[f"layers.{i}.{n}"].T + w.get(f"layers.{i}.{n}_bias", 0.0) for n in "qkv"}  # (Qwen 2: biases)
        q = proj["q"].reshape(s, cfg.num_heads, hd).transpose(1, 0, 2)
        k = proj["k"].reshape(s, cfg.num_kv_heads, hd).transpose(1, 0, 2)
        v = proj["v"].reshape(s, cfg.num_kv_heads, hd).transpose(1, 0, 2)
        if f"layers.{i}.q_norm" in w:  # (Qwen 3, Gemma 3: per-head RMSNorm before RoPE)
            q, k = rms_norm(q, w[f"layers.{i}.q_norm"], cfg.rms_eps), rms_norm(k, w[f"layers.{i}.k_norm"], cfg.rms_eps)
        q, k = rope(q, pos, theta, scale, factors), rope(k, pos, theta, scale, factors)
        k, v = np.repeat(k, g, axis=0), np.repeat(v, g, axis=0)
        att = softcap(q @ k.transpose(0, 2, 1) * (cfg.attn_scale or hd**-0.5), cfg.attn_softcap)
        att = att + causal + (window if local else 0.0)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = (att @ v).transpose(1, 0, 2).reshape(s, cfg.num_heads * hd) @ w[f"layers.{i}.o"].T
        if f"layers.{i}.post_attn_norm" in w:  # (Gemma)
            o = rms_norm(o, w[f"layers.{i}.post_attn_norm"], cfg.rms_eps)
        x = x + o
        h = rms_norm(x, w[f"layers.{i}.mlp_norm"], cfg.rms_eps)
        m = (act(h @ w[f"layers.{i}.gate"].T) * (h @ w[f"layers.{i}.up"].T)) @ w[f"layers.{i}.down"].T
        if f"layers.{i}.post_mlp_norm" in w:
            m = rms_norm(m, w[f"layers.{i}.post_mlp_norm"], cfg.rms_eps)
        x = x + m
    x = rms_norm(x, w["final_norm"], cfg.rms_eps)
    return softcap(x @ w.get("lm_head", w["embed"]).T, cfg.logit_softcap)
