"""Render a model's chat template the way Hugging Face's apply_chat_template does."""

from __future__ import annotations

from functools import lru_cache

from stratus.errors import InvalidRequest

ROLES = ("system", "user", "assistant")


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template)


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True) -> str:
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
    return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt)
