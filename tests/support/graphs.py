"""Running a built graph directly in onnxruntime, and what its quantized linears hold."""

import numpy as np

from stratus_model.quant import dequantize_nbits, to_nbits
from stratus_model.source import SourceTensor

PROMPT = [1, 50, 60, 70, 80, 90, 100, 110]


def empty_past(cfg, batch):
    return {f"past_key_values.{i}.{k}": np.zeros((batch, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)
            for i in range(cfg.num_layers) for k in ("key", "value")}


def run(sess, ids, mask, positions, past):
    names = [o.name for o in sess.get_outputs()]
    out = sess.run(None, {"input_ids": np.asarray(ids, np.int64), "attention_mask": np.asarray(mask, np.int64),
                          "position_ids": np.asarray(positions, np.int64), **past})
    return out[0], {n.replace("present", "past_key_values"): v for n, v in zip(names[1:], out[1:])}


def quantized_weights(weights, bits):
    """What a quantized graph's linears hold: each weight through our block encoder and back."""
    out = dict(weights)
    for name, w in weights.items():
        if name.startswith("layers.") and w.ndim == 2:
            n = to_nbits(SourceTensor(name, "F32", w, w.shape), bits)
            out[name] = dequantize_nbits(n, *w.shape)
    return out
