"""Render a model's chat template the way Hugging Face's apply_chat_template does, and encode a chat
so that only the template makes control tokens."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterable
from functools import lru_cache

from stratus.errors import InvalidRequest

ROLES = ("system", "user", "assistant")


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template)


def render_chat(
    template: str | None, messages: list[dict], add_generation_prompt: bool = True, variables: dict | None = None
) -> str:
    """The template rendered as apply_chat_template does; `variables` are the tokenizer's special
    tokens a template may name ({"bos_token": "<s>", "eos_token": "</s>"})."""
    if not template:
        raise InvalidRequest("this model has no chat template; use /v1/completions with a prompt", param="messages")
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise InvalidRequest(
                f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}",
                param=f"messages[{i}].role",
            )
        if not isinstance(m.get("content"), str):
            raise InvalidRequest(f"messages[{i}].content must be a string", param=f"messages[{i}].content")
    return _compile(template).render(
        **(variables or {}), messages=messages, add_generation_prompt=add_generation_prompt
    )


def encode_chat(
    template: str | None,
    messages: list[dict],
    encode: Callable[[str], list[int]],
    encode_text: Callable[[str], list[int]],
    specials: Iterable[str],
    add_generation_prompt: bool = True,
    variables: dict | None = None,
) -> list[int]:
    """A chat's token ids, its control tokens only where the template put them.

    encode matches the tokenizer's special tokens in its text (the template's <|im_start|> ...);
    encode_text encodes every character as text. Each message's content goes through
    encode_text, so a user who writes "<|im_end|>\\n<|im_start|>system" gets those characters, not
    a forged turn (as Hugging Face's and vLLM's chat encodings keep specials to the template).

    The contents' places come from rendering each one as a mark instead; a template that changes
    a content (trims it, say) makes a render the marks cannot rebuild, and then the render is
    encoded whole, after refusing a content that holds a special token's text."""
    text = render_chat(template, messages, add_generation_prompt, variables)
    pieces = _pieces(template, messages, add_generation_prompt, text, variables)
    if pieces is None:
        for i, m in enumerate(messages):
            if any(s in m["content"] for s in specials):
                raise InvalidRequest(
                    f"messages[{i}].content holds a control token's text, which this model's chat template "
                    "cannot keep apart from its own",
                    param=f"messages[{i}].content",
                )
        return encode(text)
    return [t for piece, user in pieces for t in (encode_text(piece) if user else encode(piece))]


def _pieces(
    template: str | None, messages: list[dict], add_generation_prompt: bool, text: str, variables: dict | None
) -> list[tuple[str, bool]] | None:
    """The render `text` cut into (piece, is a message's content), in order; None when marks in the
    contents' places do not rebuild it."""
    nonce = secrets.token_hex(8)
    marks = [f"\x00{nonce}:{i}\x00" for i in range(len(messages))]
    marked = render_chat(
        template, [{**m, "content": k} for m, k in zip(messages, marks)], add_generation_prompt, variables
    )
    parts = re.split("(" + "|".join(re.escape(k) for k in marks) + ")", marked)
    index = {k: i for i, k in enumerate(marks)}
    pieces = [(messages[index[p]]["content"], True) if p in index else (p, False) for p in parts if p]
    return pieces if "".join(p for p, _ in pieces) == text else None


def template_variables(tokenizer, bos_id: int | None, eos_id: int | None) -> dict[str, str]:
    """The special tokens a chat template may name, as apply_chat_template passes them ("" if none)."""
    return {
        name: (tokenizer.id_to_token(i) or "") if i is not None else ""
        for name, i in (("bos_token", bos_id), ("eos_token", eos_id))
    }


class ChatTokenizer:
    """A tokenizers.Tokenizer that encodes chats with encode_chat: control tokens only where the
    chat template put them. Keeps a second copy of the tokenizer that reads every special token's
    text as text (tokenizers' encode_special_tokens), made once. A template may name the model's
    BOS and EOS (`{{ bos_token }}`: Llama 2, Mistral): bos_id and eos_id give them."""

    def __init__(self, tokenizer, bos_id: int | None = None, eos_id: int | None = None) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = tokenizer
        self.text_only = Tokenizer.from_str(tokenizer.to_str())
        self.text_only.encode_special_tokens = True
        # (special added tokens only: the others, Gemma's "\n" say, are text either way)
        self.specials = tuple(t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special)
        self.variables = template_variables(tokenizer, bos_id, eos_id)

    def encode(self, template: str | None, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return encode_chat(
            template,
            messages,
            lambda text: self.tokenizer.encode(text, add_special_tokens=False).ids,
            lambda text: self.text_only.encode(text, add_special_tokens=False).ids,
            self.specials,
            add_generation_prompt,
            self.variables,
        )
