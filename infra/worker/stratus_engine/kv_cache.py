"""How the engine keeps each row's attention cache between steps. Two layouts, one interface:

  InPlaceCache   our builds (GroupQueryAttention): one buffer per layer, [max_batch, kv, capacity,
                 head_dim], on the model's device, bound as both past and present so the graph
                 writes new entries in place.
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
    def prefill(
        self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, start: int, keep: int = 0
    ) -> np.ndarray: ...
    def decode(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray: ...
    def move_row(self, src: int, dst: int, length: int) -> None: ...
    def copy_row(self, src: int, dst: int) -> None: ...  # dst: the next free row (n > 1 siblings)
    def truncate(self, rows: int) -> None: ...


def _kv_names(model: LoadedModel) -> list[tuple[str, str]]:
    return [
        (f"past_key_values.{i}.{k}", f"present.{i}.{k}") for i in range(model.spec.num_layers) for k in ("key", "value")
    ]


class _DeviceCopy:
    """Copies between cache buffers where they live (host or GPU), through two tiny graphs.

    onnxruntime's Python API has no device-to-device copy; an Identity (row move) and a Pad (grow)
    run by the model's own execution providers do it, with inputs and outputs bound by pointer.
    """

    def __init__(self, providers: list[str], dtype: type = np.float32) -> None:
        from onnx import TensorProto, helper
        from onnx.helper import np_dtype_to_tensor_dtype

        self.dtype = dtype
        elem = np_dtype_to_tensor_dtype(np.dtype(dtype))

        def session(node, extra_inputs=()):
            x = helper.make_tensor_value_info("x", elem, ["a", "b", "c", "d"])
            y = helper.make_tensor_value_info("y", elem, ["e", "f", "g", "h"])
            graph = helper.make_graph([node], "copy", [x, *extra_inputs], [y])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
            model.ir_version = 9
            return ort.InferenceSession(model.SerializeToString(), providers=providers)

        self.identity = session(helper.make_node("Identity", ["x"], ["y"]))
        pads = helper.make_tensor_value_info("pads", TensorProto.INT64, [8])
        self.pad = session(helper.make_node("Pad", ["x", "pads"], ["y"]), [pads])
        ends = helper.make_tensor_value_info("ends", TensorProto.INT64, [1])
        starts = helper.make_tensor("starts", TensorProto.INT64, [1], [0])
        axes = helper.make_tensor("axes", TensorProto.INT64, [1], [2])
        node = helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"])
        x = helper.make_tensor_value_info("x", elem, ["a", "b", "c", "d"])
        y = helper.make_tensor_value_info("y", elem, ["e", "f", "g", "h"])
        graph = helper.make_graph([node], "take", [x, ends], [y], initializer=[starts, axes])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 9
        self.slice = ort.InferenceSession(model.SerializeToString(), providers=providers)

    def _run(self, sess, device, src, src_shape, dst, dst_shape, pads=None, ends=None) -> None:
        io = sess.io_binding()
        io.bind_input("x", device, 0, self.dtype, list(src_shape), src)
        if pads is not None:
            io.bind_cpu_input("pads", pads)
        if ends is not None:
            io.bind_cpu_input("ends", ends)
        io.bind_output("y", device, 0, self.dtype, list(dst_shape), dst)
        sess.run_with_iobinding(io)

    def copy(self, device: str, src: int, dst: int, shape: tuple[int, ...]) -> None:
        self._run(self.identity, device, src, shape, dst, shape)

    def take(self, device: str, src: int, shape: tuple[int, ...], dst: int, length: int) -> None:
        """[B, kv, cap, hd] at src -> its first `length` positions, [B, kv, length, hd] at dst."""
        self._run(
            self.slice,
            device,
            src,
            shape,
            dst,
            (shape[0], shape[1], length, shape[3]),
            ends=np.array([length], np.int64),
        )

    def grow(self, device: str, src: int, shape: tuple[int, ...], dst: int, capacity: int) -> None:
        """[B, kv, cap, hd] at src -> [B, kv, capacity, hd] at dst, zero-filled on the right of axis 2."""
        pads = np.array([0, 0, 0, 0, 0, 0, capacity - shape[2], 0], np.int64)
        self._run(self.pad, device, src, shape, dst, (shape[0], shape[1], capacity, shape[3]), pads)


class InPlaceCache:
    """Right-padded rows updated in place by GroupQueryAttention (or Stratus's GroupAttention, the same
    contract); grows x2 when a row needs room.

    The buffers live where the model runs (host memory, or the GPU under CUDA) and are bound by
    pointer, so a decode step moves no cache bytes on either device.
    """

    def __init__(self, model: LoadedModel, max_batch: int, capacity: int) -> None:
        s = model.spec
        self.session = model.session
        self.names = _kv_names(model)
        self.device = "cuda" if model.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.shape = (max_batch, s.num_kv_heads, capacity, s.head_dim)
        self.dtype = model.kv_dtype  # float16 in builds for CUDA, else float32
        self.buffers = [self._zeros(self.shape) for _ in self.names]
        self._copy = _DeviceCopy(model.providers, self.dtype)
        self._bindings: dict[tuple[int, int, int], object] = {}
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
            self._copy.copy(self.device, self._row_ptr(buf, src), self._row_ptr(buf, dst), (1,) + self.shape[1:])

    def copy_row(self, src: int, dst: int) -> None:
        self.move_row(src, dst, 0)  # every slot exists: the copy is the move

    # ---- prompt prefixes (prefix_cache.py) ---------------------------------------------------

    def save_prefix(self, row: int, length: int) -> list:
        """A copy of row `row`'s first `length` positions: one [1, kv, length, hd] tensor a buffer."""
        one = (1,) + self.shape[1:]
        out = []
        for buf in self.buffers:
            t = ort.OrtValue.ortvalue_from_shape_and_type(
                (1, self.shape[1], length, self.shape[3]), self.dtype, self.device, 0
            )
            self._copy.take(self.device, self._row_ptr(buf, row), one, t.data_ptr(), length)
            out.append(t)
        return out

    def load_prefix(self, tensors: list, row: int, room: int) -> None:
        """Write a saved prefix into row `row` (positions past it are zeroed); room: the positions
        the row will need (the buffers grow first, so the write lands in the final buffers)."""
        self._ensure(room)
        for t, buf in zip(tensors, self.buffers):
            shape = tuple(t.shape())
            self._copy.grow(self.device, t.data_ptr(), shape, self._row_ptr(buf, row), self.capacity)

    def prefill_after(self, row: int, ids: np.ndarray, past: int, keep: int = 1) -> np.ndarray:
        """Prefill `ids` [S] into row `row` after its first `past` positions (a loaded prefix, or
        the chunks before): attention covers them, positions continue from `past` -> logits of the
        last `keep` tokens [keep, V] (keep=0: all S)."""
        s = len(ids)
        self._ensure(past + s + 1)
        mask = np.ones((1, past + s), np.int64)
        positions = np.arange(past, past + s, dtype=np.int64)[None]
        return self._run(np.asarray([ids], np.int64), mask, positions, row, row + 1, keep)[0]

    def truncate(self, rows: int) -> None:
        pass  # slots past the live rows are simply unused

    def rows(self, index: int, start: int, stop: int) -> np.ndarray:
        """A host copy of buffer `index` rows [start, stop) (tests and debugging)."""
        return self.buffers[index].numpy()[start:stop]

    def _zeros(self, shape: tuple[int, ...]):
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.dtype), self.device, 0)

    def _row_ptr(self, buf, row: int) -> int:
        return buf.data_ptr() + row * int(np.prod(self.shape[1:])) * np.dtype(self.dtype).itemsize

    def _run(self, ids, mask, positions, start: int, stop: int, keep: int = 0) -> np.ndarray:
        io = self._binding(start, stop, keep)
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input("position_ids", positions)
        io.bind_output("logits")  # again each run: the binding keeps last run's logits, of another shape
        self.session.run_with_iobinding(io)
        return io.get_outputs()[0].numpy()

    def _binding(self, start: int, stop: int, keep: int):
        """One IOBinding per (rows, keep), reused: binding 60 cache tensors a step costs ~2 ms."""
        key = (start, stop, keep)
        io = self._bindings.get(key)
        if io is not None:
            return io
        io = self.session.io_binding()
        if keep and self._has_keep:  # an overridable initializer: bind_cpu_input cannot find it
            io.bind_ortvalue_input(KEEP, ort.OrtValue.ortvalue_from_numpy(np.array([keep], np.int64)))
        io.bind_output("logits")  # host memory, first, so it is get_outputs()[0]
        shape = [stop - start, *self.shape[1:]]
        for (past, present), buf in zip(self.names, self.buffers):  # same memory: updated in place
            ptr = self._row_ptr(buf, start)
            io.bind_input(past, self.device, 0, self.dtype, shape, ptr)
            io.bind_output(present, self.device, 0, self.dtype, shape, ptr)
        if len(self._bindings) > 256:  # prefill keys vary with prompt lengths
            self._bindings.clear()
        self._bindings[key] = io
        return io

    def _ensure(self, length: int) -> None:
        if length <= self.capacity:
            return
        cap = self.capacity
        while cap < length:
            cap *= 2
        grown = []
        for buf in self.buffers:
            new = ort.OrtValue.ortvalue_from_shape_and_type(
                (self.shape[0], self.shape[1], cap, self.shape[3]), self.dtype, self.device, 0
            )
            self._copy.grow(self.device, buf.data_ptr(), self.shape, new.data_ptr(), cap)
            grown.append(new)
        self.buffers, self.shape = grown, (self.shape[0], self.shape[1], cap, self.shape[3])
        self._bindings.clear()


class ConcatCache:
    """Cache returned by the graph each step (past + new); `valid` [n, P] marks real columns."""

    def __init__(self, model: LoadedModel, max_batch: int, capacity: int) -> None:
        s = model.spec
        self.session = model.session
        self.names = _kv_names(model)
        self.kv = (s.num_kv_heads, s.head_dim)
        self.dtype = model.kv_dtype
        self.past = [np.zeros((0, *self.kv[:1], 0, self.kv[1]), self.dtype) for _ in self.names]
        self.valid = np.zeros((0, 0), np.int64)
        outputs = [o.name for o in self.session.get_outputs()]
        self._logits_at = outputs.index("logits")
        self._present_at = [outputs.index(present) for _, present in self.names]
        self._wants_positions = "position_ids" in {i.name for i in self.session.get_inputs()}

    def prefill(self, ids, mask, positions, start, keep=0):  # exports have no KEEP: all logits
        if start != self.valid.shape[0]:
            raise RuntimeError(f"prefill must append after the {self.valid.shape[0]} live rows, got start {start}")
        m = ids.shape[0]
        empty = [np.zeros((m, self.kv[0], 0, self.kv[1]), self.dtype) for _ in self.names]
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

    def copy_row(self, src: int, dst: int) -> None:
        if dst != self.valid.shape[0]:
            raise RuntimeError(f"copy_row must append after the {self.valid.shape[0]} live rows, got {dst}")
        self.past = [np.concatenate([p, p[src : src + 1]]) for p in self.past]
        self.valid = np.concatenate([self.valid, self.valid[src : src + 1]])

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
