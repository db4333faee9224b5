"""``Schemas``: the shipped request schemas load, valid bodies pass, and every invalid body
becomes an ``InvalidRequestError`` whose ``param`` is the JSON path of the problem. Pure."""

from __future__ import annotations

import pytest

from tornado_proxy.config import ConfigError, resource_dir
from tornado_proxy.errors import InvalidRequestError
from tornado_proxy.schemas import Schemas, json_type

M = [{"role": "user", "content": "hi"}]
CHAT = {"model": "m", "messages": M}


@pytest.fixture(scope="module")
def schemas():
    return Schemas(resource_dir("schemas"))


def test_shipped_schemas_are_loaded(schemas):
    for name in ("chat_completions", "completions", "embeddings"):
        assert name in schemas
    assert "no_such_schema" not in schemas


VALID = [
    ("chat_completions", CHAT),
    ("chat_completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
                          "top_p": 0.5, "n": 2, "max_tokens": 10, "stop": ["\n"], "seed": 1, "user": "u",
                          "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto",
                          "response_format": {"type": "json_object"}, "metadata": {"a": 1}}),
    ("chat_completions", {**CHAT, "stream": None, "temperature": None, "max_tokens": None}),
    ("chat_completions", {"model": "m", "messages": [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "hi"},
                                     {"type": "image_url", "image_url": {"url": "data:,"}}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                               "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}]}),
    ("chat_completions", {**CHAT, "some_provider_param": {"anything": [1, 2]}, "mock_response": "x"}),
    ("completions", {"model": "m", "prompt": "hello"}),
    ("completions", {"model": "m", "prompt": ["a", "b"], "max_tokens": 5}),
    ("embeddings", {"model": "m", "input": "hello"}),
    ("embeddings", {"model": "m", "input": ["a", "b"], "encoding_format": "float", "dimensions": 8}),
    ("embeddings", {"model": "m", "input": [1, 2, 3]}),
    ("embeddings", {"model": "m", "input": [[1, 2], [3]], "encoding_format": "base64"}),
    ("responses", {"model": "m", "input": "hi"}),
    ("responses", {"model": "m", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "hi"}, {"type": "input_image", "image_url": "x"}]},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": "ok"}],
        "instructions": "s", "previous_response_id": "resp_1", "store": False, "stream": True, "max_output_tokens": 9,
        "tools": [{"type": "function", "name": "f", "parameters": {}}, {"type": "web_search_preview"}],
        "tool_choice": {"type": "function", "name": "f"}, "text": {"format": {"type": "json_object"}},
        "reasoning": {"effort": "low"}, "include": ["reasoning.encrypted_content"], "truncation": "auto",
        "metadata": {"a": "b"}, "parallel_tool_calls": False, "temperature": None}),
]


@pytest.mark.parametrize("name, body", VALID)
def test_valid_bodies_pass(schemas, name, body):
    assert schemas.validate(name, body) is None


INVALID = [
    # (schema, body, param, words that must be in the message)
    ("chat_completions", {}, "model", "Missing required parameter: 'model'"),
    ("chat_completions", {"messages": M}, "model", "Missing required parameter: 'model'"),
    ("chat_completions", {"model": "m"}, "messages", "Missing required parameter: 'messages'"),
    ("chat_completions", {"model": "m", "messages": None}, "messages", "expected an array, but got null"),
    ("chat_completions", {"model": "m", "messages": "hi"}, "messages", "expected an array, but got a string"),
    ("chat_completions", {"model": "m", "messages": {"role": "user"}}, "messages",
     "expected an array, but got an object"),
    ("chat_completions", {"model": "m", "messages": []}, "messages", "empty array"),
    ("chat_completions", {"model": "m", "messages": ["hi"]}, "messages[0]", "expected an object, but got a string"),
    ("chat_completions", {"model": "m", "messages": [M[0], 3]}, "messages[1]",
     "expected an object, but got an integer"),
    ("chat_completions", {"model": "m", "messages": [M[0], [M[0]]]}, "messages[1]",
     "expected an object, but got an array"),
    ("chat_completions", {"model": "m", "messages": [{"content": "x"}]}, "messages[0].role",
     "Missing required parameter: 'messages[0].role'"),
    ("chat_completions", {"model": "m", "messages": [M[0], {"role": None}]}, "messages[1].role",
     "expected a string, but got null"),
    ("chat_completions", {"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content",
     "expected a string or an array or null, but got an integer"),
    ("chat_completions", {"model": "m", "messages": [{"role": "user", "content": ["x"]}]},
     "messages[0].content[0]", "expected an object, but got a string"),
    ("chat_completions", {"model": 42, "messages": M}, "model", "expected a string, but got an integer"),
    ("chat_completions", {"model": 4.5, "messages": M}, "model", "expected a string, but got a number"),
    ("chat_completions", {"model": True, "messages": M}, "model", "expected a string, but got a boolean"),
    ("chat_completions", {"model": None, "messages": M}, "model", "expected a string, but got null"),
    ("chat_completions", {"model": "", "messages": M}, "model", "Invalid value for 'model'"),
    ("chat_completions", {**CHAT, "stream": "true"}, "stream", "expected a boolean or null, but got a string"),
    ("chat_completions", {**CHAT, "temperature": "hot"}, "temperature", "expected a number or null"),
    ("chat_completions", {**CHAT, "n": 0}, "n", "Invalid value for 'n'"),
    ("chat_completions", {**CHAT, "n": 1.5}, "n", "expected an integer or null, but got a number"),
    ("chat_completions", {**CHAT, "tools": [{"type": "function"}, "f"]}, "tools[1]", "expected an object"),
    ("chat_completions", {**CHAT, "stream_options": True}, "stream_options", "expected an object or null"),
    ("chat_completions", [], "request_body", "expected an object, but got an array"),
    ("chat_completions", "x", "request_body", "expected an object, but got a string"),
    ("chat_completions", None, "request_body", "expected an object, but got null"),
    ("completions", {"model": "m"}, "prompt", "Missing required parameter: 'prompt'"),
    ("completions", {"model": "m", "prompt": []}, "prompt", "empty array"),
    ("completions", {"model": "m", "prompt": 5}, "prompt", "expected a string or an array, but got an integer"),
    ("embeddings", {"model": "m"}, "input", "Missing required parameter: 'input'"),
    ("embeddings", {"input": "x"}, "model", "Missing required parameter: 'model'"),
    ("embeddings", {"model": "m", "input": []}, "input", "empty array"),
    ("embeddings", {"model": "m", "input": 5}, "input", "Invalid value for 'input'"),
    ("embeddings", {"model": "m", "input": None}, "input", "Invalid value for 'input'"),
    ("embeddings", {"model": "m", "input": ["a", {"b": 1}]}, "input[1]", "but got an object"),
    ("embeddings", {"model": "m", "input": "x", "encoding_format": "hex"}, "encoding_format",
     "Invalid value for 'encoding_format'"),
    ("embeddings", {"model": "m", "input": "x", "dimensions": 0}, "dimensions", "Invalid value for 'dimensions'"),
    ("responses", {"input": "x"}, "model", "Missing required parameter: 'model'"),
    ("responses", {"model": "m", "input": 5}, "input", "expected a string or an array"),
    ("responses", {"model": "m", "input": ["hi"]}, "input[0]", "expected an object"),
    ("responses", {"model": "m", "input": "x", "tools": [{"name": "f"}]}, "tools[0].type",
     "Missing required parameter"),
    ("responses", {"model": "m", "input": "x", "max_output_tokens": "9"}, "max_output_tokens", "expected an integer"),
    ("responses", {"model": "m", "input": "x", "store": "no"}, "store", "expected a boolean or null"),
    ("responses", {"model": "m", "input": "x", "previous_response_id": 7}, "previous_response_id",
     "expected a string or null"),
]


@pytest.mark.parametrize("name, body, param, words", INVALID,
                         ids=[f"{case[0]}:{case[2]}:{i}" for i, case in enumerate(INVALID)])
def test_invalid_bodies_name_the_json_path(schemas, name, body, param, words):
    with pytest.raises(InvalidRequestError) as caught:
        schemas.validate(name, body)
    error = caught.value
    assert error.param == param
    assert words in error.message
    assert f"'{param}'" in error.message
    assert error.status == 400
    assert error.to_body() == {"error": {"message": error.message, "type": "invalid_request_error",
                                         "param": param, "code": "400"}}


@pytest.mark.parametrize("name, body", [
    ("embeddings", {"model": "m", "input": {"k": "Q" * 100_000}}),
    ("embeddings", {"model": "m", "input": "x", "encoding_format": "Q" * 100_000}),
    ("chat_completions", {**CHAT, "stop": {"k": "Q" * 100_000}}),
    ("chat_completions", {"model": "Q" * 100_000, "messages": M, "n": -1}),
    ("chat_completions", {"model": "m", "messages": [{"role": "user", "content": {"k": "Q" * 100_000}}]}),
])
def test_error_message_does_not_echo_a_huge_value(schemas, name, body):
    """A bad value is named, not copied back whole: the message stays short."""
    with pytest.raises(InvalidRequestError) as caught:
        schemas.validate(name, body)
    assert len(caught.value.message) < 1000
    assert "Q" * 1000 not in caught.value.message


@pytest.mark.parametrize("value, expected", [
    (None, "null"), (True, "a boolean"), (0, "an integer"), (1.5, "a number"), ("", "a string"),
    ([], "an array"), ({}, "an object"),
])
def test_json_type_names(value, expected):
    assert json_type(value) == expected


def test_a_broken_schema_file_stops_start_up(tmp_path):
    (tmp_path / "good.json").write_text('{"type": "object"}')
    (tmp_path / "bad.json").write_text('{"type": "no-such-type"}')
    with pytest.raises(ConfigError, match="bad.json"):
        Schemas(tmp_path)


def test_a_schema_file_that_is_not_json_stops_start_up(tmp_path):
    (tmp_path / "broken.json").write_text('{"type": ')
    with pytest.raises(ConfigError, match="broken.json"):
        Schemas(tmp_path)


def test_schemas_from_another_directory(tmp_path):
    (tmp_path / "thing.json").write_text('{"type": "object", "required": ["a"], '
                                         '"properties": {"a": {"type": "array", "items": {"type": "integer"}}}}')
    schemas = Schemas(tmp_path)
    assert "thing" in schemas and "chat_completions" not in schemas
    schemas.validate("thing", {"a": [1, 2]})
    with pytest.raises(InvalidRequestError) as caught:
        schemas.validate("thing", {"a": [1, "2"]})
    assert caught.value.param == "a[1]"


@pytest.mark.parametrize("name, body, valid", [(n, b, True) for n, b in VALID] +
                         [(n, b, False) for n, b, _p, _w in INVALID])
def test_fast_and_explaining_validators_agree(schemas, name, body, valid):
    """fastjsonschema accepts (the hot path) exactly what jsonschema accepts (which explains)."""
    import fastjsonschema

    assert name in schemas._fast  # request schemas are draft-07, so the fast path is compiled
    try:
        schemas._fast[name](body)
        fast_ok = True
    except fastjsonschema.JsonSchemaValueException:
        fast_ok = False
    assert fast_ok is valid
    assert schemas._validators[name].is_valid(body) is valid
