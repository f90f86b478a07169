"""The API's OpenAPI 3.1 description, served at GET /openapi.json and fuzzed in the test suite
(schemathesis). Built from the code's own limits (settings, params, contracts), so the document
says what the code enforces.
"""

from __future__ import annotations

from stratus.batches import MAX_PAGE
from stratus.openapi_schemas import IDS, MESSAGE, response_schemas, schemas
from stratus.settings import Settings

JSON = "application/json"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _errors(*statuses: int) -> dict:
    return {str(s): {"description": DESCRIPTIONS[s], "content": {JSON: {"schema": _ref("Error")}}} for s in statuses}


DESCRIPTIONS = {
    400: "invalid request (the field is named)",
    401: "missing or unknown API key",
    403: "the key may not use this model (stratus keys create --models)",
    404: "not found (or another tenant's)",
    409: "conflicts with the job's state",
    413: "too large for the body limit, SQS or DynamoDB",
    429: "a tenant limit (Retry-After)",
    501: "not configured on this deployment (the message says what to set)",
    503: "unavailable for a moment (Retry-After)",
}
COMMON = (400, 401, 403, 413, 429, 503)
MODEL_NAME = {"type": ["string", "null"], "description": "a model id or alias (GET /v1/models); the default without it"}


def _completion_route(summary: str, request: str) -> dict:
    return {
        "post": {
            "summary": summary,
            "security": [{"bearer": []}],
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref(request)}}},
            "responses": {
                "200": {
                    "description": "the completion (or, with stream: true, server-sent events)",
                    "content": {
                        JSON: {"schema": _ref("Completion")},
                        "text/event-stream": {
                            "schema": {
                                # each event: `data` is a JSON chunk (Chunk), an in-band Error, or "[DONE]"
                                "type": "object",
                                "required": ["data"],
                                "properties": {"data": {"type": "string"}},
                            }
                        },
                    },
                },
                "202": {"description": "still running: poll Location", "content": {JSON: {"schema": _ref("Job")}}},
                **_errors(*COMMON, 404),
                "409": {"description": "the job was cancelled", "content": {JSON: {"schema": _ref("Error")}}},
                "500": {"description": "the job failed on the workers", "content": {JSON: {"schema": _ref("Error")}}},
            },
        }
    }


def _id(name: str) -> dict:
    return {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}, "description": name}


def _json_schema(node):
    """The schemas (openapi_schemas.py) use OpenAPI 3.0's spellings (nullable, boolean exclusiveMinimum); 3.1 is
    JSON Schema: `type: [T, "null"]`, a numeric exclusiveMinimum (and propertyNames works)."""
    if isinstance(node, list):
        return [_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _json_schema(v) for k, v in node.items()}
    if node.pop("nullable", False):
        if "type" in node:
            node["type"] = [node["type"], "null"]
        elif "oneOf" in node:
            node["oneOf"] = [*node["oneOf"], {"type": "null"}]
    if node.get("exclusiveMinimum") is True:
        node["exclusiveMinimum"] = node.pop("minimum")
    return node


def spec(s: Settings) -> dict:
    return _json_schema(_spec(s))


def _spec(s: Settings) -> dict:
    job = {"content": {JSON: {"schema": _ref("Job")}}}
    response = {"content": {JSON: {"schema": _ref("Response")}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Stratus",
            "version": "1",
            "description": "OpenAI-compatible inference: chat and "
            "text completions and responses (whole or streamed), jobs, batches, files, models.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {**schemas(s), **response_schemas(s)},
        },
        "paths": {
            "/v1/chat/completions": _completion_route("Chat completion", "ChatRequest"),
            "/v1/completions": _completion_route("Text completion", "CompletionRequest"),
            "/v1/responses": {
                "post": {
                    "summary": "Create a response (the Responses API over the chat path)",
                    "security": [{"bearer": []}],
                    "requestBody": {"required": True, "content": {JSON: {"schema": _ref("ResponseRequest")}}},
                    "responses": {
                        "200": {
                            "description": "the response (or, with stream: true, its typed server-sent events)",
                            "content": {
                                JSON: {"schema": _ref("Response")},
                                "text/event-stream": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["data"],
                                        "properties": {"data": {"type": "string"}},
                                    }
                                },
                            },
                        },
                        **_errors(*COMMON, 404, 409),
                        "500": {
                            "description": "the job failed on the workers",
                            "content": {JSON: {"schema": _ref("Error")}},
                        },
                    },
                }
            },
            "/v1/responses/{id}": {
                "get": {
                    "summary": "A stored response",
                    "security": [{"bearer": []}],
                    "parameters": [_id("response id")],
                    "responses": {"200": {"description": "the response", **response}, **_errors(401, 404, 503)},
                },
                "delete": {
                    "summary": "Delete a stored response",
                    "security": [{"bearer": []}],
                    "parameters": [_id("response id")],
                    "responses": {
                        "200": {"description": "deleted", "content": {JSON: {"schema": {"type": "object"}}}},
                        **_errors(401, 404, 503),
                    },
                },
            },
            "/v1/responses/{id}/cancel": {
                "post": {
                    "summary": "Cancel a background response",
                    "security": [{"bearer": []}],
                    "parameters": [_id("response id")],
                    "responses": {"200": {"description": "the response", **response}, **_errors(400, 401, 404, 503)},
                }
            },
            "/v1/responses/{id}/input_items": {
                "get": {
                    "summary": "A stored response's conversation, as input items",
                    "security": [{"bearer": []}],
                    "parameters": [
                        _id("response id"),
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                        {"name": "order", "in": "query", "schema": {"type": "string", "enum": ["asc", "desc"]}},
                        {"name": "after", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": {"description": "a list", "content": {JSON: {"schema": _ref("List")}}},
                        **_errors(400, 401, 404, 503),
                    },
                }
            },
            "/v1/jobs": {
                "post": {
                    "summary": "Submit a chat or completion request as a job",
                    "security": [{"bearer": []}],
                    "requestBody": {
                        "required": True,
                        "content": {
                            JSON: {"schema": {"oneOf": [_ref("JobChatRequest"), _ref("JobCompletionRequest")]}}
                        },
                    },
                    "responses": {
                        "202": {"description": "queued", **job},
                        "200": {"description": "already known", **job},
                        **_errors(*COMMON, 404),
                    },
                }
            },
            "/v1/jobs/{id}": {
                "get": {
                    "summary": "A job",
                    "security": [{"bearer": []}],
                    "parameters": [_id("job id")],
                    "responses": {"200": {"description": "the job", **job}, **_errors(401, 404, 503)},
                },
                "delete": {
                    "summary": "Cancel a job",
                    "security": [{"bearer": []}],
                    "parameters": [_id("job id")],
                    "responses": {"200": {"description": "cancelled", **job}, **_errors(401, 404, 409, 503)},
                },
            },
            "/v1/batches": {
                "post": {
                    "summary": "Create a batch from an uploaded file",
                    "security": [{"bearer": []}],
                    "requestBody": {"required": True, "content": {JSON: {"schema": _ref("BatchRequest")}}},
                    "responses": {
                        "200": {"description": "the batch", "content": {JSON: {"schema": _ref("Batch")}}},
                        **_errors(*COMMON, 404),
                    },
                },
                "get": {
                    "summary": "This tenant's batches, newest first, a page at a time",
                    "security": [{"bearer": []}],
                    "parameters": [
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
                        },
                        {
                            "name": "after",
                            "in": "query",
                            "schema": {"type": "string"},
                            "description": "the last batch id of the page before",
                        },
                    ],
                    "responses": {
                        "200": {"description": "a list", "content": {JSON: {"schema": _ref("List")}}},
                        **_errors(400, 401, 404, 503),
                    },
                },
            },
            "/v1/batches/{id}": {
                "get": {
                    "summary": "A batch",
                    "security": [{"bearer": []}],
                    "parameters": [_id("batch id")],
                    "responses": {
                        "200": {"description": "the batch", "content": {JSON: {"schema": _ref("Batch")}}},
                        **_errors(401, 404, 503),
                    },
                }
            },
            "/v1/batches/{id}/cancel": {
                "post": {
                    "summary": "Cancel a batch: no more lines start; finished lines go to its output",
                    "security": [{"bearer": []}],
                    "parameters": [_id("batch id")],
                    "responses": {
                        "200": {
                            "description": "the batch, cancelling (or already cancelled)",
                            "content": {JSON: {"schema": _ref("Batch")}},
                        },
                        **_errors(401, 404, 409, 503),
                    },
                }
            },
            "/v1/files": {
                "post": {
                    "summary": "Upload a batch input file",
                    "security": [{"bearer": []}],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["file"],
                                    "properties": {
                                        "file": {"type": "string", "format": "binary"},
                                        "purpose": {"type": "string"},
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": {"description": "the file", "content": {JSON: {"schema": {"type": "object"}}}},
                        **_errors(*COMMON),
                    },
                },
                "get": {
                    "summary": "The files this tenant uploaded, newest first",
                    "security": [{"bearer": []}],
                    "parameters": [
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                        {"name": "after", "in": "query", "schema": {"type": "string"}},
                        {"name": "order", "in": "query", "schema": {"type": "string", "enum": ["asc", "desc"]}},
                        {"name": "purpose", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": {"description": "a list", "content": {JSON: {"schema": _ref("List")}}},
                        **_errors(400, 401, 503),
                    },
                },
            },
            "/v1/files/{id}": {
                "get": {
                    "summary": "A file's object",
                    "security": [{"bearer": []}],
                    "parameters": [_id("file id")],
                    "responses": {
                        "200": {"description": "the file", "content": {JSON: {"schema": {"type": "object"}}}},
                        **_errors(401, 404, 503),
                    },
                },
                "delete": {
                    "summary": "Delete an uploaded file",
                    "security": [{"bearer": []}],
                    "parameters": [_id("file id")],
                    "responses": {
                        "200": {"description": "deleted", "content": {JSON: {"schema": {"type": "object"}}}},
                        **_errors(400, 401, 404, 503),
                    },
                },
            },
            "/v1/files/{id}/content": {
                "get": {
                    "summary": "A file's content",
                    "security": [{"bearer": []}],
                    "parameters": [_id("file id")],
                    "responses": {
                        "200": {
                            "description": "JSON lines",
                            "content": {"application/jsonl": {"schema": {"type": "string"}}},
                        },
                        **_errors(401, 404, 413, 503),
                    },
                }
            },
            "/v1/models": {
                "get": {
                    "summary": "The models this deployment serves (id, digest, context length, aliases)",
                    "security": [{"bearer": []}],
                    "responses": {
                        "200": {"description": "a list", "content": {JSON: {"schema": _ref("List")}}},
                        **_errors(401, 503),
                    },
                }
            },
            "/v1/models/{id}": {
                "get": {
                    "summary": "A model this deployment serves, by its id or an alias (404 for any other)",
                    "security": [{"bearer": []}],
                    "parameters": [_id("model id")],
                    "responses": {
                        "200": {"description": "the model object", "content": {JSON: {"schema": {"type": "object"}}}},
                        **_errors(401, 404, 503),
                    },
                }
            },
            "/tokenize": {
                "post": {
                    "summary": "Token ids of a prompt, or of messages in the chat template (vLLM's shape)",
                    "security": [{"bearer": []}],
                    "requestBody": {
                        "required": True,
                        "content": {
                            JSON: {
                                "schema": {
                                    "oneOf": [
                                        {
                                            "type": "object",
                                            "required": ["prompt"],
                                            "not": {"required": ["messages"]},
                                            "properties": {
                                                "prompt": {"type": "string"},
                                                "model": MODEL_NAME,
                                                "add_special_tokens": {"type": "boolean"},
                                                "return_token_strs": {"type": "boolean"},
                                            },
                                        },
                                        {
                                            "type": "object",
                                            "required": ["messages"],
                                            "not": {"required": ["prompt"]},
                                            "properties": {
                                                "messages": {"type": "array", "items": MESSAGE},
                                                "model": MODEL_NAME,
                                                "add_generation_prompt": {"type": "boolean"},
                                                "add_special_tokens": {"type": "boolean"},
                                                "return_token_strs": {"type": "boolean"},
                                            },
                                        },
                                    ]
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "{count, max_model_len, tokens, token_strs}",
                            "content": {JSON: {"schema": {"type": "object"}}},
                        },
                        **_errors(400, 401, 403, 404, 413, 501, 503),
                    },
                }
            },
            "/detokenize": {
                "post": {
                    "summary": "The text of token ids",
                    "security": [{"bearer": []}],
                    "requestBody": {
                        "required": True,
                        "content": {
                            JSON: {
                                "schema": {
                                    "type": "object",
                                    "required": ["tokens"],
                                    "properties": {"tokens": {**IDS, "minItems": 0}, "model": MODEL_NAME},
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": {"description": "{prompt}", "content": {JSON: {"schema": {"type": "object"}}}},
                        **_errors(400, 401, 403, 404, 413, 501, 503),
                    },
                }
            },
            "/tokenizer_info": {
                "get": {
                    "summary": "The tokenizer's special tokens, chat template and limits",
                    "security": [{"bearer": []}],
                    "parameters": [{"name": "model", "in": "query", "required": False, "schema": MODEL_NAME}],
                    "responses": {
                        "200": {
                            "description": "eos_token, bos_token, chat_template, model_max_length",
                            "content": {JSON: {"schema": {"type": "object"}}},
                        },
                        **_errors(401, 403, 404, 501, 503),
                    },
                }
            },
            "/health": {
                "get": {
                    "summary": "Liveness",
                    "responses": {"200": {"description": "ok", "content": {JSON: {"schema": {"type": "object"}}}}},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {
                        "200": {"description": "OpenAPI 3.0", "content": {JSON: {"schema": {"type": "object"}}}}
                    },
                }
            },
        },
    }
