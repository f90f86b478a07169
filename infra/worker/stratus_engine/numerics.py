"""Golden outputs: the build records what the model must compute; a worker checks its own host
against them before it takes any job, and picks the fastest graph configuration that passes.

  build    reference graph (float32 compute of the same weights) -> for each golden prompt:
           greedy tokens and, at every generated position, the top-k log-probabilities
           (log-softmax: a shift of all logits, which changes no probability, is no error)
                                                                               -> manifest["golden"]
  start    for each configuration in the manifest, fastest first: feed each golden prompt and its
           tokens through prefill + one-row decode steps (the kernels serving uses) and compare
           -> the first that passes serves; none passes -> NumericsError, the worker never starts

A configuration passes when, at every golden position, (1) each recorded top-k log-probability is
within `max_logprob_error` of the reference and (2) the reference's token is its own top token, or
within 2 x max_logprob_error of it (a tie, which either side may break its own way). With (1)
alone a lucky host could pass; with (2) alone an unlucky but accurate one could fail.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from stratus.errors import ModelLoadError
from stratus_engine import kernels
from stratus_engine.kv_cache import make_cache
from stratus_engine.model_dir import LoadedModel, load, pick_providers, read_spec, release_freed_memory
from stratus_engine.prefill import prefill_last

GOLDEN_VERSION = 2  # 2: log-probabilities
TOP_K = 5
NEW_TOKENS = 16
# The default SmolLM2 prompt's first token is decided by 0.082 ("The" over "L"): errors below
# 0.03 cannot flip it. int8 activations measure 0.3-1.0 on SmolLM2, split activations ~0.005.
MAX_LOGPROB_ERROR = 0.03

# Fixed conversations (written for this project). The first uses the template's default system
# message, as a plain request does.
GOLDEN_CHATS: tuple[tuple[dict, ...], ...] = (
    ({"role": "user", "content": "What is the capital of France?"},),
    ({"role": "user", "content": "Compute 17 + 25 and then multiply the result by 3."},),
    (
        {"role": "system", "content": "You are a terse assistant who answers in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ),
    ({"role": "user", "content": "Write a short poem about the sea."},),
)


class NumericsError(ModelLoadError):
    """No configuration of the model computes the golden outputs on this host."""


@dataclass(frozen=True)
class Configuration:
    name: str
    graph: str  # file in the model directory
    note: str = ""
    kernels: bool = False  # the graph uses Stratus's own ops (stratus_engine.kernels)


DEFAULT_CONFIGURATIONS = (Configuration("default", "model.onnx"),)


def configurations(model_dir: Path) -> tuple[Configuration, ...]:
    """The manifest's configurations, fastest first (builds without them have one graph)."""
    manifest = _manifest(model_dir)
    listed = manifest.get("configurations")
    if not listed:
        return DEFAULT_CONFIGURATIONS
    return tuple(Configuration(c["name"], c["graph"], c.get("note", ""), bool(c.get("kernels"))) for c in listed)


# ---- running one case ---------------------------------------------------------------------------


def run_cases(
    model: LoadedModel, prompts: list[list[int]], steps: int, forced: list[list[int]] | None = None
) -> tuple[list[list[int]], list[np.ndarray]]:
    """Prefill the prompts (one batch, right-padded), then `steps - 1` decode steps over all rows
    -> (tokens per row, logits [steps, V] per row), as the engine runs them.

    Greedy unless `forced` gives each row's tokens to feed (teacher forcing: the reference's
    positions whatever this model would pick)."""
    cache = make_cache(model, len(prompts), max(map(len, prompts)) + steps + 1)
    last, lengths = prefill_last(cache, prompts, 0)
    step_logits = [last]  # [n, V] per step
    tokens: list[list[int]] = [[] for _ in prompts]
    for step in range(steps):
        chosen = step_logits[-1].argmax(-1) if forced is None else np.array([f[step] for f in forced])
        for b, tok in enumerate(chosen):
            tokens[b].append(int(tok))
        if step + 1 < steps:
            out = cache.decode(chosen.astype(np.int64)[:, None], lengths + step)  # [n, 1, V]
            step_logits.append(out[:, -1])
    logits = np.stack(step_logits, axis=1).astype(np.float32, copy=False)  # [n, steps, V]
    return tokens, list(logits)


def log_softmax(logits: np.ndarray) -> np.ndarray:  # [..., V] -> [..., V] float32
    x = logits.astype(np.float64)
    top = x.max(-1, keepdims=True)
    return (x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))).astype(np.float32)


def golden_prompts(model: LoadedModel) -> list[list[int]]:
    """The golden chats through the model's template, or (a base model) their last turns as text
    led by the tokenizer's own specials, as the engine encodes a completion."""
    from stratus.chat_template import render_chat, template_variables

    tok, spec = model.tokenizer, model.spec
    if not spec.chat_template:
        return [tok.encode(chat[-1]["content"], add_special_tokens=True).ids for chat in GOLDEN_CHATS]
    names = template_variables(tok, spec.bos_token_id, spec.eos_token_ids[0] if spec.eos_token_ids else None)
    texts = [render_chat(spec.chat_template, list(chat), variables=names) for chat in GOLDEN_CHATS]
    return [tok.encode(t, add_special_tokens=False).ids for t in texts]


def record(model: LoadedModel, reference: str, steps: int = NEW_TOKENS) -> dict:
    """Golden outputs of `model` (the reference graph): the manifest's "golden" section."""
    cases = []
    prompts = golden_prompts(model)
    for prompt, tokens, logits in zip(prompts, *run_cases(model, prompts, steps)):  # one batch: the
        logp = log_softmax(logits)  # reference is slow
        top = np.argsort(-logp, axis=-1, kind="stable")[:, :TOP_K]  # [steps, k]
        cases.append(
            {
                "prompt_ids": prompt,
                "tokens": tokens,
                "top_ids": top.tolist(),
                "top_logprobs": np.round(np.take_along_axis(logp, top, axis=-1), 5).tolist(),
            }
        )
    return {
        "version": GOLDEN_VERSION,
        "reference": reference,
        "host": host_description(model.providers),
        "max_logprob_error": MAX_LOGPROB_ERROR,
        "cases": cases,
    }


# ---- checking -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    configuration: str
    passed: bool
    max_logprob_error: float  # the largest |logprob - reference| over every recorded top-k entry
    worst: str  # where it was: "case 0, token 3"
    tokens_agree: int  # positions where the reference's token is this host's top token (or ties with it)
    positions: int
    seconds: float
    skipped: str = ""  # why this configuration was not tried here (its kernels library is missing)

    def line(self) -> str:
        if self.skipped:
            return f"{self.configuration:18s} skip  {self.skipped}"
        verdict = "pass" if self.passed else "FAIL"
        return (
            f"{self.configuration:18s} {verdict}  max logprob error {self.max_logprob_error:.4f} ({self.worst}), "
            f"top token {self.tokens_agree}/{self.positions}, {self.seconds:.1f}s"
        )


def check(model: LoadedModel, golden: dict, configuration: str = "default") -> Check:
    started = time.monotonic()
    tol = float(golden.get("max_logprob_error", MAX_LOGPROB_ERROR))
    worst, where, agree, total = 0.0, "-", 0, 0
    for c, case in enumerate(golden["cases"]):
        # one case at a time: one-row decode steps take the kernels a lone request takes
        _, (logits,) = run_cases(model, [case["prompt_ids"]], len(case["tokens"]), forced=[case["tokens"]])
        for step, (row, top_ids, ref, token) in enumerate(
            zip(logits, case["top_ids"], case["top_logprobs"], case["tokens"])
        ):
            logp = log_softmax(row)  # [V], a row at a time: all 16 of Gemma's 262k-wide rows in float64 took 180 MB
            got = logp[top_ids]
            err = np.where(np.isfinite(got), np.abs(got - np.asarray(ref, np.float32)), np.inf)  # [k]
            if err.max() > worst or where == "-":
                worst, where = float(err.max()), f"case {c}, token {step}"
            # the reference's token is this host's top token, or within 2 x tol of it (ties included)
            agree += int(logp[token] >= logp.max() - 2 * tol)
            total += 1
    return Check(configuration, worst <= tol and agree == total, worst, where, agree, total, time.monotonic() - started)


@dataclass(frozen=True)
class Verification:
    model: LoadedModel  # the configuration that serves
    configuration: str
    checks: tuple[Check, ...]
    host: str

    def report(self) -> str:
        return "\n".join([f"host: {self.host}", *(c.line() for c in self.checks), f"serving: {self.configuration}"])

    def as_dict(self) -> dict:
        return {"host": self.host, "configuration": self.configuration, "checks": [asdict(c) for c in self.checks]}


def read_golden(path: Path) -> dict | None:
    """The manifest's golden outputs; None for a foreign export (no manifest.json)."""
    manifest = _manifest(path)
    golden = manifest.get("golden")
    if manifest and not golden:
        raise ModelLoadError(
            f"{path}: built without golden outputs (manifest version "
            f"{manifest.get('manifest_version')}): rebuild it with `stratus model build` (or `make model`)"
        )
    if golden and golden.get("version") != GOLDEN_VERSION:
        raise ModelLoadError(
            f"{path}: golden outputs of version {golden.get('version')}, this worker reads "
            f"version {GOLDEN_VERSION}: rebuild the model with `stratus model build`"
        )
    return golden


def load_checked(
    path: Path,
    conf: Configuration,
    golden: dict | None,
    threads: int | None = None,
    providers: list[str] | None = None,
    *,
    spin: bool = True,
) -> tuple[LoadedModel, Check]:
    """Load one configuration and check it (a foreign export without golden outputs: unchecked).
    ModelLoadError, naming why, for a configuration whose kernels library is not here."""
    library = kernels.library() if conf.kernels else None
    if conf.kernels and library is None:
        raise ModelLoadError(f"{path}: configuration {conf.name} runs on Stratus's kernels: {kernels.missing()}")
    model = load(path, threads=threads, providers=providers, spin=spin, graph=conf.graph, kernels=library)
    if not golden:
        return model, Check(conf.name, True, 0.0, "no golden outputs recorded", 0, 0, 0.0)
    result = check(model, golden, conf.name)
    release_freed_memory()  # (the check's cache and logits)
    return model, result


def load_verified(
    path: Path | str,
    threads: int | None = None,
    providers: list[str] | None = None,
    *,
    spin: bool = True,
    only: str | None = None,
) -> Verification:
    """Load the fastest configuration of the model at `path` that computes its golden outputs here.

    Raises NumericsError (naming the host, the model and each configuration's disagreement) when
    none does. A foreign export (no manifest.json) loads its one graph unchecked."""
    path = Path(path)
    spec = read_spec(path)
    golden = read_golden(path)
    candidates = [c for c in configurations(path) if only in (None, c.name)]
    if not candidates:
        names = ", ".join(c.name for c in configurations(path))
        raise ModelLoadError(f"{path}: no configuration {only!r} (this model has: {names})")
    checks: list[Check] = []
    host = host_description(pick_providers(providers))
    for conf in candidates:
        if conf.kernels and kernels.library() is None:
            checks.append(Check(conf.name, False, float("inf"), "-", 0, 0, 0.0, skipped=kernels.missing()))
            continue
        model, result = load_checked(path, conf, golden, threads, providers, spin=spin)
        checks.append(result)
        if result.passed:
            return Verification(model, conf.name, tuple(checks), host)
        del model  # (before the next configuration loads: two sessions of the weights at once doubled the peak)
        gc.collect()
        release_freed_memory()
    lines = "; ".join(c.line() for c in checks)
    raise NumericsError(
        f"model {spec.model_id} ({path}) does not compute its golden outputs on this host, so this worker "
        f"will not serve it. Host: {host}. Tolerance "
        f"{golden.get('max_logprob_error', MAX_LOGPROB_ERROR)} (log-probability). Measured: {lines}"
    )


# ---- the host -----------------------------------------------------------------------------------

# What decides onnxruntime's kernels (MLAS picks AVX2, AVX-512 or AVX-512 VNNI code by CPUID).
CPU_FEATURES = (
    "AVX2",
    "FMA3",
    "AVX512F",
    "AVX512BW",
    "AVX512VL",
    "AVX512VNNI",
    "AVX512BF16",
    "AVX512FP16",
    "ASIMD",
    "ASIMDDP",
    "SVE",
)


def cpu_features() -> list[str]:
    """The SIMD features this process sees, by CPUID (numpy's runtime dispatch table): under an
    emulator (qemu-user -cpu EPYC-Milan) that is the emulated CPU, unlike /proc/cpuinfo."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as found
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as found
    return [f for f in CPU_FEATURES if found.get(f)]


def host_description(providers: list[str] | None = None) -> str:
    """'Intel(R) Xeon(R) ... (AVX2 AVX512F ... AVX512VNNI), 2 cores; CPUExecutionProvider' (or the GPU first)."""
    providers = providers or ["CPUExecutionProvider"]
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        name = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            name,
        )
    cpu = f"{name} ({' '.join(cpu_features()) or 'no listed SIMD features'}), {os.cpu_count()} cores"
    if providers[0] == "CUDAExecutionProvider":
        return f"{_gpu_name()}; {cpu}; CUDAExecutionProvider"
    return f"{cpu}; {providers[0]}"


def _gpu_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return "GPU " + out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "a GPU"
    except (OSError, subprocess.SubprocessError):
        return "a GPU"


def _manifest(path: Path) -> dict:
    f = Path(path) / "manifest.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{f}: invalid JSON ({exc})") from exc
