"""The Responses API's pure parts (stratus.responses): a body read into the chat it becomes, output
items and back, and the response object's status for each state of its job."""

import pytest

from stratus import responses
from stratus.contracts import InferenceRequest, Job, Status
from stratus.errors import InvalidRequest
from stratus.params import SamplingParams
from stratus.wire import parse_request

CALL = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'}


def test_a_body_becomes_the_chat_it_runs_as():
    call = responses.read(
        {
            "model": "m",
            "input": [
                {"role": "user", "content": "Weather in Paris?"},
                CALL,
                {**CALL, "call_id": "call_2", "arguments": '{"city":"Rome"}'},
                {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "And "}, {"type": "input_text", "text": "now?"}],
                },
            ],
            "instructions": "Be brief.",
            "max_output_tokens": 32,
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
            "metadata": {"k": "v"},
            "include": [],
            "truncation": "disabled",
        }
    )
    assert [m["role"] for m in call.new] == ["user", "assistant", "tool", "user"]
    assert [c["id"] for c in call.new[1]["tool_calls"]] == ["call_1", "call_2"]  # (calls made together: one turn)
    assert call.new[3]["content"] == "And now?"
    chat = {**call.chat, "messages": responses.messages(call, [{"role": "user", "content": "earlier"}])}
    assert [m["role"] for m in chat["messages"]] == ["system", "user", "user", "assistant", "tool", "user"]
    assert chat["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    ]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "object"}},
    }
    assert call.store and not call.background and call.fields["metadata"] == {"k": "v"}
    # (chat's own parser reads it: the same validation, cache key and limits as chat completions)
    del chat["response_format"]
    req = parse_request("chat", chat, max_messages=16, max_tokens_limit=64)
    assert req.params.max_tokens == 32 and req.tools.name == "get_weather"


@pytest.mark.parametrize(
    "fields, param, words",
    [
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0]", "'input_image' are not supported"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content",
            "input_text",
        ),
        ({"input": []}, "input", "non-empty list"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]", "'web_search' tools are not supported"),
        ({"background": True, "store": False}, "background", "must be stored"),
        ({"reasoning": {"effort": "high"}}, "reasoning", "not supported"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt", "not supported"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata", "at most 16"),
        ({"previous_response_id": "chatcmpl-1"}, "previous_response_id", "resp_"),
        ({"text": {"format": {"type": "grammar"}}}, "text", "text.format must be"),
        ({"stream": "yes"}, "stream", "true or false"),
    ],
)
def test_bad_fields_are_a_400_naming_them(fields, param, words):
    with pytest.raises(InvalidRequest) as err:
        responses.read({"model": "m", "input": "hi", **fields})
    assert err.value.param == param and words in str(err.value)


def test_output_items_round_trip_into_the_next_turn_and_the_input_items():
    calls = {"tool_calls": [{"id": "call_9", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    out = responses.output_items("resp_" + "a" * 32, {"text": "{...}", "finish_reason": "tool_calls", **calls})
    assert out == [
        {
            "type": "function_call",
            "id": "fc_9",
            "call_id": "call_9",
            "name": "f",
            "arguments": "{}",
            "status": "completed",
        }
    ]
    assert responses.output_messages(out) == [{"role": "assistant", "content": None, "tool_calls": calls["tool_calls"]}]
    text = responses.output_items("resp_" + "a" * 32, {"text": "Hi.", "finish_reason": "stop"})
    assert text[0]["id"] == "msg_" + "a" * 32 and text[0]["content"][0]["text"] == "Hi."
    assert responses.output_messages(text) == [{"role": "assistant", "content": "Hi."}]
    items = responses.items_of(
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "tool_calls": calls["tool_calls"]},
            {"role": "tool", "tool_call_id": "call_9", "content": "r"},
        ],
        "resp_x",
    )
    assert [i["type"] for i in items] == ["message", "function_call", "function_call_output"]
    assert len({i["id"] for i in items}) == 3 and items[1]["call_id"] == items[2]["call_id"] == "call_9"


@pytest.mark.parametrize(
    "status, result, error, shown, reason",
    [
        (Status.QUEUED, None, None, "queued", None),
        (Status.RUNNING, None, None, "in_progress", None),
        (Status.DONE, {"text": "a", "finish_reason": "stop"}, None, "completed", None),
        (Status.DONE, {"text": "a", "finish_reason": "length"}, None, "incomplete", "max_output_tokens"),
        (Status.FAILED, None, {"message": "boom", "code": "worker_failed"}, "failed", None),
        (Status.CANCELLED, None, None, "cancelled", None),
    ],
)
def test_the_response_shows_its_jobs_state(status, result, error, shown, reason):
    req = InferenceRequest("chat", "m", SamplingParams())
    job = Job("j" + "0" * 32, "t", status, req, False, 1.0, 2, result=result, error=error)
    fields = responses.read({"model": "m", "input": "hi"}).fields
    record = {"created_at": 1, "model": "m", "fields": fields, "conversation": []}
    body = responses.body("resp_" + "a" * 32, record, job)
    assert body["status"] == shown and (body["incomplete_details"] or {}).get("reason") == reason
    assert (body["error"] or {}).get("message") == (error or {}).get("message")
    assert body["object"] == "response" and body["store"] is True and body["tool_choice"] == "auto"
    # the job gone: the output the record kept, or a failure that says why
    assert responses.body("resp_x", {**record, "output": []}, None)["status"] == "completed"
    assert responses.body("resp_x", record, None)["error"]["code"] == "expired"


def test_a_conversation_too_long_to_store_is_refused_before_its_job_is_made():
    from stratus.errors import PayloadTooLarge

    fields = responses.read({"model": "m", "input": "hi"}).fields
    long = [{"role": "user", "content": "x" * (responses.MAX_RECORD_BYTES + 1)}]
    with pytest.raises(PayloadTooLarge, match="store: false"):
        responses.ResponseStore.item("resp_" + "a" * 32, "t", "", "m", fields, long, 0.0)
    item = responses.ResponseStore.item("resp_" + "a" * 32, "t", "", "m", fields, long[:0], 0.0)
    assert item["expires_at"] == responses.RESPONSE_TTL_S and item["conversation"] == "[]"
