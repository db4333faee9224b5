"""The Anthropic translations, table-driven and without servers: OpenAI chat -> Anthropic
(requests, replies, event streams, errors) and Anthropic -> OpenAI for ``/v1/messages``
(requests, replies, chunk streams)."""

import orjson
import pytest

from tornado_proxy.config import ModelSpec
from tornado_proxy.errors import InvalidRequestError, ProxyError, RateLimitError, UpstreamError
from tornado_proxy.providers.anthropic import (DEFAULT_MAX_TOKENS, AnthropicProvider, to_anthropic_request,
                                               to_openai_response)
from tornado_proxy.providers.anthropic_format import (ChunksToEvents, PassThroughOutput, TranslatedOutput,
                                                      to_anthropic_message, to_openai_request)
from tornado_proxy.providers.base import StreamState, UpstreamReply
from tornado_proxy.registry import build_deployment
from tornado_proxy.sse import SseParser

KEY = "sk-ant-secret-for-unit-tests"
P = AnthropicProvider()


def deployment(model="anthropic/claude-3-5-haiku", environ=None, **params):
    return build_deployment(ModelSpec("claude", {"model": model, **params}, {}, "model_list[0]"), environ or {})


def text(t: str, **extra) -> dict:
    return {"type": "text", "text": t, **extra}


def convert(messages, **params) -> dict:
    return to_anthropic_request({"model": "claude", "messages": messages, **params}, "claude-x", stream=False)


def call(id_: str, name: str, args: str) -> dict:
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": args}}


# --- OpenAI messages -> Anthropic turns ------------------------------------------------------------

MESSAGE_CASES = [
    ("plain", [{"role": "user", "content": "hi"}],
     [], [{"role": "user", "content": [text("hi")]}]),
    ("multiple system and developer messages, anywhere",
     [{"role": "system", "content": "one"}, {"role": "user", "content": "hi"},
      {"role": "developer", "content": [text("two"), text("three", cache_control={"type": "ephemeral"})]}],
     [text("one"), text("two"), text("three", cache_control={"type": "ephemeral"})],
     [{"role": "user", "content": [text("hi")]}]),
    ("empty content is dropped, and so is a turn left empty",
     [{"role": "system", "content": ""}, {"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
      {"role": "user", "content": [text(""), text("b")]}, {"role": "assistant", "content": None}],
     [], [{"role": "user", "content": [text("a"), text("b")]}]),
    ("consecutive same-role turns merge",
     [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"},
      {"role": "assistant", "content": "d"}],
     [], [{"role": "user", "content": [text("a"), text("b")]},
          {"role": "assistant", "content": [text("c"), text("d")]}]),
    ("parallel tool calls and their results (merged into one user turn, results first)",
     [{"role": "user", "content": "weather?"},
      {"role": "assistant", "content": None, "tool_calls": [call("t1", "w", '{"c":"Paris"}'), call("t2", "w", "")]},
      {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
      {"role": "tool", "tool_call_id": "t2", "content": [text("rain")]},
      {"role": "user", "content": "thanks"}],
     [], [{"role": "user", "content": [text("weather?")]},
          {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "w", "input": {"c": "Paris"}},
                                            {"type": "tool_use", "id": "t2", "name": "w", "input": {}}]},
          {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
                                       {"type": "tool_result", "tool_use_id": "t2", "content": [text("rain")]},
                                       text("thanks")]}]),
    ("a user turn before a tool result still puts the result first",
     [{"role": "assistant", "content": "x", "tool_calls": [call("t1", "w", "{}")]},
      {"role": "user", "content": "note"}, {"role": "tool", "tool_call_id": "t1", "content": "ok"}],
     [], [{"role": "assistant", "content": [text("x"), {"type": "tool_use", "id": "t1", "name": "w", "input": {}}]},
          {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}, text("note")]}]),
    ("images: data URL -> base64, http -> url; message-level cache_control marks the last block",
     [{"role": "user", "cache_control": {"type": "ephemeral"}, "content": [
         text("look"), {"type": "image_url", "image_url": {"url": "data:image/webp;base64,AAAA"}},
         {"type": "image_url", "image_url": "https://x.test/a.png"}]}],
     [], [{"role": "user", "content": [
         text("look"), {"type": "image", "source": {"type": "base64", "media_type": "image/webp", "data": "AAAA"}},
         {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"},
          "cache_control": {"type": "ephemeral"}}]}]),
    ("a PDF file part becomes a document",
     [{"role": "user", "content": [{"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBE"}}]}],
     [], [{"role": "user", "content": [
         {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}}]}]),
    ("assistant thinking blocks go first",
     [{"role": "user", "content": "q"},
      {"role": "assistant", "content": "a",
       "thinking_blocks": [{"type": "thinking", "thinking": "t", "signature": "s"}]}],
     [], [{"role": "user", "content": [text("q")]},
          {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "s"}, text("a")]}]),
]


@pytest.mark.parametrize("name, messages, system, turns", MESSAGE_CASES, ids=[c[0] for c in MESSAGE_CASES])
def test_messages(name, messages, system, turns):
    out = convert(messages)
    assert out.get("system", []) == system
    assert out["messages"] == turns


@pytest.mark.parametrize("messages, param", [
    ([{"role": "system", "content": "only a system prompt"}], "messages"),
    ([{"role": "user", "content": ""}], "messages"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role"),
    ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
    ([{"role": "assistant", "tool_calls": [call("t", "f", "not json")]}],
     "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "assistant", "tool_calls": [call("t", "f", "[1, 2]")]}], "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,notbase64"}}]}],
     "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], "messages[0].content[0]"),
    ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content[0].type"),
])
def test_message_errors(messages, param):
    with pytest.raises(InvalidRequestError) as info:
        convert(messages)
    assert info.value.param == param


# --- parameters ------------------------------------------------------------------------------------

USER = [{"role": "user", "content": "hi"}]
FN = {"type": "function", "function": {"name": "f", "description": "does f",
                                       "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}}


@pytest.mark.parametrize("params, expected", [
    ({}, {"max_tokens": DEFAULT_MAX_TOKENS}),
    ({"max_tokens": 10}, {"max_tokens": 10}),
    ({"max_tokens": 10, "max_completion_tokens": 20}, {"max_tokens": 20}),
    ({"stop": "END"}, {"stop_sequences": ["END"]}),
    ({"stop": ["a", "b"]}, {"stop_sequences": ["a", "b"]}),
    ({"temperature": 0, "top_p": 0.9}, {"temperature": 0, "top_p": 0.9}),
    ({"user": "user-1"}, {"metadata": {"user_id": "user-1"}}),
    ({"user": "someone@example.com"}, {}),  # Anthropic rejects e-mail addresses as user ids
    ({"metadata": {"tag": "x"}, "stream_options": {"include_usage": True}, "n": 1}, {}),
    ({"reasoning_effort": "low"}, {"thinking": {"type": "enabled", "budget_tokens": 1024},
                                   "max_tokens": DEFAULT_MAX_TOKENS + 1024}),
    ({"thinking": {"type": "enabled", "budget_tokens": 2000}, "max_tokens": 5000},
     {"thinking": {"type": "enabled", "budget_tokens": 2000}, "max_tokens": 5000}),
    ({"top_k": 3, "some_future_param": [1]}, {"top_k": 3, "some_future_param": [1]}),  # not OpenAI's: passed on
    ({"mock_response": "x", "fallbacks": ["y"]}, {}),
])
def test_parameters(params, expected):
    out = convert(USER, **params)
    base = {"model": "claude-x", "messages": [{"role": "user", "content": [text("hi")]}],
            "max_tokens": DEFAULT_MAX_TOKENS}
    assert out == {**base, **expected}


@pytest.mark.parametrize("choice, parallel, expected", [
    ("auto", None, {"type": "auto"}),
    ("required", None, {"type": "any"}),
    ("none", None, {"type": "none"}),
    ({"type": "function", "function": {"name": "f"}}, None, {"type": "tool", "name": "f"}),
    (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ("required", True, {"type": "any", "disable_parallel_tool_use": False}),
    ("none", False, {"type": "none"}),
    (None, None, None),
])
def test_tool_choice(choice, parallel, expected):
    params = {k: v for k, v in (("tool_choice", choice), ("parallel_tool_calls", parallel)) if v is not None}
    out = convert(USER, tools=[FN], **params)
    assert out["tools"] == [{"name": "f", "description": "does f",
                             "input_schema": {"type": "object", "properties": {"x": {"type": "string"}}}}]
    assert out.get("tool_choice") == expected


def test_tools_without_parameters_and_native_tools():
    out = convert(USER, tools=[{"type": "function", "function": {"name": "g"}},
                               {"type": "web_search_20250305", "name": "web_search", "max_uses": 2},
                               {"name": "h", "input_schema": {"type": "object"}}])
    assert out["tools"] == [{"name": "g", "input_schema": {"type": "object", "properties": {}}},
                            {"type": "web_search_20250305", "name": "web_search", "max_uses": 2},
                            {"name": "h", "input_schema": {"type": "object"}}]


@pytest.mark.parametrize("fmt, schema", [
    ({"type": "json_object"}, {"type": "object", "additionalProperties": True, "properties": {}}),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object", "properties": {"a": {}}}}},
     {"type": "object", "properties": {"a": {}}}),
])
def test_response_format_is_a_forced_tool(fmt, schema):
    out = convert(USER, response_format=fmt)
    assert out["tools"] == [{"name": "json_tool_call", "input_schema": schema}]
    assert out["tool_choice"] == {"type": "tool", "name": "json_tool_call"}
    assert "tool_choice" not in convert(USER, response_format={"type": "text"})


@pytest.mark.parametrize("params, named", [
    ({"seed": 1}, "seed"), ({"n": 2}, "n"), ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"logprobs": True}, "logprobs"), ({"presence_penalty": 0.1, "logit_bias": {"1": 2}}, "presence_penalty"),
])
def test_unsupported_parameters_are_named(params, named):
    with pytest.raises(InvalidRequestError) as info:
        convert(USER, **params)
    assert info.value.param == named and named in info.value.message
    out = convert(USER, drop_params=True, **params)
    assert not set(params) & set(out) and "drop_params" not in out


def test_unknown_reasoning_effort():
    with pytest.raises(InvalidRequestError):
        convert(USER, reasoning_effort="extreme")


# --- build_request, url, headers -------------------------------------------------------------------

@pytest.mark.parametrize("base, url", [
    (None, "https://api.anthropic.com/v1/messages"),
    ("http://h:1", "http://h:1/v1/messages"),
    ("http://h:1/", "http://h:1/v1/messages"),
    ("http://h:1/v1", "http://h:1/v1/messages"),
    ("http://h:1/v1/messages", "http://h:1/v1/messages"),
    ("http://h:1/proxy/anthropic", "http://h:1/proxy/anthropic/v1/messages"),
])
def test_url(base, url):
    params = {"api_base": base} if base else {}
    assert P.build_request(deployment(**params), "chat", {"model": "g", "messages": USER}, False).url == url


def test_build_request_headers_defaults_and_env():
    d = deployment(environ={"ANTHROPIC_API_KEY": KEY}, temperature=0.1, max_tokens=99,
                   extra_headers={"anthropic-beta": "x"})
    req = P.build_request(d, "chat", {"model": "claude", "messages": USER, "temperature": 0.7}, stream=True)
    assert req.method == "POST"
    assert req.headers["x-api-key"] == KEY and req.headers["anthropic-version"] == "2023-06-01"
    assert req.headers["anthropic-beta"] == "x" and "Authorization" not in req.headers
    body = orjson.loads(req.body)
    assert body["temperature"] == 0.7 and body["max_tokens"] == 99 and body["stream"] is True
    assert body["model"] == "claude-3-5-haiku"


def test_build_request_passthrough_and_count_tokens():
    d = deployment(api_key=KEY, temperature=0.1)
    body = {"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
            "mock_response": "never sent", "top_k": 2}
    sent = orjson.loads(P.build_request(d, "messages", body, stream=False).body)
    assert sent == {"model": "claude-3-5-haiku", "max_tokens": 5, "messages": body["messages"], "top_k": 2,
                    "temperature": 0.1}
    req = P.build_request(d, "count_tokens", {"model": "claude", "messages": body["messages"]}, stream=False)
    assert req.url.endswith("/v1/messages/count_tokens")
    assert orjson.loads(req.body) == {"model": "claude-3-5-haiku", "messages": body["messages"]}
    with pytest.raises(InvalidRequestError):
        P.build_request(d, "embeddings", {"model": "claude", "input": "x"}, stream=False)


# --- Anthropic reply -> chat.completion ------------------------------------------------------------

def reply(content, stop_reason="end_turn", usage=None) -> dict:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": content,
            "stop_reason": stop_reason, "stop_sequence": None,
            "usage": usage or {"input_tokens": 3, "output_tokens": 2}}


@pytest.mark.parametrize("stop_reason, finish", [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
    ("refusal", "content_filter"), ("pause_turn", "stop"), ("model_context_window_exceeded", "length"),
    ("something_new", "something_new"),  # unknown reasons are passed on, as LiteLLM does
    (None, None),
])
def test_finish_reasons(stop_reason, finish):
    assert to_openai_response(reply([text("x")], stop_reason))["choices"][0]["finish_reason"] == finish


@pytest.mark.parametrize("content, message", [
    ([], {"role": "assistant", "content": None}),
    ([text("a"), text("b")], {"role": "assistant", "content": "ab"}),
    ([text("hm"), {"type": "tool_use", "id": "t1", "name": "f", "input": {"x": 1}},
      {"type": "tool_use", "id": "t2", "name": "g", "input": {}}],
     {"role": "assistant", "content": "hm", "tool_calls": [call("t1", "f", '{"x":1}'), call("t2", "g", "{}")]}),
    ([{"type": "thinking", "thinking": "because", "signature": "sig"}, text("42")],
     {"role": "assistant", "content": "42", "reasoning_content": "because",
      "thinking_blocks": [{"type": "thinking", "thinking": "because", "signature": "sig"}]}),
    ([{"type": "tool_use", "id": "t", "name": "json_tool_call", "input": {"a": 1}}],
     {"role": "assistant", "content": '{"a":1}'}),
])
def test_reply_content(content, message):
    out = to_openai_response(reply(content))
    assert out["choices"][0]["message"] == message
    assert out["object"] == "chat.completion" and out["id"] == "msg_1" and out["model"] == "claude-x"


def test_reply_usage_with_cache():
    out = to_openai_response(reply([text("x")], usage={"input_tokens": 10, "output_tokens": 5,
                                                       "cache_read_input_tokens": 100,
                                                       "cache_creation_input_tokens": 7}))
    assert out["usage"] == {"prompt_tokens": 117, "completion_tokens": 5, "total_tokens": 122,
                            "prompt_tokens_details": {"cached_tokens": 100},
                            "cache_creation_input_tokens": 7, "cache_read_input_tokens": 100}


def test_parse_response_endpoints():
    raw = orjson.dumps(reply([text("hi")]))
    chat = P.parse_response("chat", UpstreamReply(200, {}, raw))
    assert orjson.loads(chat.body)["choices"][0]["message"]["content"] == "hi"
    assert chat.usage["prompt_tokens"] == 3
    passed = P.parse_response("messages", UpstreamReply(200, {}, raw))
    assert passed.body == raw and passed.usage["completion_tokens"] == 2
    with pytest.raises(UpstreamError):
        P.parse_response("chat", UpstreamReply(200, {}, b"<html>"))


# --- event stream -> chunks ------------------------------------------------------------------------

def sse(*events: dict) -> list[bytes]:
    return [orjson.dumps(e) for e in events]


START = {"type": "message_start", "message": {"id": "msg_9", "type": "message", "role": "assistant",
                                              "model": "claude-x", "content": [], "stop_reason": None,
                                              "usage": {"input_tokens": 7, "output_tokens": 1}}}


def run(events: list[bytes], include_usage=False) -> tuple[list[dict], StreamState]:
    state = StreamState(include_usage=include_usage)
    out = [orjson.loads(c) for e in events for c in P.parse_event("chat", e, state)]
    return out, state


def deltas(chunks) -> list[dict]:
    return [c["choices"][0]["delta"] for c in chunks if c["choices"]]


def test_stream_text():
    chunks, state = run(sse(
        START, {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"}, {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}},
        {"type": "message_stop"}), include_usage=True)
    assert deltas(chunks) == [{"role": "assistant", "content": ""}, {"content": "Hel"}, {"content": "lo"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]] == [None, None, None, "stop"]
    assert all(c["id"] == "msg_9" and c["model"] == "claude-x" and c["object"] == "chat.completion.chunk"
               for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 7
    assert chunks[-1]["usage"]["completion_tokens"] == 2
    assert all(c["usage"] is None for c in chunks[:-1])
    assert state.done and state.usage["total_tokens"] == 9


def test_stream_parallel_tool_argument_deltas():
    chunks, state = run(sse(
        START, {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ok"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1,
         "content_block": {"type": "tool_use", "id": "t1", "name": "f", "input": {}}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"a"'}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ":1}"}},
        {"type": "content_block_stop", "index": 1},
        {"type": "content_block_start", "index": 2,
         "content_block": {"type": "tool_use", "id": "t2", "name": "g", "input": {}}},
        {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "{}"}},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}},
        {"type": "message_stop"}))
    assert deltas(chunks)[1:] == [
        {"content": "ok"},
        {"tool_calls": [{"index": 0, "id": "t1", "type": "function", "function": {"name": "f", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]},
        {"tool_calls": [{"index": 1, "id": "t2", "type": "function", "function": {"name": "g", "arguments": ""}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
        {}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert "usage" not in chunks[-1] and state.usage["completion_tokens"] == 9


def test_stream_thinking_json_mode_and_unknown_events():
    chunks, _ = run(sse(
        START, {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "s"}},
        {"type": "content_block_start", "index": 1,
         "content_block": {"type": "tool_use", "id": "t", "name": "json_tool_call", "input": {}}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"a":1}'}},
        {"type": "some_future_event", "x": 1},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 3}}))
    assert deltas(chunks)[1:] == [{"reasoning_content": "hmm"}, {"content": '{"a":1}'}, {}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_stream_error_event_is_a_mid_stream_error():
    events = sse(START, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
                 {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": "late"}})
    chunks, state = run(events)
    assert len(chunks) == 1  # nothing after the error
    assert isinstance(state.error, ProxyError)
    assert state.error.status == 503 and state.error.type == "overloaded_error" and "Overloaded" in state.error.message
    _, state = run(sse({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}))
    assert state.error.status == 429


def test_passthrough_events_note_usage():
    state = StreamState()
    for e in sse(START, {"type": "ping"}, {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                           "usage": {"output_tokens": 4}}, {"type": "message_stop"}):
        assert P.parse_event("messages", e, state) == [e]
    assert state.usage["prompt_tokens"] == 7 and state.usage["completion_tokens"] == 4 and state.done


# --- errors ----------------------------------------------------------------------------------------

def anthropic_error(kind: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_1"})


@pytest.mark.parametrize("status, kind, expected_status, expected_type", [
    (400, "invalid_request_error", 400, "invalid_request_error"),
    (401, "authentication_error", 401, "authentication_error"),
    (403, "permission_error", 403, "permission_denied"),
    (404, "not_found_error", 404, "not_found_error"),
    (413, "request_too_large", 413, "invalid_request_error"),
    (429, "rate_limit_error", 429, "rate_limit_error"),
    (500, "api_error", 500, "api_error"),
    (529, "overloaded_error", 503, "overloaded_error"),
])
def test_parse_error(status, kind, expected_status, expected_type):
    d = deployment(api_key=KEY)
    headers = {"retry-after": "4"} if status == 429 else {}
    err = P.parse_error(UpstreamReply(status, headers, anthropic_error(kind, f"bad {KEY}")), d)
    assert err.status == expected_status and err.type == expected_type
    assert err.message == "AnthropicException - anthropic/claude-3-5-haiku: bad ***"
    assert err.headers == headers
    assert err.retryable == (status in (429, 500, 529))


def test_parse_error_non_json():
    err = P.parse_error(UpstreamReply(502, {}, b"<html>bad gateway</html>"), deployment())
    assert err.status == 502 and "bad gateway" in err.message


@pytest.mark.parametrize("error, body_type", [
    (InvalidRequestError("x"), "invalid_request_error"),
    (RateLimitError("x"), "rate_limit_error"),
    (ProxyError("x", status=401, type="auth_error"), "authentication_error"),
    (ProxyError("x", status=403, type="permission_denied"), "permission_error"),
    (ProxyError("x", status=413, type="invalid_request_error"), "invalid_request_error"),
    (ProxyError("x", status=413, type="whatever"), "request_too_large"),
    (UpstreamError("x", status=503, type="overloaded_error"), "overloaded_error"),
    (UpstreamError("x", status=503, type="service_unavailable"), "api_error"),
    (ProxyError("x", status=408, type="timeout"), "timeout_error"),
])
def test_anthropic_error_body(error, body_type):
    assert error.to_anthropic_body() == {"type": "error", "error": {"type": body_type, "message": "x"}}


# --- /v1/messages for other providers: Anthropic request -> OpenAI ----------------------------------

def openai_of(**body) -> dict:
    return to_openai_request({"model": "m", "max_tokens": 10, **body})


REVERSE_CASES = [
    ("plain string content and system",
     {"system": "be brief", "messages": [{"role": "user", "content": "hi"}]},
     [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]),
    ("system blocks join; multi-part user content stays a list",
     {"system": [text("a"), text("b", cache_control={"type": "ephemeral"})],
      "messages": [{"role": "user", "content": [text("x"), text("y")]}]},
     [{"role": "system", "content": "a\n\nb"}, {"role": "user", "content": [text("x"), text("y")]}]),
    ("images and documents",
     {"messages": [{"role": "user", "content": [
         {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}},
         {"type": "image", "source": {"type": "url", "url": "https://x.test/i.png"}},
         {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JV"}},
         {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "plain doc"}}]}]},
     [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
         {"type": "image_url", "image_url": {"url": "https://x.test/i.png"}},
         {"type": "file", "file": {"file_data": "data:application/pdf;base64,JV", "filename": "document.pdf"}},
         text("plain doc")]}]),
    ("tool use, parallel results (with an error and an image), thinking dropped",
     {"messages": [
         {"role": "user", "content": "weather?"},
         {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "s"}, text("ok"),
                                           {"type": "tool_use", "id": "t1", "name": "w", "input": {"c": "P"}},
                                           {"type": "tool_use", "id": "t2", "name": "w", "input": {}}]},
         {"role": "user", "content": [
             {"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
             {"type": "tool_result", "tool_use_id": "t2", "is_error": True, "content": [
                 text("no data"), {"type": "image", "source": {"type": "url", "url": "https://x.test/m.png"}}]},
             text("and?")]}]},
     [{"role": "user", "content": "weather?"},
      {"role": "assistant", "content": "ok", "tool_calls": [call("t1", "w", '{"c":"P"}'), call("t2", "w", "{}")]},
      {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
      {"role": "tool", "tool_call_id": "t2", "content": "Error: no data"},
      {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.test/m.png"}},
                                   text("and?")]}]),
    ("an assistant turn with only thinking is dropped; empty content too",
     {"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "x"}]},
                   {"role": "user", "content": []}]},
     [{"role": "user", "content": "q"}]),
]


@pytest.mark.parametrize("name, body, messages", REVERSE_CASES, ids=[c[0] for c in REVERSE_CASES])
def test_reverse_messages(name, body, messages):
    assert openai_of(**body)["messages"] == messages


def test_reverse_parameters():
    out = openai_of(messages=[{"role": "user", "content": "x"}], stop_sequences=["END"], temperature=0.2, top_p=0.9,
                    top_k=5, stream=True, metadata={"user_id": "u"}, thinking={"type": "enabled", "budget_tokens": 1},
                    tools=[{"name": "w", "description": "d", "input_schema": {"type": "object"}}],
                    tool_choice={"type": "tool", "name": "w", "disable_parallel_tool_use": True})
    assert out == {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}], "stop": ["END"],
                   "temperature": 0.2, "top_p": 0.9, "stream": True, "stream_options": {"include_usage": True},
                   "user": "u", "tools": [{"type": "function", "function": {
                       "name": "w", "description": "d", "parameters": {"type": "object"}}}],
                   "tool_choice": {"type": "function", "function": {"name": "w"}}, "parallel_tool_calls": False}


@pytest.mark.parametrize("choice, expected", [
    ({"type": "auto"}, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none"),
])
def test_reverse_tool_choice(choice, expected):
    assert openai_of(messages=[{"role": "user", "content": "x"}], tool_choice=choice)["tool_choice"] == expected


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "search_result", "content": []}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "file", "file_id": "f"}}]}]},
     "messages[0].content[0].source"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
])
def test_reverse_errors(body, param):
    with pytest.raises(InvalidRequestError) as info:
        openai_of(**{"messages": [{"role": "user", "content": "x"}], **body})
    assert info.value.param == param


def completion(message: dict, finish="stop", usage=None) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-x",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": usage or {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}


@pytest.mark.parametrize("finish, stop_reason", [
    ("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"), ("function_call", "tool_use"),
    ("content_filter", "refusal"), ("something_new", "end_turn"), (None, "end_turn"),
])
def test_reverse_stop_reasons(finish, stop_reason):
    assert to_anthropic_message(completion({"content": "x"}, finish), "m")["stop_reason"] == stop_reason


def test_reverse_message():
    out = to_anthropic_message(completion(
        {"role": "assistant", "content": "hm", "tool_calls": [call("c1", "f", '{"x":1}'), call("c2", "g", ""),
                                                              call("c3", "h", "not json")]},
        "tool_calls", {"prompt_tokens": 120, "completion_tokens": 8, "prompt_tokens_details": {"cached_tokens": 100}}),
        "fallback")
    assert out == {"id": "chatcmpl-1", "type": "message", "role": "assistant", "model": "gpt-x",
                   "content": [text("hm"), {"type": "tool_use", "id": "c1", "name": "f", "input": {"x": 1}},
                               {"type": "tool_use", "id": "c2", "name": "g", "input": {}},
                               {"type": "tool_use", "id": "c3", "name": "h", "input": {"arguments": "not json"}}],
                   "stop_reason": "tool_use", "stop_sequence": None,
                   "usage": {"input_tokens": 20, "output_tokens": 8, "cache_read_input_tokens": 100}}
    empty = to_anthropic_message({"choices": [{"message": {"content": ""}, "finish_reason": "stop"}]}, "fallback")
    assert empty["content"] == [] and empty["model"] == "fallback" and empty["id"].startswith("msg_")
    assert empty["usage"] == {"input_tokens": 0, "output_tokens": 0}


# --- OpenAI chunks -> Anthropic events --------------------------------------------------------------

def chunk(delta=None, finish=None, usage=None, choices=True) -> bytes:
    out = {"id": "chatcmpl-7", "object": "chat.completion.chunk", "model": "gpt-x",
           "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if choices else []}
    if usage:
        out["usage"] = usage
    return orjson.dumps(out)


def translate(*chunks: bytes) -> list[tuple[str, dict]]:
    stream = ChunksToEvents("fallback")
    raw = b"".join(stream.feed(c) for c in chunks) + stream.end()
    parser = SseParser()
    return [(e.event, orjson.loads(e.data)) for e in parser.feed(raw)]


def test_chunks_text_then_parallel_tools():
    events = translate(
        chunk({"role": "assistant", "content": ""}), chunk({"content": "Let "}), chunk({"content": "me"}),
        chunk({"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                               "function": {"name": "f", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "c2", "type": "function",
                               "function": {"name": "g", "arguments": "{}"}}]}),
        chunk({}, "tool_calls"), chunk(usage={"prompt_tokens": 9, "completion_tokens": 4}, choices=False))
    assert all(name == data["type"] for name, data in events)
    assert [(n, d.get("index")) for n, d in events] == [
        ("message_start", None),
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_delta", 1), ("content_block_stop", 1),
        ("content_block_start", 2), ("content_block_delta", 2), ("content_block_stop", 2),
        ("message_delta", None), ("message_stop", None)]
    start = events[0][1]["message"]
    assert start["id"] == "chatcmpl-7" and start["model"] == "gpt-x" and start["content"] == []
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    assert [d["delta"]["text"] for n, d in events[2:4]] == ["Let ", "me"]
    assert events[5][1]["content_block"] == {"type": "tool_use", "id": "c1", "name": "f", "input": {}}
    assert [d["delta"] for n, d in events[6:8]] == [{"type": "input_json_delta", "partial_json": '{"a"'},
                                                    {"type": "input_json_delta", "partial_json": ":1}"}]
    assert events[9][1]["content_block"]["name"] == "g"
    assert events[-2][1] == {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                             "usage": {"input_tokens": 9, "output_tokens": 4}}


def test_chunks_empty_stream_still_a_whole_message():
    events = translate()
    assert [n for n, _ in events] == ["message_start", "message_delta", "message_stop"]
    assert events[0][1]["message"]["model"] == "fallback"
    assert events[1][1]["delta"]["stop_reason"] == "end_turn"


def test_chunks_length_and_garbage():
    events = translate(b"not json", b"[1]", chunk({"content": "x"}), chunk({}, "length"))
    assert [n for n, _ in events] == ["message_start", "content_block_start", "content_block_delta",
                                      "content_block_stop", "message_delta", "message_stop"]
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"


def test_outputs():
    out = TranslatedOutput("m")
    body = orjson.loads(out.body(orjson.dumps(completion({"content": "hi"}))))
    assert body["content"] == [text("hi")] and body["type"] == "message"
    err = out.error_event(RateLimitError("slow"))
    assert err == b'event: error\ndata: {"type":"error","error":{"type":"rate_limit_error","message":"slow"}}\n\n'
    assert PassThroughOutput.event(b'{"type":"ping"}') == b'event: ping\ndata: {"type":"ping"}\n\n'
    assert PassThroughOutput.body(b"x") == b"x" and PassThroughOutput.end() == b""
