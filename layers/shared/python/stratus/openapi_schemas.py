"""The request and response schemas of the API's OpenAPI description (stratus.openapi puts them
under components/schemas and writes the paths that use them). Built from the code's own limits."""

from __future__ import annotations

from stratus.contracts import MAX_CHOICES
from stratus.params import MAX_LOGIT_BIAS, MAX_N, MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS
from stratus.settings import Settings
from stratus.submission import SERVICE_TIERS
from stratus.wire import MAX_TOOLS, ROLES, ROUTE_PATHS


def _sampling(s: Settings, streams: bool = True) -> dict:
    stop = {
        "oneOf": [
            {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
            {
                "type": "array",
                "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
                "maxItems": MAX_STOP_STRINGS,
            },
        ],
        "nullable": True,
    }
    return {
        "model": {"type": "string", "minLength": 1, "example": s.catalogue.default.id},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": s.max_tokens, "nullable": True},
        "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": s.max_tokens, "nullable": True},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2, "nullable": True},
        "top_p": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1, "nullable": True},
        "top_k": {"type": "integer", "minimum": 0, "nullable": True},
        "repetition_penalty": {
            "type": "number",
            "minimum": 0,
            "exclusiveMinimum": True,
            "maximum": 10,
            "nullable": True,
        },
        "seed": {"type": "integer", "nullable": True},
        "service_tier": {
            "type": "string",
            "enum": list(SERVICE_TIERS),
            "nullable": True,
            "description": "flex: the batch tier's queue (slower, behind interactive work); others: the key's tier",
        },
        "ignore_eos": {
            "type": "boolean",
            "nullable": True,
            "description": "generate max_tokens tokens, past the model's end of sequence (benchmarks)",
        },
        "min_tokens": {
            "type": "integer",
            "minimum": 0,
            "maximum": s.max_tokens,
            "nullable": True,
            "description": "the model's end of sequence is held off until this many tokens (at most "
            "max_tokens); stop strings still stop",
        },
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2, "nullable": True},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2, "nullable": True},
        "logit_bias": {
            "type": "object",
            "nullable": True,
            "maxProperties": MAX_LOGIT_BIAS,
            "propertyNames": {"pattern": "^[0-9]{1,9}$"},
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
            "description": "token id (a decimal string) -> bias added to its logit; ids must be in "
            "the model's vocabulary (checked by the worker: a FAILED job, 400)",
        },
        "stop": stop,
        "n": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_N,
            "nullable": True,
            "description": f"choices per prompt (at most {MAX_CHOICES} choices in all; stream: true serves one)",
        },
        "stream": {"type": "boolean", "nullable": True}
        if streams
        else {"type": "boolean", "enum": [False, None], "nullable": True},  # jobs are answered whole
        "stream_options": {
            "type": "object",
            "nullable": True,
            "additionalProperties": False,
            "properties": {
                "include_usage": {"type": "boolean"},
                "continuous_usage_stats": {
                    "type": "boolean",
                    "description": "with include_usage: every chunk carries the usage so far",
                },
                "include_obfuscation": {"type": "boolean"},
            },
        },
    }


_TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
}
_CONTENT = {"oneOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]}
TOOL_CALL = {
    "type": "object",
    "required": ["id", "function"],
    "properties": {
        "id": {"type": "string"},
        "type": {"type": "string", "enum": ["function"]},
        "function": {
            "type": "object",
            "required": ["name", "arguments"],
            "properties": {"name": {"type": "string"}, "arguments": {"type": "string", "description": "JSON text"}},
        },
    },
}
MESSAGE = {
    "anyOf": [
        {
            "type": "object",
            "required": ["role", "content"],
            "properties": {
                "role": {"type": "string", "enum": [r for r in ROLES if r not in ("assistant", "tool")]},
                "content": _CONTENT,
            },
        },
        {
            "type": "object",
            "required": ["role"],
            "properties": {
                "role": {"type": "string", "enum": ["assistant"]},
                "content": {**_CONTENT, "nullable": True},
                "tool_calls": {"type": "array", "items": TOOL_CALL, "nullable": True},
            },
        },
        {
            "type": "object",
            "required": ["role", "content", "tool_call_id"],
            "properties": {
                "role": {"type": "string", "enum": ["tool"]},
                "content": _CONTENT,
                "tool_call_id": {"type": "string", "minLength": 1},
            },
        },
    ]
}
TOOLS = {
    "tools": {
        "type": "array",
        "nullable": True,
        "maxItems": MAX_TOOLS,
        "items": {
            "type": "object",
            "required": ["type", "function"],
            "properties": {
                "type": {"type": "string", "enum": ["function"]},
                "function": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                        "description": {"type": "string", "nullable": True},
                        "parameters": {"type": "object", "description": "JSON Schema of the arguments"},
                        "strict": {"type": "boolean", "nullable": True, "description": "always enforced"},
                    },
                },
            },
        },
        "description": "function tools (names unique); calls are generated under each one's schema",
    },
    "tool_choice": {
        "oneOf": [
            {"type": "string", "enum": ["auto", "none", "required"]},
            {
                "type": "object",
                "required": ["type", "function"],
                "properties": {
                    "type": {"type": "string", "enum": ["function"]},
                    "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
                },
            },
        ],
        "nullable": True,
        "description": "a named function must be one of tools",
    },
    "parallel_tool_calls": {"type": "boolean", "nullable": True},
}
IDS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}, "minItems": 1}


def schemas(s: Settings) -> dict:
    usage = {
        "type": "object",
        "properties": {k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
    }
    choice = {
        "type": "object",
        "properties": {
            "index": {"type": "integer"},
            "finish_reason": {"type": "string"},
            "logprobs": {"type": "object", "nullable": True},
        },
    }
    top = {"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS, "nullable": True}
    chat_only = {"logprobs": {"type": "boolean", "nullable": True}, "top_logprobs": top, **TOOLS}
    ids = IDS
    prompt = {
        "oneOf": [
            {"type": "string", "minLength": 1},
            ids,
            {
                "type": "array",
                "items": {"oneOf": [{"type": "string", "minLength": 1}, ids]},
                "minItems": 1,
                "maxItems": MAX_CHOICES,
            },
        ],
        "description": "text, token ids (used exactly: no BOS added), or a list of either (a choice each)",
    }
    completion_only = {
        "logprobs": {**top, "description": "log-probabilities of each token and this many alternatives"},
        "echo": {
            "type": "boolean",
            "nullable": True,
            "description": "return the prompt before the text (with "
            "logprobs: each prompt token's log-probability, the first null); max_tokens may then be 0",
        },
        "max_tokens": {"type": "integer", "minimum": 0, "maximum": s.max_tokens, "nullable": True},
        "prompt": prompt,
    }
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": "string", "nullable": True},
                        "code": {"type": "string", "nullable": True},
                    },
                }
            },
        },
        **{
            f"{kind}Request": {
                "type": "object",
                "required": ["model", "messages"],
                "properties": {
                    **_sampling(s, streams),
                    **chat_only,
                    "messages": {"type": "array", "items": MESSAGE, "minItems": 1, "maxItems": s.max_messages},
                },
                "allOf": [
                    _when("top_logprobs", {"type": "integer"}, {"logprobs": {"const": True}}, required=True),
                    _when("stream", {"const": True}, {"n": {"enum": [1, None]}}),
                ],
            }
            for kind, streams in (("Chat", True), ("JobChat", False))
        },
        **{
            f"{kind}Request": {
                "type": "object",
                "required": ["model", "prompt"],
                "properties": {**_sampling(s, streams), **completion_only},
                "allOf": [
                    _unless(
                        "echo", {"const": True}, {"max_tokens": {"minimum": 1}, "max_completion_tokens": {"minimum": 1}}
                    ),
                    _when(
                        "prompt",
                        {"type": "array", "minItems": 2, "items": {"not": {"type": "integer"}}},
                        {"n": {"enum": [1, None]}},
                    ),  # prompts x n <= MAX_CHOICES, simply
                    _when(
                        "stream",
                        {"const": True},
                        {
                            "n": {"enum": [1, None]},
                            "echo": {"enum": [False, None]},
                            "prompt": {"oneOf": [{"type": "string"}, ids, {"type": "array", "maxItems": 1}]},
                        },
                    ),
                ],
            }
            for kind, streams in (("Completion", True), ("JobCompletion", False))
        },
        "Chunk": {
            "type": "object",
            "required": ["id", "object", "choices"],
            "properties": {
                "id": {"type": "string"},
                "object": {"type": "string", "enum": ["chat.completion.chunk", "text_completion"]},
                "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {"type": "array"},
                "usage": {"type": "object", "nullable": True},
            },
        },
        "Completion": {
            "type": "object",
            "required": ["id", "object", "choices"],
            "properties": {
                "id": {"type": "string"},
                "object": {"type": "string", "enum": ["chat.completion", "text_completion"]},
                "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {"type": "array", "items": choice},
                "usage": usage,
            },
        },
        "Job": {
            "type": "object",
            "required": ["id", "object", "status"],
            "properties": {
                "id": {"type": "string"},
                "object": {"type": "string", "enum": ["job"]},
                "status": {"type": "string", "enum": ["QUEUED", "RUNNING", "DONE", "FAILED", "CANCELLED", "EXPIRED"]},
                "created_at": {"type": "integer"},
                "model": {"type": "string"},
                "endpoint": {"type": "string"},
            },
        },
        "Batch": {
            "type": "object",
            "required": ["id", "object", "status"],
            "properties": {
                "id": {"type": "string"},
                "object": {"type": "string", "enum": ["batch"]},
                "status": {"type": "string"},
                "request_counts": {"type": "object"},
            },
        },
        "BatchRequest": {
            "type": "object",
            "required": ["input_file_id"],
            "properties": {
                "input_file_id": {"type": "string", "minLength": 1},
                "endpoint": {"type": "string", "enum": [*ROUTE_PATHS, "/v1/responses"]},
                "completion_window": {"type": "string"},
                "metadata": {
                    "type": "object",
                    "nullable": True,
                    "maxProperties": 16,
                    "propertyNames": {"maxLength": 64},
                    "additionalProperties": {"type": "string", "maxLength": 512},
                    "description": "shown back on the batch; 1,536 characters as JSON in all (S3 object metadata)",
                },
            },
        },
        "List": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"type": "string", "enum": ["list"]},
                "data": {"type": "array", "items": {"type": "object"}},
            },
        },
    }


def _when(name: str, schema: dict, then: dict, *, required: bool = False) -> dict:
    """When field `name` matches `schema`, the other fields must match `then` (JSON Schema if/then):
    the combinations the code refuses with a 400 are outside the document."""
    return {
        "if": {"required": [name], "properties": {name: schema}},
        "then": {"properties": then, **({"required": list(then)} if required else {})},
    }


def _unless(name: str, schema: dict, otherwise: dict) -> dict:
    return {"if": {"required": [name], "properties": {name: schema}}, "else": {"properties": otherwise}}


def response_schemas(s: Settings) -> dict:
    """POST /v1/responses' body and the response object (stratus.responses)."""
    parts = {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["type", "text"],
            "properties": {
                "type": {"type": "string", "enum": ["input_text", "output_text"]},
                "text": {"type": "string"},
            },
        },
    }
    message = {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "type": {"type": "string", "enum": ["message"]},
            "role": {"type": "string", "enum": ["user", "system", "developer", "assistant"]},
            "content": {"oneOf": [{"type": "string"}, parts]},
        },
    }
    call = {
        "type": "object",
        "required": ["type", "call_id", "name", "arguments"],
        "properties": {
            "type": {"type": "string", "enum": ["function_call"]},
            "call_id": {"type": "string"},
            "name": {"type": "string"},
            "arguments": {"type": "string", "description": "JSON text"},
        },
    }
    output = {
        "type": "object",
        "required": ["type", "call_id", "output"],
        "properties": {
            "type": {"type": "string", "enum": ["function_call_output"]},
            "call_id": {"type": "string", "minLength": 1},
            "output": {"type": "string"},
        },
    }
    tool = {
        "type": "object",
        "required": ["type", "name"],
        "properties": {
            "type": {"type": "string", "enum": ["function"]},
            "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
            "description": {"type": "string", "nullable": True},
            "parameters": {"type": "object"},
            "strict": {"type": "boolean", "nullable": True},
        },
    }
    fmt = {
        "oneOf": [
            {
                "type": "object",
                "required": ["type"],
                "properties": {"type": {"type": "string", "enum": ["text", "json_object"]}},
            },
            {
                "type": "object",
                "required": ["type", "name", "schema"],
                "properties": {
                    "type": {"type": "string", "enum": ["json_schema"]},
                    "name": {"type": "string"},
                    "schema": {"type": "object"},
                    "strict": {"type": "boolean", "nullable": True},
                },
            },
        ]
    }
    sampling = _sampling(s)
    request = {
        "type": "object",
        "required": ["model", "input"],
        "properties": {
            "model": sampling["model"],
            "input": {
                "oneOf": [
                    {"type": "string"},
                    {
                        "type": "array",
                        "items": {"anyOf": [message, call, output]},
                        "minItems": 1,
                        "maxItems": s.max_messages,
                    },
                ]
            },
            "instructions": {"type": "string", "nullable": True},
            "max_output_tokens": {**sampling["max_tokens"]},
            "temperature": sampling["temperature"],
            "top_p": sampling["top_p"],
            "text": {"type": "object", "nullable": True, "properties": {"format": fmt}},
            "tools": {
                "type": "array",
                "nullable": True,
                "maxItems": MAX_TOOLS,
                "items": tool,
                "description": "function tools (names unique)",
            },
            "tool_choice": {
                "oneOf": [
                    {"type": "string", "enum": ["auto", "none", "required"]},
                    {
                        "type": "object",
                        "required": ["type", "name"],
                        "properties": {"type": {"type": "string", "enum": ["function"]}, "name": {"type": "string"}},
                    },
                ],
                "nullable": True,
                "description": "a named function must be one of tools",
            },
            "parallel_tool_calls": {"type": "boolean", "nullable": True},
            "store": {"type": "boolean", "nullable": True, "description": "kept 30 days (default true)"},
            "background": {"type": "boolean", "nullable": True, "description": "queued and polled (needs store)"},
            "previous_response_id": {"type": "string", "nullable": True, "pattern": "^resp_"},
            "stream": {"type": "boolean", "nullable": True},
            "metadata": {
                "type": "object",
                "nullable": True,
                "maxProperties": 16,
                "propertyNames": {"maxLength": 64},
                "additionalProperties": {"type": "string", "maxLength": 512},
            },
            "user": {"type": "string", "nullable": True},
            "truncation": {"type": "string", "enum": ["disabled", "auto"], "nullable": True},
            "include": {"type": "array", "maxItems": 0, "nullable": True},
            "reasoning": {
                "type": "object",
                "nullable": True,
                "properties": {"effort": {"type": "string", "enum": ["none"], "nullable": True}},
            },
            "service_tier": {"type": "string", "enum": list(SERVICE_TIERS), "nullable": True},
            "prompt_cache_key": {"type": "string", "nullable": True},
            "safety_identifier": {"type": "string", "nullable": True},
            "top_logprobs": {"type": "integer", "enum": [0], "nullable": True},
            "stream_options": {"type": "object", "nullable": True},
        },
        "additionalProperties": False,  # (a field this server does not read is a 400 naming it)
    }
    response = {
        "type": "object",
        "required": ["id", "object", "status", "output"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["response"]},
            "status": {
                "type": "string",
                "enum": ["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"],
            },
            "output": {"type": "array", "items": {"type": "object"}},
        },
    }
    return {"ResponseRequest": request, "Response": response}
