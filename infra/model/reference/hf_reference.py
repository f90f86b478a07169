"""Reference outputs from Hugging Face transformers for a GGUF model (used to check Stratus's ONNX converter).

Loads the GGUF (dequantized to float32 by transformers), runs 5 fixed chat prompts with a manual
40-token greedy loop (no EOS stop), records top-5 logits of the first steps and some tokenizer cases.
Run it in a throwaway venv outside the repo (torch 2.13.0 is the CPU wheel), with no hub access:
  python3 -m venv /tmp/hfref && /tmp/hfref/bin/pip install torch==2.13.0 transformers gguf numpy accelerate
  HF_HUB_OFFLINE=1 /tmp/hfref/bin/python infra/model/reference/hf_reference.py --gguf MODEL.gguf --out tests/fixtures/hf_reference.json
"""

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

MAX_NEW_TOKENS = 40
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


def ids_list(x):
    """Normalise what apply_chat_template(tokenize=True) returns into a flat list of ints."""
    if hasattr(x, "keys") and "input_ids" in x:
        x = x["input_ids"]
    if hasattr(x, "tolist"):
        x = x.tolist()
    if x and isinstance(x[0], list):
        x = x[0]
    return [int(i) for i in x]


def greedy(model, prompt_ids):
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    out = model(input_ids=ids, use_cache=True)
    past = out.past_key_values
    logits = out.logits[0, -1]
    new_ids, top5, margins = [], [], []
    for step in range(MAX_NEW_TOKENS):
        two = torch.topk(logits, 2).values
        margins.append(round(float(two[0] - two[1]), 4))
        if step < TOP_STEPS:
            vals, idx = torch.topk(logits, TOP_K)
            top5.append([[int(i), round(float(v), 4)] for i, v in zip(idx, vals)])
        nxt = int(torch.argmax(logits))
        new_ids.append(nxt)
        if step + 1 == MAX_NEW_TOKENS:
            break
        out = model(input_ids=torch.tensor([[nxt]], dtype=torch.long), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1]
    return new_ids, top5, margins


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True, help="path to the .gguf file")
    ap.add_argument("--out", required=True, help="path of the JSON to write")
    args = ap.parse_args()

    gguf = os.path.abspath(args.gguf)
    d, name = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    # transformers >= 5 renamed torch_dtype to dtype; older versions only know torch_dtype.
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, **{dtype_kw: torch.float32})
    model.eval()

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

    result = {
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
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
