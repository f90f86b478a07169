"""Load a model directory once: onnxruntime session, tokenizer, chat template, generation config.

Accepts our own builds (manifest.json) and Optimum-style exports (config.json + tokenizer.json +
model.onnx); `kv_layout` says how the engine must manage the cache.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from stratus.errors import ModelLoadError

REQUIRED_FILES = ("model.onnx", "tokenizer.json")


@dataclass(frozen=True)
class ModelSpec:
    model_id: str
    digest: str | None
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    chat_template: str | None
    kv_layout: str | None  # "right_padded_gqa" for our builds; None for other exports


def read_spec(path: Path) -> ModelSpec:
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(
            f"model directory not found: {path} (build one with `stratus model build` or `make model`)"
        )
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise ModelLoadError(f"{path}: missing {', '.join(missing)}")
    cfg = _read_json(path / "config.json")
    gen = _read_json(path / "generation_config.json", {})
    manifest = _read_json(path / "manifest.json", {})
    template_file = path / "chat_template.jinja"
    template = template_file.read_text() if template_file.is_file() else None
    if not template:
        template = _read_json(path / "tokenizer_config.json", {}).get("chat_template")
    try:
        layers = cfg.get("num_layers", cfg.get("num_hidden_layers"))
        heads = cfg.get("num_heads", cfg.get("num_attention_heads"))
        hidden = cfg.get("hidden", cfg.get("hidden_size"))
        kv_heads = cfg.get("num_kv_heads", cfg.get("num_key_value_heads", heads))
        eos = gen.get("eos_token_ids", gen.get("eos_token_id", cfg.get("eos_token_id")))
        return ModelSpec(
            model_id=manifest.get("model_id", path.name),
            digest=manifest.get("digest"),
            num_layers=int(layers),
            num_kv_heads=int(kv_heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=int(cfg["vocab_size"]),
            context_length=int(
                gen.get("context_length", cfg.get("context_length", cfg.get("max_position_embeddings", 2048)))
            ),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [eos] if eos is not None else []),
            bos_token_id=gen.get("bos_token_id", cfg.get("bos_token_id")),
            chat_template=template,
            kv_layout=cfg.get("kv_layout"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{path}/config.json: cannot read the architecture ({exc!r})") from exc


def _read_json(path: Path, default=None) -> dict:
    if not path.is_file():
        if default is None:
            raise ModelLoadError(f"{path} is missing")
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: invalid JSON ({exc})") from exc


def pick_providers(requested: list[str] | None = None) -> list[str]:
    """CUDA when onnxruntime has it (onnxruntime-gpu on a GPU host), the CPU otherwise."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = requested or ["CUDAExecutionProvider", "CPUExecutionProvider"]
    chosen = [p for p in wanted if p in available]
    return chosen or ["CPUExecutionProvider"]


@dataclass
class LoadedModel:
    path: Path
    spec: ModelSpec
    threads: int
    providers: list[str]
    spin: bool = True
    graph: str = "model.onnx"  # which graph configuration of the directory (numerics.configurations)
    kernels: Path | None = None  # Stratus's kernels library (stratus_engine.kernels), for graphs that use it

    @cached_property
    def session(self):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # errors only: ORT warns about every overridable input (num_logits_to_keep)
        if not self.spin:  # idle intra-op threads sleep instead of spinning: the CPU is shared
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            if self.kernels:
                so.register_custom_ops_library(str(self.kernels))
            with reclaiming(self.path / "model.onnx.data"):
                return ort.InferenceSession(str(self.path / self.graph), so, providers=self.providers)
        except Exception as exc:  # onnxruntime's own exception types
            raise ModelLoadError(f"{self.path}/{self.graph}: onnxruntime cannot load it: {exc}") from exc

    @cached_property
    def kv_dtype(self) -> type:
        """np.float16 or np.float32: the type of the KV cache the graph reads (fp16 builds for CUDA)."""
        types = {i.name: i.type for i in self.session.get_inputs()}
        return np.float16 if types.get("past_key_values.0.key") == "tensor(float16)" else np.float32

    @cached_property
    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.path / "tokenizer.json"))


def load(
    path: Path | str,
    threads: int | None = None,
    providers: list[str] | None = None,
    *,
    spin: bool = True,
    graph: str = "model.onnx",
    kernels: Path | None = None,
) -> LoadedModel:
    """spin=False suits a process that shares its cores (a worker beside the local stack); kernels:
    the library a graph of Stratus's own ops needs (stratus_engine.kernels.library())."""
    path = Path(path)
    spec = read_spec(path)
    if not (path / graph).is_file():
        raise ModelLoadError(f"{path}: missing {graph}")
    model = LoadedModel(path, spec, threads or os.cpu_count() or 1, pick_providers(providers), spin, graph, kernels)
    _ = model.tokenizer  # load once, now, so errors surface at start-up: the tokenizer first, whose
    release_freed_memory()  # parse leaves ~270 MB freed (Gemma), given back before the session's peak
    _ = model.session
    release_freed_memory(path / "model.onnx.data")
    return model


@contextlib.contextmanager
def reclaiming(weights: Path, every_s: float = 0.02):
    """While the block runs, page out the weights file's mapping every `every_s` seconds.

    Building a session reads every weight once (onnxruntime prepacks the linears into buffers of
    its own) and the pages read stay mapped until the end: Gemma 3 270M int4 peaked at 684 MB
    (452 MB of its own + 231 MB of the file). Paged out as it goes, the file holds ~50 MB at a
    time (peak 504 MB, same load time). onnxruntime releases the GIL while it builds."""
    done = threading.Event()

    def loop() -> None:
        while not done.wait(every_s):
            release_freed_memory(weights)

    thread = threading.Thread(target=loop, name="reclaim-weights", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now (clean file pages are dropped, never lost)


def release_freed_memory(weights: Path | None = None) -> None:
    """Hand memory the process holds but does not use back to the OS. No-op off Linux/glibc.

    - the heap's free pages (glibc's malloc_trim): parsing Gemma's tokenizer.json (513k merges)
      takes ~330 MB and keeps ~60 MB;
    - the pages of the weights file onnxruntime maps: building the session reads all of it (to
      prepack the linears into its own buffers), but what it then reads in place is small and
      sparse (the embedding rows of the tokens seen, the rotary rows of the positions reached).
      Dropped, those pages come back one at a time as they are read (Gemma 3 270M int8: ~200 MB)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return
    if weights is None:
        return
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    target = str(Path(weights).resolve())
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            libc.madvise(start, end - start, MADV_PAGEOUT)  # (an old kernel says EINVAL: nothing lost)
