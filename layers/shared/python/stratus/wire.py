"""The OpenAI wire format in: request bodies as clients send them -> the internal contracts.

parse_request   an OpenAI chat or completion body -> InferenceRequest (InvalidRequest naming the field)
parse_json      JSON text -> value, refusing what no handler should walk (depth, huge integers, bad UTF-8)
stream_options  `stream` / `stream_options` -> StreamOptions or None
chat_message    one `messages[i]` -> {role, content}

The API, batch lines, requests-queue messages and the tokenizer routes all parse through here, so
one body means the same thing on every path. The types it produces live in stratus.contracts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from stratus import tools as tool_format
from stratus.contracts import MAX_CHOICES, InferenceRequest, Prompt, Tools
from stratus.errors import InvalidRequest, shown
from stratus.params import MAX_TOP_LOGPROBS, SamplingParams

# Fields of the OpenAI API the engine does not implement: a request that uses them gets a 400
# naming the field instead of a silently different answer. value -> is it harmless?
_UNSUPPORTED = {
    "stream": lambda v: v in (None, False),
    "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none"),
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: v in (None, ""),
    "audio": lambda v: not v,
    "modalities": lambda v: v in (None, ["text"]),
    "prediction": lambda v: not v,
    "web_search_options": lambda v: v is None,
}
_FUNCTIONS = "functions and function_call are OpenAI's older names: send tools and tool_choice"
_WHY = {
    "stream": "stream: true is for POST /v1/chat/completions and /v1/completions; batch lines, jobs and "
    "queue messages are answered whole (send stream: false or omit it)",
    "functions": _FUNCTIONS,
    "function_call": _FUNCTIONS,
    "audio": "this server's models read and write text only",
    "modalities": 'this server\'s models read and write text only (send ["text"] or omit it)',
    "web_search_options": "this server has no web search",
}


def _integral(value):
    """JSON has one number type: 160.0 is the integer 160 (JSON Schema agrees); 160.5 is not."""
    return int(value) if isinstance(value, float) and value.is_integer() and abs(value) < 2**63 else value


def _number(body: dict, name: str, default, kind=float):
    value = body.get(name)
    if value is None:
        return default
    if kind is int:
        value = _integral(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise InvalidRequest(
            f"{name} must be a{'n integer' if kind is int else ' number'}, got {shown(value)}", param=name
        )
    try:
        return kind(value)
    except OverflowError:  # an integer past float range (JSON integers have no bound)
        raise InvalidRequest(f"{name} is out of range, got {shown(value)}", param=name) from None


def flag(body: dict, name: str, default: bool = False) -> bool:
    """A true/false field (absent or null: `default`)."""
    value = body.get(name)
    if value is not None and not isinstance(value, bool):  # (0 == False in Python: not good enough)
        raise InvalidRequest(f"{name} must be true or false, got {shown(value)}", param=name)
    return default if value is None else value


MAX_METADATA = 16  # OpenAI's metadata: pairs, key and value lengths


def metadata_field(value) -> dict:
    """`metadata` (responses, batches): at most 16 string keys (64 characters) to strings (512)."""
    value = value or {}
    if (
        not isinstance(value, dict)
        or len(value) > MAX_METADATA
        or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in value.items()
        )
    ):
        raise InvalidRequest(
            f"metadata must map at most {MAX_METADATA} keys (64 characters) to strings (512)", param="metadata"
        )
    return value


MAX_JSON_DEPTH = 128  # arrays and objects within each other: far past any real request, far short of
# the recursion limit of the code that walks a parsed value


def parse_json(raw: str | bytes, what: str):
    """JSON text -> its value; InvalidRequest says which `what` ("the line", ...) is wrong and
    where: not JSON, not UTF-8, an integer too long to read, or nesting arrays and objects deeper
    than MAX_JSON_DEPTH."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{what} is not valid JSON (not UTF-8)") from exc
    except RecursionError:
        raise InvalidRequest(f"{what} nests arrays and objects more than {MAX_JSON_DEPTH} deep") from None
    except ValueError as exc:  # an integer past Python's 4,300 digits
        raise InvalidRequest(f"{what} is not valid JSON here: {exc}") from None
    level, depth = [value], 0
    while level := [v for v in level if isinstance(v, (dict, list))]:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(f"{what} nests arrays and objects more than {MAX_JSON_DEPTH} deep")
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v)]
    return value


def json_object(raw: str, what: str) -> dict:
    """Parse `raw` as a JSON object (parse_json's errors, or one saying it is not an object)."""
    value = parse_json(raw, what)
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must be a JSON object")
    return value


def require_unicode(value, what: str) -> None:
    """Every string in a parsed JSON value must be encodable text. JSON may spell a lone UTF-16
    surrogate ("\\ud800"), which no UTF-8 tokenizer, log line or S3 object can carry."""
    stack = [(value, what)]
    while stack:
        v, where = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidRequest(
                    f"{where} holds a lone UTF-16 surrogate at character {exc.start}: not valid Unicode text"
                ) from None
        elif isinstance(v, dict):
            stack.extend(
                (item, f"{where}.{k}" if isinstance(k, str) and k.isidentifier() else where) for k, item in v.items()
            )
            stack.extend((k, f"{where} (a key)") for k in v)
        elif isinstance(v, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(v))


# Routes the API, batch lines and request messages accept: URL path -> route
ROUTE_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}


def parse_request(
    route: str, body: dict, *, max_messages: int, max_tokens_limit: int, streaming: bool = False
) -> InferenceRequest:
    """An OpenAI request body -> InferenceRequest; raises InvalidRequest naming the field.
    streaming: the caller can stream (the API's completion routes): `stream` is not refused here
    (stream_options() reads it; it is not part of the request, so it never changes the cache key)."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    require_unicode(body, "the request body")
    stream_options(body)  # its shape, on every route (stream itself is refused below where nothing streams)
    for name, ok in _UNSUPPORTED.items():
        if name == "stream" and streaming:
            continue
        if name in body and not ok(body[name]):
            raise InvalidRequest(_WHY.get(name, f"{name}={body[name]!r} is not supported by this server"), param=name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model is required (see GET /v1/models)", param="model")
    messages: tuple[dict, ...] = ()
    prompt = ""
    tools = tools_field(body) if route == "chat" else None
    if route != "chat" and any(body.get(k) not in (None, [], "none") for k in ("tools", "tool_choice")):
        raise InvalidRequest("tools are for /v1/chat/completions", param="tools")
    if route == "chat":
        raw = body.get("messages")
        if not isinstance(raw, list) or not raw:
            raise InvalidRequest("messages must be a non-empty list", param="messages")
        if len(raw) > max_messages:
            raise InvalidRequest(f"messages must have at most {max_messages} entries, got {len(raw)}", param="messages")
        messages = tuple(chat_message(i, m) for i, m in enumerate(raw))
    else:
        prompt = _prompt_field(body.get("prompt"))
    logprobs, echo = _logprobs_fields(route, body)
    least = 0 if echo else 1  # echo with max_tokens 0 scores the prompt and generates nothing
    for name in ("max_tokens", "max_completion_tokens"):  # each is checked; the newer name wins
        value = _integral(body.get(name))
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or not least <= value <= max_tokens_limit
        ):
            raise InvalidRequest(
                f"{name} must be an integer in [{least}, {max_tokens_limit}], got {value!r}", param=name
            )
    max_tokens = _integral(body.get("max_completion_tokens"))
    max_tokens = _integral(body.get("max_tokens")) if max_tokens is None else max_tokens
    max_tokens = 256 if max_tokens is None else max_tokens
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, (str, list)):
        raise InvalidRequest(f"stop must be a string or a list of strings, got {type(stop).__name__}", param="stop")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0),
        top_p=_number(body, "top_p", 1.0),
        top_k=_number(body, "top_k", 0, int),
        repetition_penalty=_number(body, "repetition_penalty", 1.0),
        seed=_number(body, "seed", None, int),
        presence_penalty=_number(body, "presence_penalty", 0.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0),
        logit_bias=_logit_bias_field(body.get("logit_bias")),
        n=_number(body, "n", 1, int),
        logprobs=logprobs,
        echo=echo,
        json_schema=_response_format(body.get("response_format")),
        grammar=tool_format.grammar(tools),
        ignore_eos=flag(body, "ignore_eos"),
        min_tokens=_number(body, "min_tokens", 0, int),
        stop=()
        if stop is None
        else (stop,)
        if isinstance(stop, str)
        else tuple(stop)
        if isinstance(stop, list)
        else stop,
    )
    if params.grammar and params.json_schema:
        raise InvalidRequest(
            "response_format cannot be combined with tools (send tool_choice: none, or describe the answer "
            "as a function)",
            param="response_format",
        )
    request = InferenceRequest(route, model, params, messages, prompt, tools)
    if request.choices > MAX_CHOICES:
        raise InvalidRequest(
            f"a request gives at most {MAX_CHOICES} choices (prompts x n), got {request.choices}", param="n"
        )
    if (entries := result_entries(request)) > MAX_RESULT_ENTRIES:
        raise InvalidRequest(
            f"a result holds at most {MAX_RESULT_ENTRIES:,} tokens and log-probability alternatives (choices x "
            f"max_tokens x (1 + logprobs)); this request could make {entries:,}: lower n, max_tokens or logprobs",
            param="logprobs" if logprobs else "max_tokens",
        )
    if streaming and body.get("stream") and (request.choices > 1 or echo):
        raise InvalidRequest(
            "stream: true serves one choice without echo; send n: 1 and one prompt, or stream: false",
            param="n" if request.choices > 1 else "echo",
        )
    return request


# A result's token entries: each generated token, and each of its log-probability alternatives, is
# ~50 bytes of JSON in the result a worker writes and an API function reads whole (~10 MB at most).
MAX_RESULT_ENTRIES = 200_000


def result_entries(request: InferenceRequest) -> int:
    """The most token entries a request's result can hold: choices x (max_tokens + the prompt ids
    it echoes) x (1 + logprobs alternatives)."""
    p = request.params
    echoed = request.prompt_token_ids if p.echo else 0
    return request.choices * (p.max_tokens + echoed) * (1 + (p.logprobs or 0))


MAX_SCHEMA_BYTES = 32_768  # a response_format schema, as compact JSON


def _response_format(value) -> str:
    """response_format -> the JSON schema the output must match, as compact JSON ("" for text).
    {"type": "json_object"}: any JSON object; {"type": "json_schema", "json_schema": {"name",
    "schema", "strict"}}: that schema (compiled by the worker, which refuses one it cannot enforce)."""
    if value is None or value == {"type": "text"}:
        return ""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        return json.dumps({"type": "object"}, separators=(",", ":"))
    if kind != "json_schema" or not isinstance(value.get("json_schema"), dict):
        raise InvalidRequest(
            'response_format must be {"type": "text"}, {"type": "json_object"} or {"type": '
            '"json_schema", "json_schema": {"name": ..., "schema": {...}}}',
            param="response_format",
        )
    schema = value["json_schema"].get("schema", {})
    if not isinstance(schema, dict):
        raise InvalidRequest("response_format.json_schema.schema must be a JSON Schema object", param="response_format")
    text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)  # key order kept: it orders the output
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise InvalidRequest(
            f"response_format's schema must be at most {MAX_SCHEMA_BYTES} bytes as JSON", param="response_format"
        )
    return text


def _prompt_field(value) -> str | tuple[Prompt, ...]:
    """A string, token ids, or a list of either -> one string or a tuple of prompts."""
    what = "prompt must be a non-empty string, a list of token ids, or a list of those"
    if isinstance(value, list) and value and all(_token_id(t) for t in value):
        return (tuple(int(t) for t in value),)
    items = value if isinstance(value, list) else [value]
    if not items or len(items) > MAX_CHOICES:
        raise InvalidRequest(f"{what} (1 to {MAX_CHOICES} prompts)", param="prompt")
    out: list[Prompt] = []
    for p in items:
        if isinstance(p, str) and p:
            out.append(p)
        elif isinstance(p, list) and p and all(_token_id(t) for t in p):
            out.append(tuple(int(t) for t in p))
        else:
            raise InvalidRequest(what, param="prompt")
    return out[0] if len(out) == 1 and isinstance(out[0], str) else tuple(out)


def _token_id(t) -> bool:
    t = _integral(t)
    return isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31


def _logprobs_fields(route: str, body: dict) -> tuple[int | None, bool]:
    """-> (logprobs: None or how many alternatives per token, echo). Chat: logprobs true/false with
    top_logprobs 0-20; completions: logprobs 0-20 and echo."""
    logprobs, top = body.get("logprobs"), _integral(body.get("top_logprobs"))
    if route == "chat":
        if logprobs is not None and not isinstance(logprobs, bool):
            raise InvalidRequest(f"logprobs must be true or false, got {logprobs!r}", param="logprobs")
        if top is not None and not logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        if (
            logprobs
            and top is not None
            and (not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS)
        ):
            raise InvalidRequest(
                f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top!r}", param="top_logprobs"
            )
        if body.get("echo") not in (None, False):
            raise InvalidRequest("echo is for /v1/completions", param="echo")
        return ((top or 0) if logprobs else None), False
    if top is not None:
        raise InvalidRequest(
            "top_logprobs is for /v1/chat/completions; on /v1/completions logprobs is the number of alternatives",
            param="top_logprobs",
        )
    logprobs = _integral(logprobs)
    if logprobs is not None and (
        not isinstance(logprobs, int) or isinstance(logprobs, bool) or not 0 <= logprobs <= MAX_TOP_LOGPROBS
    ):
        raise InvalidRequest(
            f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {logprobs!r}", param="logprobs"
        )
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise InvalidRequest(f"echo must be true or false, got {echo!r}", param="echo")
    return logprobs, bool(echo)


@dataclass(frozen=True)
class StreamOptions:
    include_usage: bool = False  # a last chunk with `choices: []` and the usage
    continuous_usage: bool = False  # (with include_usage) every chunk carries the usage so far, as vLLM's does


STREAM_FLAGS = ("include_usage", "continuous_usage_stats", "include_obfuscation")


def stream_options(body: dict) -> StreamOptions | None:
    """None for a whole response; StreamOptions for `stream: true` (InvalidRequest naming the field)."""
    stream, options = body.get("stream"), body.get("stream_options")
    if stream is not None and not isinstance(stream, bool):  # (0 == False in Python: not good enough)
        raise InvalidRequest(f"stream must be true or false, got {stream!r}", param="stream")
    flags = {}
    if options is not None:  # checked whether or not it streams; ignored when it does not
        flags = options if isinstance(options, dict) else {None: None}
        if set(flags) - set(STREAM_FLAGS) or not all(isinstance(v, bool) for v in flags.values()):
            raise InvalidRequest(
                'stream_options must be {"include_usage": true|false, "continuous_usage_stats": true|false}',
                param="stream_options",
            )
    usage = flags.get("include_usage", False)
    return StreamOptions(usage, usage and flags.get("continuous_usage_stats", False)) if stream else None


def _logit_bias_field(value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(b, (int, float)) and not isinstance(b, bool) for b in value.values()
    ):
        raise InvalidRequest("logit_bias must be an object of token ids to numbers in [-100, 100]", param="logit_bias")
    return value


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
# (developer: newer SDKs' name for system)


def chat_message(i: int, m) -> dict:
    """messages[i] -> {role, content: str}; an assistant's turn may add its tool_calls
    ([{id, type, function: {name, arguments}}]: content null allowed), a tool's turn its
    tool_call_id (InvalidRequest naming the field)."""
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise InvalidRequest(f"{where} must be an object", param=where)
    role, content = m.get("role"), m.get("content")
    if not isinstance(role, str) or role not in ROLES:
        raise InvalidRequest(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", param=f"{where}.role")
    role = ROLES[role]
    calls = m.get("tool_calls") if role == "assistant" else None
    if role == "assistant" and content is None:  # (a turn of calls alone)
        content = ""
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise InvalidRequest(f"{where}.content: only text parts are supported", param=f"{where}.content")
        if not all(isinstance(p.get("text"), str) for p in content):
            raise InvalidRequest(f"{where}.content: each text part needs a string `text`", param=f"{where}.content")
        content = "".join(p.get("text", "") for p in content)
    if not isinstance(content, str):
        raise InvalidRequest(f"{where}.content must be a string", param=f"{where}.content")
    out = {"role": role, "content": content}
    if calls is not None:
        out["tool_calls"] = [_tool_call(f"{where}.tool_calls[{j}]", c) for j, c in enumerate(_listed(calls, where))]
    if role == "tool":
        call_id = m.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise InvalidRequest(
                f"{where}.tool_call_id must be the id of the call it answers", param=f"{where}.tool_call_id"
            )
        out["tool_call_id"] = call_id
    return out


def _listed(calls, where: str) -> list:
    if not isinstance(calls, list):
        raise InvalidRequest(f"{where}.tool_calls must be a list", param=f"{where}.tool_calls")
    return calls


def _tool_call(where: str, c) -> dict:
    """One of an assistant turn's tool_calls -> {id, type, function: {name, arguments}}."""
    f = c.get("function") if isinstance(c, dict) else None
    if (
        not isinstance(f, dict)
        or c.get("type", "function") != "function"
        or not isinstance(c.get("id"), str)
        or not isinstance(f.get("name"), str)
        or not isinstance(f.get("arguments"), str)
    ):
        raise InvalidRequest(
            f'{where} must be {{"id": "...", "type": "function", "function": {{"name": "...", "arguments": "<JSON>"}}}}',
            param=where,
        )
    return {"id": c["id"], "type": "function", "function": {"name": f["name"], "arguments": f["arguments"]}}


MAX_TOOLS = 128
MAX_TOOLS_BYTES = 65_536  # the functions' names, descriptions and schemas, as compact JSON
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def tools_field(body: dict) -> Tools | None:
    """tools, tool_choice and parallel_tool_calls -> Tools (None: no tools offered)."""
    raw, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequest(
            f"parallel_tool_calls must be true or false, got {shown(parallel)}", param="parallel_tool_calls"
        )
    if raw is None or raw == []:
        if choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice needs tools to choose from", param="tool_choice")
        return None
    if not isinstance(raw, list) or len(raw) > MAX_TOOLS:
        raise InvalidRequest(f"tools must be a list of at most {MAX_TOOLS} tools", param="tools")
    functions: list[dict] = []
    for i, t in enumerate(raw):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(f, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else None
            raise InvalidRequest(
                f'tools[{i}] must be {{"type": "function", "function": {{"name", "description", "parameters"}}}}'
                + (f"; {kind!r} tools are not supported here" if isinstance(kind, str) and kind != "function" else ""),
                param=f"tools[{i}]",
            )
        name, description = f.get("name"), f.get("description") or ""
        parameters = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise InvalidRequest(
                f"tools[{i}].function.name must be 1-64 letters, digits, _ or -, got {shown(name)}", param=f"tools[{i}]"
            )
        if any(name == g["name"] for g in functions):
            raise InvalidRequest(f"tools[{i}]: a second function named {name!r}", param=f"tools[{i}]")
        if not isinstance(description, str):
            raise InvalidRequest(f"tools[{i}].function.description must be a string", param=f"tools[{i}]")
        if not isinstance(parameters, dict):
            raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON Schema object", param=f"tools[{i}]")
        functions.append({"name": name, "description": description, "parameters": parameters})
    if len(json.dumps(functions, separators=(",", ":"), ensure_ascii=False).encode()) > MAX_TOOLS_BYTES:
        raise InvalidRequest(f"tools must be at most {MAX_TOOLS_BYTES} bytes as JSON", param="tools")
    kind, named = _tool_choice(choice, [f["name"] for f in functions])
    return Tools(tuple(functions), kind, named, parallel is not False)


def _tool_choice(choice, names: list[str]) -> tuple[str, str]:
    if choice is None:
        return "auto", ""
    if choice in ("auto", "none", "required"):
        return choice, ""
    f = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = f.get("name") if isinstance(f, dict) else None
    if not isinstance(name, str) or name not in names:
        raise InvalidRequest(
            'tool_choice must be "auto", "none", "required" or {"type": "function", "function": {"name": '
            f"<one of {', '.join(names)}>}}}}, got {shown(choice)}",
            param="tool_choice",
        )
    return "function", name
