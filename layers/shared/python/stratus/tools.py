"""Tool calling on chat completions, valid by construction, for models with or without a tool format.

A request's tools (stratus.contracts.Tools) become three things:

  the prompt    tool_chat(): a system message describing the functions and the one way to call
                them, and the history's tool turns in words (any chat template renders it: it
                holds only system, user and assistant turns of text);
  a grammar     grammar(): what the model may write (llguidance's Lark, JSON Schema inside), so a
                call always parses and its arguments always validate against the function's schema:
                  auto      text, or a call (JSON starting with "{")
                  required  one call or more (one with parallel_tool_calls false)
                  function  exactly one call of the named function
                  none      no grammar: text (the functions are not described either)
  the answer    calls(): the output text -> OpenAI's tool_calls; CallDeltas: the same as stream
                deltas while the text grows (each call's arguments in pieces, as OpenAI streams them)

The call format (compact JSON, properties in this order; llguidance keeps the schema's order):

  {"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}}, ...]}

Each call's `arguments` string is its JSON text exactly as generated, in a whole response and in
a stream alike.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from stratus.contracts import Tools

HEAD = '{"tool_calls":['
NAME = '{"name":'
ARGUMENTS = ',"arguments":'
COMPACT = {"whitespace_flexible": False}  # (llguidance's option: no spaces between JSON tokens)


# ---- the prompt ---------------------------------------------------------------------------------


def describe(tools: Tools) -> str:
    """The system message's words for these tools and this tool_choice."""
    listed = "\n".join(
        json.dumps(
            {"name": f["name"], "description": f.get("description", ""), "parameters": f["parameters"]},
            ensure_ascii=False,
        )
        for f in tools.functions
    )
    form = '{"tool_calls": [{"name": <function name>, "arguments": <its arguments as JSON>}]}'
    if tools.choice == "function":
        how = f'Call the function {tools.name} now: reply with only {{"tool_calls": [{{"name": "{tools.name}", "arguments": ...}}]}}.'
    elif tools.choice == "required":
        how = f"Call one of them now: reply with only {form}."
    else:
        how = f"To call functions, reply with only {form}. Otherwise, and once a function has returned, answer in text."
    many = "" if tools.parallel and tools.choice != "function" else " Make one call at a time."
    return f"You can call these functions (their arguments as JSON Schema):\n{listed}\n{how}{many}"


def tool_chat(messages: list[dict], tools: Tools | None) -> list[dict]:
    """A chat with tool turns -> one of system, user and assistant turns of text (see the module
    docstring): an assistant's tool_calls as "I called f({...}).", a tool's result as a user turn
    "f returned: ...", and (tools offered, tool_choice not none) the functions described in the
    system message. In words, not in the call format: a 135M model shown its own call in JSON
    before a result made the same call again; shown these, it answers from the result."""
    names = {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls") or ()}
    out = []
    for m in messages:
        if m["role"] == "tool":
            name = names.get(m.get("tool_call_id", ""), "the function")
            out.append({"role": "user", "content": f"{name} returned: {m['content']}"})
        elif m.get("tool_calls"):
            said = " ".join(f"I called {c['function']['name']}({c['function']['arguments']})." for c in m["tool_calls"])
            out.append({"role": "assistant", "content": f"{m['content']}\n{said}" if m["content"] else said})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools is None or tools.choice == "none":
        return out
    words = describe(tools)
    if out and out[0]["role"] == "system":
        return [{"role": "system", "content": f"{out[0]['content']}\n\n{words}"}, *out[1:]]
    return [{"role": "system", "content": words}, *out]


# ---- the grammar --------------------------------------------------------------------------------


def call_schema(tools: Tools) -> dict:
    """The JSON Schema of a call: {"tool_calls": [one call or more]}."""
    chosen = [f for f in tools.functions if tools.choice != "function" or f["name"] == tools.name]
    one = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": closed(f["parameters"])},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in chosen
    ]
    calls = {"type": "array", "items": one[0] if len(one) == 1 else {"anyOf": one}, "minItems": 1}
    if not tools.parallel or tools.choice == "function":
        calls["maxItems"] = 1
    return {
        "x-guidance": COMPACT,
        "type": "object",
        "properties": {"tool_calls": calls},
        "required": ["tool_calls"],
        "additionalProperties": False,
    }


def closed(schema):
    """A schema whose objects that list their properties take no others, unless they say so (as
    OpenAI's strict mode asks): what it accepts, the schema accepts, and a small model does not
    wander into keys nobody declared."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) if k in NESTED else v for k, v in schema.items()}
    for k in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(schema.get(k), dict):
            out[k] = {name: closed(v) for name, v in schema[k].items()}
    if "properties" in schema and "additionalProperties" not in schema and "patternProperties" not in schema:
        out["additionalProperties"] = False
    return out


NESTED = ("items", "prefixItems", "anyOf", "oneOf", "allOf", "not", "additionalProperties", "if", "then", "else")


def grammar(tools: Tools | None) -> str:
    """The Lark grammar (llguidance's dialect) of what the model may write; "" for none."""
    if tools is None or tools.choice == "none":
        return ""
    call = "%json " + json.dumps(call_schema(tools), separators=(",", ":"), ensure_ascii=False)
    if tools.choice == "auto":  # text is anything that does not start with "{"
        return f"start: TEXT | call\nTEXT: /[^{{](?s:.)*/\ncall: {call}\n"
    return f"start: call\ncall: {call}\n"


def function_grammar(f: dict) -> str:
    """One function's arguments alone (to name the tool whose schema cannot be enforced)."""
    schema = {"x-guidance": COMPACT, **closed(f["parameters"])}
    return "start: %json " + json.dumps(schema, separators=(",", ":"), ensure_ascii=False) + "\n"


# ---- the answer ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # its JSON text so far
    complete: bool


def call_id(job_id: str, choice: int, index: int) -> str:
    """A call's id: the same for a job's whole response, its stream and its cache hits."""
    return "call_" + hashlib.sha256(f"{job_id}:{choice}:{index}".encode()).hexdigest()[:24]


def scan(text: str) -> list[Call]:
    """A prefix of the call format -> the calls begun so far (a call's name once it is whole)."""
    if not text.startswith(HEAD):
        return []
    out, i = [], len(HEAD)
    while text.startswith(NAME, i):
        end = _string_end(text, i + len(NAME))
        if end is None:
            break
        name = json.loads(text[i + len(NAME) : end])
        i = end
        if not text.startswith(ARGUMENTS, i):
            out.append(Call(name, "", False))
            break
        start = i + len(ARGUMENTS)
        end = _value_end(text, start)
        out.append(Call(name, text[start : len(text) if end is None else end], end is not None))
        if end is None:
            break
        i = end + 1  # the call's own "}"
        if not text.startswith(",", i):
            break
        i += 1
    return out


def calls(text: str, job_id: str, choice: int = 0) -> list[dict] | None:
    """A whole output -> OpenAI's tool_calls (its complete calls), or None when it is text."""
    done = [c for c in scan(text) if c.complete]
    if not text.startswith("{") or not done:
        return None
    return [
        {"id": call_id(job_id, choice, i), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for i, c in enumerate(done)
    ]


class CallDeltas:
    """Streamed text in, chat deltas out: {"content": ...} for a text answer, or tool_calls deltas
    (a call's id, type and name once, then its arguments in pieces) for calls."""

    def __init__(self, job_id: str) -> None:
        self.job_id, self.text, self.sent = job_id, "", []  # sent: arguments characters sent per call

    @property
    def calling(self) -> bool:
        return self.text.startswith("{")

    def push(self, piece: str) -> list[dict]:
        if not piece:
            return []
        self.text += piece
        if not self.calling:
            return [{"content": piece}]
        out = []
        for i, c in enumerate(scan(self.text)):
            if i == len(self.sent):  # a new call, its name whole
                self.sent.append(0)
                head = {
                    "id": call_id(self.job_id, 0, i),
                    "type": "function",
                    "function": {"name": c.name, "arguments": ""},
                }
                out.append({"tool_calls": [{"index": i, **head}]})
            if new := c.arguments[self.sent[i] :]:
                self.sent[i] = len(c.arguments)
                out.append({"tool_calls": [{"index": i, "function": {"arguments": new}}]})
        return out


def _string_end(text: str, i: int) -> int | None:
    """The index after the JSON string starting at text[i] ('"'), or None if it is not whole yet."""
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
            continue
        if text[j] == '"':
            return j + 1
        j += 1
    return None


def _value_end(text: str, i: int) -> int | None:
    """The index after the JSON value starting at text[i], or None if it is not whole yet (a bare
    number or literal is whole once a delimiter follows it)."""
    if i >= len(text):
        return None
    if text[i] == '"':
        return _string_end(text, i)
    if text[i] not in "{[":
        j = i
        while j < len(text) and text[j] not in ",}]":
            j += 1
        return j if j < len(text) else None
    depth, j = 0, i
    while j < len(text):
        ch = text[j]
        if ch == '"':
            end = _string_end(text, j)
            if end is None:
                return None
            j = end
            continue
        depth += ch in "{["
        depth -= ch in "}]"
        j += 1
        if depth == 0:
            return j
    return None
