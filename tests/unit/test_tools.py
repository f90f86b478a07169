"""Tool calling (stratus.tools): the request fields, the prompt, the grammar, and the answer whole
and streamed; on the tiny model (seeded random weights), calls that parse and validate whatever it
prefers."""

import json

import jsonschema
import pytest

from stratus import tools
from stratus.errors import InvalidRequest
from stratus.wire import parse_request
from stratus_engine.engine import Engine, GenerationRequest
from stratus_worker.choices import encode_prompts, result_body

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
CLOCK = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 6}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather by city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def chat(**kw) -> dict:
    return {"model": "m", "messages": ASK, "max_tokens": 64, "tools": TOOLS, **kw}


def parse(body: dict):
    return parse_request("chat", body, max_messages=16, max_tokens_limit=256, streaming=True)


# ---- the request fields -------------------------------------------------------------------------


def test_tools_and_tool_choice_are_read_and_make_a_grammar():
    req = parse(chat())
    assert [f["name"] for f in req.tools.functions] == ["get_weather", "get_time"]
    assert (req.tools.choice, req.tools.parallel) == ("auto", True) and req.params.grammar.startswith(
        "start: TEXT | call"
    )
    named = parse(chat(tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False))
    assert (named.tools.choice, named.tools.name, named.tools.parallel) == ("function", "get_time", False)
    assert "get_weather" not in named.params.grammar  # only the named function can be called
    assert parse(chat(tool_choice="none")).params.grammar == ""
    # the tools are in the request's JSON (so its cache key), and they come back from it
    again = type(req).from_json(json.loads(json.dumps(req.to_json())))
    assert again == req and "tools" not in parse({**chat(), "tools": None}).to_json()


@pytest.mark.parametrize(
    "fields, param, words",
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0]", "'web_search' tools are not supported"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0]", "letters, digits"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1]", "a second function named 'get_weather'"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools[0]", "JSON Schema"),
        ({"tool_choice": "always"}, "tool_choice", "must be"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "get_weather, get_time"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "true or false"),
        ({"response_format": {"type": "json_object"}}, "response_format", "cannot be combined with tools"),
        ({"functions": [{"name": "f"}]}, "functions", "send tools and tool_choice"),
        ({"modalities": ["text", "audio"]}, "modalities", "text only"),
        ({"web_search_options": {}}, "web_search_options", "no web search"),
    ],
)
def test_bad_tool_fields_are_a_400_naming_the_field(fields, param, words):
    with pytest.raises(InvalidRequest) as err:
        parse(chat(**fields))
    assert err.value.param == param and words in str(err.value)


def test_a_history_with_calls_and_their_results_is_read_with_or_without_tools():
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, clear"},
    ]
    for body in ({"model": "m", "messages": history}, chat(messages=history)):
        req = parse(body)
        assert (
            req.messages[1]["tool_calls"][0]["function"]["name"] == "get_weather" and req.messages[2]["role"] == "tool"
        )
    with pytest.raises(InvalidRequest, match=r"messages\[1\].tool_calls\[0\] must be"):
        parse(chat(messages=[*ASK, {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]))
    with pytest.raises(InvalidRequest, match=r"messages\[1\].tool_call_id"):
        parse(chat(messages=[*ASK, {"role": "tool", "content": "x"}]))


# ---- the prompt ---------------------------------------------------------------------------------


def test_tool_turns_become_text_turns_and_the_functions_a_system_message():
    req = parse(
        chat(
            messages=[
                {"role": "system", "content": "Be brief."},
                *ASK,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c1", "function": {"name": "get_time", "arguments": '{"zone":"CET"}'}}],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
            ],
            tool_choice="required",
        )
    )
    out = tools.tool_chat(list(req.messages), req.tools)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert (
        out[0]["content"].startswith("Be brief.\n\nYou can call these functions")
        and "Call one of them now" in out[0]["content"]
    )
    assert '"name": "get_weather"' in out[0]["content"] and json.dumps(WEATHER) in out[0]["content"]
    assert out[2]["content"] == 'I called get_time({"zone":"CET"}).'
    assert out[3]["content"] == "get_time returned: 12:00"
    # tool_choice none: the functions are not described
    assert tools.tool_chat(list(ASK), parse(chat(tool_choice="none")).tools) == ASK


# ---- the answer ---------------------------------------------------------------------------------

TWO_CALLS = (
    '{"tool_calls":[{"name":"get_weather","arguments":{"city":"P\\"a}","unit":"celsius","days":2}},'
    '{"name":"get_time","arguments":{"zone":"CET"}}]}'
)


def test_calls_of_a_whole_answer_keep_each_arguments_text_exactly():
    got = tools.calls(TWO_CALLS, "job1")
    assert [c["function"]["name"] for c in got] == ["get_weather", "get_time"]
    assert got[0]["function"]["arguments"] == '{"city":"P\\"a}","unit":"celsius","days":2}'
    assert json.loads(got[0]["function"]["arguments"])["city"] == 'P"a}'
    assert got[0]["id"] == tools.call_id("job1", 0, 0) != got[1]["id"] and got[0]["type"] == "function"
    assert tools.calls("It is sunny.", "job1") is None
    assert tools.calls(TWO_CALLS[:40], "job1") is None  # cut short (max_tokens): no complete call


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_streamed_pieces_give_the_same_calls_as_the_whole_answer(size):
    deltas = tools.CallDeltas("job1")
    out = [d for i in range(0, len(TWO_CALLS), size) for d in deltas.push(TWO_CALLS[i : i + size])]
    heads = [d["tool_calls"][0] for d in out if "id" in d["tool_calls"][0]]
    assert [(h["index"], h["function"]["name"]) for h in heads] == [(0, "get_weather"), (1, "get_time")]
    whole = tools.calls(TWO_CALLS, "job1")
    for i, call in enumerate(whole):
        pieces = [d["tool_calls"][0]["function"].get("arguments", "") for d in out if d["tool_calls"][0]["index"] == i]
        assert "".join(pieces) == call["function"]["arguments"] and heads[i]["id"] == call["id"]
    text = tools.CallDeltas("job1")
    assert [text.push("It is"), text.push(" sunny {ok}.")] == [[{"content": "It is"}], [{"content": " sunny {ok}."}]]


# ---- on the tiny model: valid by construction -------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny):
    return Engine.from_dir(tiny.dirs["int4"], threads=1, max_batch=16)


def run(engine, body: dict) -> list[dict]:
    """A chat body through the worker's path (parse, generate, result) -> its choices. The prompt
    is a few ids: the tools' system message alone outgrows the tiny model's 256 positions, and
    the grammar, not the prompt, is what makes a call valid."""
    req = parse(body)
    prompt = [1, 40 + (body.get("seed") or 0) % 50, 90]
    result = result_body(req, [engine.generate([GenerationRequest(prompt, req.params)])[0]], [], None, "job1")
    return result.get("choices", [result])


def valid(choice: dict, names: set[str]) -> int:
    """Assert a choice's calls name offered functions with schema-valid arguments -> how many."""
    assert choice["finish_reason"] == "tool_calls", choice
    for call in choice["tool_calls"]:
        assert call["function"]["name"] in names
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
    return len(choice["tool_calls"])


def test_100_seeded_sampled_calls_all_parse_and_validate(engine):
    body = chat(tool_choice="required", parallel_tool_calls=False, temperature=1.0, max_tokens=200)
    made = [run(engine, {**body, "seed": seed, "n": 4}) for seed in range(25)]
    counts = [valid(c, set(SCHEMAS)) for choices in made for c in choices]
    assert len(counts) == 100 and set(counts) == {1}
    assert {c["tool_calls"][0]["function"]["name"] for choices in made for c in choices} == set(SCHEMAS)


def test_a_named_choice_calls_that_function_and_auto_gives_text_or_valid_calls(engine):
    named = chat(tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=1.0, max_tokens=200)
    for seed in range(8):
        [choice] = run(engine, {**named, "seed": seed})
        assert valid(choice, {"get_time"}) == 1
    # auto: text, or (the tiny model rarely starts with "{" unless pushed to) calls, always valid
    brace = engine.model.tokenizer.token_to_id("{")
    kinds = set()
    for seed in range(16):
        pushed = {"logit_bias": {str(brace): 8}} if seed % 2 else {}
        [choice] = run(engine, chat(temperature=1.0, max_tokens=200, seed=seed, parallel_tool_calls=False, **pushed))
        if "tool_calls" in choice:
            valid(choice, set(SCHEMAS))
        else:
            assert not choice["text"].startswith("{")
        kinds.add("tool_calls" in choice)
    assert kinds == {True, False}


def test_a_function_whose_schema_cannot_be_enforced_is_a_400_naming_it(engine):
    bad = {"type": "function", "function": {"name": "broken", "parameters": {"type": "string", "pattern": "(?<=a)b"}}}
    with pytest.raises(InvalidRequest) as err:
        encode_prompts(engine, parse(chat(tools=[TOOLS[0], bad])))
    assert err.value.param == "tools[1] (broken)" and "cannot be enforced" in str(err.value)


def test_objects_that_list_their_properties_are_closed_unless_they_say_otherwise():
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "integer"}}},
            "c": {"type": "array", "items": {"properties": {"d": {}}}},
            "e": {"type": "object", "properties": {}, "additionalProperties": True},
        },
        "$defs": {"f": {"anyOf": [{"properties": {"g": {}}}, {"type": "string"}]}},
    }
    got = tools.closed(schema)
    assert got["additionalProperties"] is False and got["properties"]["a"]["additionalProperties"] is False
    assert got["properties"]["c"]["items"]["additionalProperties"] is False
    assert got["properties"]["e"]["additionalProperties"] is True  # (said so)
    assert got["$defs"]["f"]["anyOf"][0]["additionalProperties"] is False and got["$defs"]["f"]["anyOf"][1] == {
        "type": "string"
    }
    assert tools.closed({"type": "object"}) == {"type": "object"}  # (lists nothing: any object)
