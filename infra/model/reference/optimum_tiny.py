"""Tiny Hugging Face Optimum ONNX export of a randomly initialised Llama, plus PyTorch greedy reference tokens.

Builds a seeded 2-layer Llama (vocab 267, hidden 32, tied embeddings; small enough to commit), exports it with Optimum (task text-generation-with-past, fp32, single
model.onnx with inputs input_ids/attention_mask/position_ids/past_key_values.*), checks onnxruntime greedy == PyTorch
greedy and writes model.onnx, config.json, generation_config.json and reference.json. optimum-onnx needs transformers<4.58,
so run it in a throwaway venv outside the repo (torch 2.13.0 is the CPU wheel), with no hub access:
  python3 -m venv /tmp/optref && /tmp/optref/bin/pip install torch==2.13.0 "optimum-onnx[onnxruntime]==0.1.0" accelerate
  HF_HUB_OFFLINE=1 /tmp/optref/bin/python infra/model/reference/optimum_tiny.py --out tests/fixtures/optimum_tiny
"""

import argparse
import json
import os
import re
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

MAX_NEW_TOKENS = 12
PROMPT_LENGTHS = (5, 9, 3)


def pick_prompts(model):
    """For each length, the seeded random prompt (BOS + ids 3..266) whose greedy continuation has the
    largest smallest top-2 logit margin, at least 6 distinct tokens and no special ids 0/1/2, so a correct engine cannot flip a
    token by rounding."""
    rng = np.random.default_rng(0)
    prompts = []
    for length in PROMPT_LENGTHS:
        best = None
        for _ in range(200):
            cand = [1] + [int(x) for x in rng.integers(3, 267, length - 1)]
            tokens, margins = torch_greedy(model, cand)
            if min(tokens) < 3 or len(set(tokens)) < 6:  # varied, so a cache bug would show
                continue
            if best is None or min(margins) > best[0]:
                best = (min(margins), cand)
        prompts.append(best[1])
    return prompts


ONNX_DTYPES = {v: k for k, v in onnx.TensorProto.DataType.items()}


def build_model(intermediate_size):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=267,
        hidden_size=32,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def torch_greedy(model, prompt):
    ids = list(prompt)
    margins = []
    with torch.no_grad():
        for _ in range(MAX_NEW_TOKENS):
            logits = model(torch.tensor([ids], dtype=torch.long)).logits[0, -1]
            top2 = torch.topk(logits, 2).values
            margins.append(float(top2[0] - top2[1]))
            ids.append(int(torch.argmax(logits)))
    return ids[len(prompt) :], margins


def ort_greedy(session, config, prompt):
    n_layers = config.num_hidden_layers
    head_dim = config.hidden_size // config.num_attention_heads
    past = {}
    for i in range(n_layers):
        for kind in ("key", "value"):
            past[f"past_key_values.{i}.{kind}"] = np.zeros((1, config.num_key_value_heads, 0, head_dim), np.float32)
    out_names = [o.name for o in session.get_outputs()]
    ids = list(prompt)
    step_ids = list(prompt)
    all_logits = []
    for _ in range(MAX_NEW_TOKENS):
        past_len = len(ids) - len(step_ids)
        feed = {
            "input_ids": np.array([step_ids], np.int64),
            "attention_mask": np.ones((1, len(ids)), np.int64),
            "position_ids": np.arange(past_len, len(ids), dtype=np.int64)[None, :],
            **past,
        }
        outs = dict(zip(out_names, session.run(None, feed)))
        last = outs["logits"][0, -1]
        all_logits.append(last)
        for i in range(n_layers):
            for kind in ("key", "value"):
                past[f"past_key_values.{i}.{kind}"] = outs[f"present.{i}.{kind}"]
        nxt = int(np.argmax(last))
        ids.append(nxt)
        step_ids = [nxt]
    return ids[len(prompt) :], all_logits


def describe(values):
    res = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        res.append({"name": v.name, "dtype": ONNX_DTYPES[t.elem_type].lower(), "shape": dims})
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--intermediate-size", type=int, default=64)
    args = ap.parse_args()

    import optimum.version
    from optimum.exporters.onnx import main_export

    model = build_model(args.intermediate_size)
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "hf")
        onnx_dir = os.path.join(tmp, "onnx")
        model.save_pretrained(hf_dir, safe_serialization=True)
        main_export(
            hf_dir,
            output=onnx_dir,
            task="text-generation-with-past",
            device="cpu",
            dtype="fp32",
            local_files_only=True,
            library_name="transformers",
        )
        produced = sorted(os.listdir(onnx_dir))
        print("optimum produced:", produced)
        if "model.onnx" not in produced:
            raise SystemExit("no model.onnx in the Optimum export")
        extra = [f for f in produced if f.startswith("model.onnx_") or f.endswith(".onnx_data")]
        if extra:
            raise SystemExit(f"external data files present: {extra}")
        shutil.copy(os.path.join(onnx_dir, "model.onnx"), os.path.join(args.out, "model.onnx"))
        shutil.copy(os.path.join(hf_dir, "config.json"), os.path.join(args.out, "config.json"))
        for name in ("generation_config.json",):
            for d in (onnx_dir, hf_dir):
                if os.path.exists(os.path.join(d, name)):
                    shutil.copy(os.path.join(d, name), os.path.join(args.out, name))
                    break

    model_path = os.path.join(args.out, "model.onnx")
    proto = onnx.load(model_path)
    inputs = describe(proto.graph.input)
    outputs = describe(proto.graph.output)
    print("opset:", [(o.domain, o.version) for o in proto.opset_import])
    print("inputs:")
    for d in inputs:
        print("  ", d)
    print("outputs:")
    for d in outputs:
        print("  ", d)

    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    greedy, margins, min_margin = [], [], []
    ok = True
    prompts = pick_prompts(model)
    for prompt in prompts:
        toks, marg = torch_greedy(model, prompt)
        ort_toks, ort_logits = ort_greedy(session, model.config, prompt)
        # compare full-context torch logits at the same positions as the KV-cached ORT steps
        with torch.no_grad():
            full = model(torch.tensor([prompt + toks], dtype=torch.long)).logits[0].numpy()
        ref = full[len(prompt) - 1 : len(prompt) - 1 + MAX_NEW_TOKENS]
        max_diff = float(np.max(np.abs(ref - np.stack(ort_logits))))
        match = toks == ort_toks
        ok &= match
        print(
            f"prompt {prompt}: torch {toks} ort {ort_toks} match={match} "
            f"min_margin={min(marg):.4f} max|dlogit|={max_diff:.2e}"
        )
        greedy.append(toks)
        margins.append([round(m, 6) for m in marg])
        min_margin.append(round(min(marg), 6))
    if not ok:
        raise SystemExit("onnxruntime greedy differs from PyTorch greedy")

    ref = {
        "prompts": prompts,
        "greedy": greedy,
        "min_margin": min_margin,
        "margins": margins,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "optimum": optimum.version.__version__,
            "optimum_onnx": _dist_version("optimum-onnx"),
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
        "inputs": [d["name"] for d in inputs],
        "outputs": [d["name"] for d in outputs],
        "input_specs": inputs,
        "output_specs": outputs,
    }
    text = json.dumps(ref, indent=1)
    # keep each list of numbers (token ids, margins, shapes) on one line
    text = re.sub(r"\[[^\[\]{}]*\]", lambda m: json.dumps(json.loads(m.group(0))), text)
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        f.write(text + "\n")
    print("wrote", sorted(os.listdir(args.out)))


def _dist_version(name):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
