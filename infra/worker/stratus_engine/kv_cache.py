"""How the engine keeps each row's attention cache between steps. Two layouts, one interface:

  InPlaceCache   our builds (GroupQueryAttention): one buffer per layer, [max_batch, kv, capacity,
                 head_dim], bound as both past and present so the graph writes new entries in place.
                 Row b holds its first `length` positions (right-padded); nothing is copied a step.
  ConcatCache    standard-attention exports (Hugging Face Optimum): the graph returns past + new.
                 Rows share one width; a row's unused columns are masked out in `valid`.

Both run a prefill for new rows appended after rows [0, start) (logits for at least the last `keep`
positions; 0 = all), a decode step over all rows, and keep rows contiguous: `move_row(src, dst)` then `truncate(n)` when a row leaves.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import onnxruntime as ort

from stratus_engine.model_dir import LoadedModel


KEEP = "num_logits_to_keep"  # optional input of our builds: logits for the last k positions only


class KVCache(Protocol):
    def prefill(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, start: int,
                keep: int = 0) -> np.ndarray: ...
    def decode(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray: ...
    def move_row(self, src: int, dst: int, length: int) -> None: ...
    def truncate(self, rows: int) -> None: ...


def _kv_names(model: LoadedModel) -> list[tuple[str, str]]:
    return [(f"past_key_values.{i}.{k}", f"present.{i}.{k}") for i in range(model.spec.num_layers) for k in ("key", "value")]


class InPlaceCache:
    """Right-padded rows updated in place by GroupQueryAttention; grows x2 when a row needs room."""

    def __init__(self, model: LoadedModel, max_batch: int, capacity: int) -> None:
        s = model.spec
        self.session = model.session
        self.names = _kv_names(model)
        self.shape = (max_batch, s.num_kv_heads, capacity, s.head_dim)
        self.buffers = [np.zeros(self.shape, np.float32) for _ in self.names]
        self._views: dict[tuple[int, int], list] = {}
        self._has_keep = KEEP in {i.name for i in self.session.get_overridable_initializers()}

    @property
    def capacity(self) -> int:
        return self.shape[2]

    def prefill(self, ids, mask, positions, start, keep=0):  # [m, W] -> logits [m, keep or W, V]
        self._ensure(ids.shape[1] + 1)
        return self._run(ids, mask, positions, start, start + ids.shape[0], keep)

    def decode(self, ids, lengths):  # ids [n, 1], lengths [n] -> logits [n, 1, V]
        width = int(lengths.max()) + 1
        self._ensure(width)
        mask = (np.arange(width)[None, :] <= lengths[:, None]).astype(np.int64)
        return self._run(ids, mask, lengths[:, None].astype(np.int64), 0, ids.shape[0])

    def move_row(self, src: int, dst: int, length: int) -> None:
        for buf in self.buffers:
            buf[dst, :, :length] = buf[src, :, :length]

    def truncate(self, rows: int) -> None:
        pass  # slots past the live rows are simply unused

    def _run(self, ids, mask, positions, start: int, stop: int, keep: int = 0) -> np.ndarray:
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input("position_ids", positions)
        keep_value = np.array([keep], np.int64)  # alive until the run ends
        if keep and self._has_keep:  # an overridable initializer: bind_cpu_input cannot find it
            io.bind_ortvalue_input(KEEP, ort.OrtValue.ortvalue_from_numpy(keep_value))
        io.bind_output("logits")  # first, so it is get_outputs()[0]
        self._bind(io, start, stop)
        self.session.run_with_iobinding(io)
        return io.get_outputs()[0].numpy()

    def _ensure(self, length: int) -> None:
        if length <= self.capacity:
            return
        cap = self.capacity
        while cap < length:
            cap *= 2
        shape = self.shape[:2] + (cap,) + self.shape[3:]
        grown = []
        for buf in self.buffers:
            new = np.zeros(shape, np.float32)
            new[:, :, : self.capacity] = buf
            grown.append(new)
        self.buffers, self.shape, self._views = grown, shape, {}

    def _bind(self, io, start: int, stop: int) -> None:
        """Bind rows [start, stop) as both past and present for every layer."""
        views = self._views.get((start, stop))
        if views is None:
            views = [ort.OrtValue.ortvalue_from_numpy(buf[start:stop]) for buf in self.buffers]
            self._views[(start, stop)] = views
        for (past, present), ov in zip(self.names, views):
            io.bind_ortvalue_input(past, ov)
            io.bind_ortvalue_output(present, ov)


class ConcatCache:
    """Cache returned by the graph each step (past + new); `valid` [n, P] marks real columns."""

    def __init__(self, model: LoadedModel, max_batch: int, capacity: int) -> None:
        s = model.spec
        self.session = model.session
        self.names = _kv_names(model)
        self.kv = (s.num_kv_heads, s.head_dim)
        self.past = [np.zeros((0, *self.kv[:1], 0, self.kv[1]), np.float32) for _ in self.names]
        self.valid = np.zeros((0, 0), np.int64)
        outputs = [o.name for o in self.session.get_outputs()]
        self._logits_at = outputs.index("logits")
        self._present_at = [outputs.index(present) for _, present in self.names]
        self._wants_positions = "position_ids" in {i.name for i in self.session.get_inputs()}

    def prefill(self, ids, mask, positions, start, keep=0):  # exports have no KEEP: all logits
        if start != self.valid.shape[0]:
            raise RuntimeError(f"prefill must append after the {self.valid.shape[0]} live rows, got start {start}")
        m = ids.shape[0]
        empty = [np.zeros((m, self.kv[0], 0, self.kv[1]), np.float32) for _ in self.names]
        logits, presents = self._run(ids, mask, positions, empty)
        width = max(self.valid.shape[1], mask.shape[1])
        self.past = [np.concatenate([_pad(old, width), _pad(new, width)]) for old, new in zip(self.past, presents)]
        self.valid = np.concatenate([_pad(self.valid, width), _pad(mask, width)])
        return logits

    def decode(self, ids, lengths):
        mask = np.concatenate([self.valid, np.ones((ids.shape[0], 1), np.int64)], axis=1)
        logits, self.past = self._run(ids, mask, lengths[:, None].astype(np.int64), self.past)
        self.valid = mask
        keep = self.valid.any(axis=0)  # drop columns no live row uses any more
        if not keep.all():
            self.valid = self.valid[:, keep]
            self.past = [p[:, :, keep] for p in self.past]
        return logits

    def move_row(self, src: int, dst: int, length: int) -> None:
        for p in self.past:
            p[dst] = p[src]
        self.valid[dst] = self.valid[src]

    def truncate(self, rows: int) -> None:
        self.past = [p[:rows] for p in self.past]
        self.valid = self.valid[:rows]

    def _run(self, ids, mask, positions, past) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {"input_ids": ids, "attention_mask": mask}
        if self._wants_positions:
            feed["position_ids"] = positions
        feed.update({name: arr for (name, _), arr in zip(self.names, past)})
        out = self.session.run(None, feed)
        return out[self._logits_at], [out[i] for i in self._present_at]


def _pad(x: np.ndarray, width: int) -> np.ndarray:
    """Right-pad axis 2 (cache [n, kv, P, hd]) or axis 1 (mask [n, P]) with zeros to `width`."""
    axis = 2 if x.ndim == 4 else 1
    extra = width - x.shape[axis]
    if extra == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return np.pad(x, pad)


# model_dir kv_layout -> cache; anything else is a standard-attention export.
CACHES = {"right_padded_gqa": InPlaceCache}


def make_cache(model: LoadedModel, max_batch: int, capacity: int) -> KVCache:
    return CACHES.get(model.spec.kv_layout, ConcatCache)(model, max_batch, capacity)
