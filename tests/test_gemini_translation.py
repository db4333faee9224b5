"""``gemini/``: OpenAI <-> Gemini translation (requests, replies, stream events, errors),
table-driven and without servers."""

import orjson
import pytest

from tornado_proxy.config import ModelSpec
from tornado_proxy.errors import InvalidRequestError
from tornado_proxy.providers import PROVIDERS
from tornado_proxy.providers.base import StreamState, UpstreamReply
from tornado_proxy.providers.gemini import (DEFAULT_BASE, GeminiProvider, convert_messages, function_declarations,
                                            gemini_schema, generation_config, tool_config)
from tornado_proxy.registry import build_deployment

KEY = "AIza-gemini-secret-for-unit-tests"
P = GeminiProvider()


def deployment(model="gemini/gemini-2.0-flash", environ=None, **params):
    return build_deployment(ModelSpec("group", {"model": model, **params}, {}, "model_list[0]"), environ or {})


def call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def user(text):
    return {"role": "user", "parts": [{"text": text}]}


# --- set-up and URLs ------------------------------------------------------------------------------

def test_defaults_from_environment():
    d = deployment(environ={"GEMINI_API_KEY": KEY})
    assert isinstance(PROVIDERS["gemini"], GeminiProvider) and d.problem is None
    assert d.api_base == DEFAULT_BASE == "https://generativelanguage.googleapis.com/v1beta"
    assert d.api_key.reveal() == KEY
    assert deployment(environ={"GOOGLE_API_KEY": "g"}).api_key.reveal() == "g"
    assert deployment(environ={"GEMINI_API_BASE": "http://x/v1"}).api_base == "http://x/v1"


@pytest.mark.parametrize("model,endpoint,body,stream,url", [
    ("gemini/gemini-2.0-flash", "chat", {"messages": [{"role": "user", "content": "hi"}]}, False,
     f"{DEFAULT_BASE}/models/gemini-2.0-flash:generateContent"),
    ("gemini/gemini-2.0-flash", "chat", {"messages": [{"role": "user", "content": "hi"}]}, True,
     f"{DEFAULT_BASE}/models/gemini-2.0-flash:streamGenerateContent?alt=sse"),
    ("gemini/gemini-2.0-flash", "completions", {"prompt": "hi"}, False,
     f"{DEFAULT_BASE}/models/gemini-2.0-flash:generateContent"),
    ("gemini/text-embedding-004", "embeddings", {"input": "a"}, False,
     f"{DEFAULT_BASE}/models/text-embedding-004:embedContent"),
    ("gemini/text-embedding-004", "embeddings", {"input": ["a"]}, False,
     f"{DEFAULT_BASE}/models/text-embedding-004:batchEmbedContents"),
    ("gemini/models/gemini-pro", "chat", {"messages": [{"role": "user", "content": "hi"}]}, False,
     f"{DEFAULT_BASE}/models/gemini-pro:generateContent"),
    ("gemini/tunedModels/my-tune", "chat", {"messages": [{"role": "user", "content": "hi"}]}, False,
     f"{DEFAULT_BASE}/tunedModels/my-tune:generateContent"),
])
def test_urls(model, endpoint, body, stream, url):
    req = P.build_request(deployment(model, api_key=KEY), endpoint, {"model": "group", **body}, stream)
    assert req.url == url and req.method == "POST"
    assert req.headers == {"Content-Type": "application/json", "x-goog-api-key": KEY}
    assert KEY not in req.url and KEY.encode() not in req.body


def test_custom_base_and_no_key():
    req = P.build_request(deployment(api_base="http://proxy.test/v1beta/"), "chat",
                          {"model": "g", "messages": [{"role": "user", "content": "hi"}]}, False)
    assert req.url == "http://proxy.test/v1beta/models/gemini-2.0-flash:generateContent"
    assert "x-goog-api-key" not in req.headers


def test_config_defaults_apply_and_client_wins():
    d = deployment(temperature=0.3, max_tokens=9)
    body = orjson.loads(P.build_request(d, "chat", {"model": "g", "messages": [{"role": "user", "content": "x"}],
                                                    "temperature": 0.9}, False).body)
    assert body["generationConfig"] == {"temperature": 0.9, "maxOutputTokens": 9}


# --- messages -------------------------------------------------------------------------------------

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


@pytest.mark.parametrize("messages,system,contents", [
    pytest.param([{"role": "user", "content": "hi"}], [], [user("hi")], id="plain"),
    pytest.param([{"role": "system", "content": "a"}, {"role": "user", "content": "hi"},
                  {"role": "system", "content": "b"},
                  {"role": "developer", "content": [{"type": "text", "text": "c"}]}],
                 [{"text": "a"}, {"text": "b"}, {"text": "c"}], [user("hi")], id="several-system-messages"),
    pytest.param([{"role": "user", "content": ""}, {"role": "user", "content": None}, {"role": "user", "content": "x"},
                  {"role": "assistant", "content": ""}, {"role": "system", "content": ""}],
                 [], [user("x")], id="empty-content-left-out"),
    pytest.param([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                  {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}],
                 [], [{"role": "user", "parts": [{"text": "a"}, {"text": "b"}]},
                      {"role": "model", "parts": [{"text": "c"}]}, user("d")], id="same-role-turns-merge"),
    pytest.param([{"role": "user", "content": [{"type": "text", "text": "see"}, IMAGE,
                                               {"type": "image_url", "image_url": "https://x.test/a.png?s=1"},
                                               {"type": "image_url", "image_url": {"url": "gs://b/c"}}]}],
                 [], [{"role": "user", "parts": [
                     {"text": "see"}, {"inlineData": {"mimeType": "image/png", "data": "AAAA"}},
                     {"fileData": {"mimeType": "image/png", "fileUri": "https://x.test/a.png?s=1"}},
                                                 {"fileData": {"mimeType": "image/jpeg", "fileUri": "gs://b/c"}}]}],
                 id="images"),
    pytest.param([{"role": "user", "content": [
                      {"type": "input_audio", "input_audio": {"data": "UklG", "format": "mp3"}},
                      {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBE"}}]}],
                 [], [{"role": "user", "parts": [{"inlineData": {"mimeType": "audio/mp3", "data": "UklG"}},
                                                 {"inlineData": {"mimeType": "application/pdf", "data": "JVBE"}}]}],
                 id="audio-and-files"),
    pytest.param([{"role": "user", "content": "weather?"},
                  {"role": "assistant", "content": "checking", "tool_calls": [
                      call("c1", "get_weather", '{"city": "Paris"}'), call("c2", "get_weather", '{"city": "Rome"}'),
                      call("c3__thought__c2lnbg==", "get_time", "")]},
                  {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                  {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "rain"}]},
                  {"role": "tool", "tool_call_id": "c3__thought__c2lnbg==", "content": "noon"},
                  {"role": "user", "content": "thanks"}],
                 [], [user("weather?"),
                      {"role": "model", "parts": [
                          {"text": "checking"},
                          {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                          {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}},
                          {"functionCall": {"name": "get_time", "args": {}}, "thoughtSignature": "c2lnbg=="}]},
                      {"role": "user", "parts": [
                          {"functionResponse": {"name": "get_weather", "response": {"content": "sunny"}}},
                          {"functionResponse": {"name": "get_weather", "response": {"content": "rain"}}},
                          {"functionResponse": {"name": "get_time", "response": {"content": "noon"}}},
                          {"text": "thanks"}]}],
                 id="parallel-tool-calls-and-results"),
    pytest.param([{"role": "user", "content": "x"},
                  {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{\"a\":1}"}},
                  {"role": "function", "name": "f", "content": "{\"ok\": true}"}],
                 [], [user("x"), {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {"a": 1}}}]},
                      {"role": "user", "parts": [{"functionResponse": {"name": "f",
                                                                       "response": {"content": "{\"ok\": true}"}}}]}],
                 id="legacy-function-call"),
])
def test_convert_messages(messages, system, contents):
    assert convert_messages(messages) == (system, contents)


@pytest.mark.parametrize("messages,param", [
    ([{"role": "system", "content": "only system"}], "messages"),
    ([{"role": "user", "content": ""}], "messages"),
    ([{"role": "tool", "tool_call_id": "nope", "content": "x"}], "messages[0].tool_call_id"),
    ([{"role": "assistant", "tool_calls": [call("c", "f", "{not json")]}],
     "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "assistant", "tool_calls": [call("c", "f", "[1, 2]")]}], "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}], "messages[0].tool_calls[0]"),
    ([{"role": "user", "content": [{"type": "video", "video": {}}]}], "messages[0].content[0].type"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0].image_url"),
    ([{"role": "user", "content": ["bare string part"]}], "messages[0].content[0]"),
    ([{"role": "user", "content": {"text": "an object"}}], "messages[0].content"),
])
def test_bad_messages_are_400(messages, param):
    with pytest.raises(InvalidRequestError) as info:
        convert_messages(messages)
    assert info.value.param == param and info.value.status == 400


# --- parameters, tools, schemas -------------------------------------------------------------------

@pytest.mark.parametrize("body,config", [
    ({}, {}),
    ({"temperature": 0, "top_p": 0.5, "top_k": 3, "n": 2, "seed": 1, "presence_penalty": 0.1,
      "frequency_penalty": 0.2},
     {"temperature": 0, "topP": 0.5, "topK": 3, "candidateCount": 2, "seed": 1, "presencePenalty": 0.1,
      "frequencyPenalty": 0.2}),
    ({"max_tokens": 5}, {"maxOutputTokens": 5}),
    ({"max_tokens": 5, "max_completion_tokens": 7}, {"maxOutputTokens": 7}),
    ({"stop": "END"}, {"stopSequences": ["END"]}),
    ({"stop": ["a", "", "b"]}, {"stopSequences": ["a", "b"]}),
    ({"stop": None, "temperature": None}, {}),
    ({"response_format": {"type": "text"}}, {}),
    ({"response_format": {"type": "json_object"}}, {"responseMimeType": "application/json"}),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
        "additionalProperties": False}}}},
     {"responseMimeType": "application/json",
      "responseSchema": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}),
    ({"reasoning_effort": "low"}, {"thinkingConfig": {"thinkingBudget": 1024, "includeThoughts": True}}),
    ({"reasoning_effort": "none"}, {"thinkingConfig": {"thinkingBudget": 0}}),
    ({"logprobs": True, "user": "u", "parallel_tool_calls": False}, {}),
])
def test_generation_config(body, config):
    assert generation_config(body) == config


@pytest.mark.parametrize("schema,expected", [
    ({"type": "string", "$schema": "x", "additionalProperties": False, "title": "T"}, {"type": "string", "title": "T"}),
    ({"type": ["string", "null"]}, {"type": "string", "nullable": True}),
    ({"type": ["string", "integer"]}, {"anyOf": [{"type": "string"}, {"type": "integer"}]}),
    ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, {"type": "integer", "nullable": True}),
    ({"const": "x"}, {"enum": ["x"]}),
    ({"type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "$defs": {"P": {
        "type": "object", "properties": {"n": {"type": "number", "exclusiveMinimum": 0}}}}},
     {"type": "object", "properties": {"p": {"type": "object", "properties": {"n": {"type": "number"}}}}}),
    ({"type": "array", "items": {"type": "string", "default": "a"}}, {"type": "array", "items": {"type": "string",
                                                                                                "default": "a"}}),
])
def test_gemini_schema(schema, expected):
    assert gemini_schema(schema) == expected


def test_self_referencing_schema_is_400_not_a_crash():
    schema = {"$ref": "#/$defs/N", "$defs": {"N": {"type": "object", "properties": {"next": {"$ref": "#/$defs/N"}}}}}
    with pytest.raises(InvalidRequestError):
        gemini_schema(schema)


def test_function_declarations():
    tools = [{"type": "function", "function": {"name": "a", "description": "A",
                                               "parameters": {"type": "object", "properties": {}}}},
             {"type": "function", "function": {"name": "b", "parameters": {
                 "type": "object", "properties": {"x": {"type": "string"}}, "additionalProperties": False}}},
             {"googleSearch": {}}]
    assert function_declarations(tools) == [
        {"functionDeclarations": [{"name": "a", "description": "A"},
                                  {"name": "b", "parameters": {"type": "object",
                                                               "properties": {"x": {"type": "string"}}}}]},
        {"googleSearch": {}}]
    with pytest.raises(InvalidRequestError):
        function_declarations([{"type": "function", "function": {}}])


@pytest.mark.parametrize("choice,config", [
    (None, None),
    ("auto", {"functionCallingConfig": {"mode": "AUTO"}}),
    ("none", {"functionCallingConfig": {"mode": "NONE"}}),
    ("required", {"functionCallingConfig": {"mode": "ANY"}}),
    ({"type": "function", "function": {"name": "f"}}, {"functionCallingConfig": {"mode": "ANY",
                                                                                 "allowedFunctionNames": ["f"]}}),
])
def test_tool_config(choice, config):
    assert tool_config(choice) == config


def test_tool_choice_without_tools_is_not_sent():
    body = {"model": "g", "messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}
    assert "toolConfig" not in orjson.loads(P.build_request(deployment(), "chat", body, False).body)


@pytest.mark.parametrize("body,param", [
    ({"input": [1, 2, 3]}, "input"), ({"input": [[1, 2]]}, "input"), ({"input": ["a", 1]}, "input")])
def test_embeddings_need_text(body, param):
    with pytest.raises(InvalidRequestError) as info:
        P.build_request(deployment(), "embeddings", {"model": "g", **body}, False)
    assert info.value.param == param


def test_embedding_request_options():
    body = {"model": "g", "input": "hi", "dimensions": 3, "task_type": "RETRIEVAL_QUERY", "encoding_format": "float"}
    assert orjson.loads(P.build_request(deployment(), "embeddings", body, False).body) == {
        "content": {"parts": [{"text": "hi"}]}, "outputDimensionality": 3, "taskType": "RETRIEVAL_QUERY"}


@pytest.mark.parametrize("prompt", [["a", "b"], [1, 2], [[1]]])
def test_completions_take_one_text_prompt(prompt):
    with pytest.raises(InvalidRequestError) as info:
        P.build_request(deployment(), "completions", {"model": "g", "prompt": prompt}, False)
    assert info.value.param == "prompt"


# --- replies --------------------------------------------------------------------------------------

def reply_of(candidates=None, usage=None, **extra) -> UpstreamReply:
    body = {"modelVersion": "gemini-2.0-flash", "responseId": "r1", **extra}
    if candidates is not None:
        body["candidates"] = candidates
    if usage is not None:
        body["usageMetadata"] = usage
    return UpstreamReply(200, {}, orjson.dumps(body))


def candidate(parts, finish="STOP", index=0):
    return {"content": {"role": "model", "parts": parts}, "finishReason": finish, "index": index}


@pytest.mark.parametrize("finish,has_calls,expected", [
    ("STOP", False, "stop"), ("STOP", True, "tool_calls"), ("MAX_TOKENS", False, "length"),
    ("MAX_TOKENS", True, "length"), ("SAFETY", False, "content_filter"), ("RECITATION", False, "content_filter"),
    ("BLOCKLIST", False, "content_filter"), ("PROHIBITED_CONTENT", False, "content_filter"),
    ("SPII", False, "content_filter"), ("OTHER", False, "stop"), ("MALFORMED_FUNCTION_CALL", False, "stop"),
    ("FINISH_REASON_UNSPECIFIED", False, "stop"), ("A_REASON_FROM_THE_FUTURE", False, "stop"),
    (None, False, "stop"),
])
def test_finish_reasons(finish, has_calls, expected):
    parts = [{"functionCall": {"name": "f", "args": {}}}] if has_calls else [{"text": "x"}]
    out = orjson.loads(P.parse_response("chat", reply_of([candidate(parts, finish)])).body)
    assert out["choices"][0]["finish_reason"] == expected


def test_reply_with_text_thoughts_and_parallel_calls():
    parts = [{"text": "thinking...", "thought": True}, {"text": "Let me "}, {"text": "check."},
             {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
             {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}, "thoughtSignature": "c2ln"}]
    usage = {"promptTokenCount": 10, "candidatesTokenCount": 5, "thoughtsTokenCount": 3, "totalTokenCount": 18,
             "cachedContentTokenCount": 4}
    response = P.parse_response("chat", reply_of([candidate(parts)], usage))
    out = orjson.loads(response.body)
    assert out["object"] == "chat.completion" and out["id"] == "chatcmpl-r1" and out["model"] == "gemini-2.0-flash"
    message = out["choices"][0]["message"]
    assert message["content"] == "Let me check." and message["reasoning_content"] == "thinking..."
    calls = message["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_weather"]
    assert [orjson.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {"city": "Rome"}]
    assert len({c["id"] for c in calls}) == 2 and all(c["type"] == "function" and "index" not in c for c in calls)
    assert calls[1]["id"].endswith("__thought__c2ln")  # sent back as thoughtSignature next turn
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert response.usage == out["usage"] == {
        "prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18,
        "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 3}}


def test_reply_without_content_or_candidates():
    out = orjson.loads(P.parse_response("chat", reply_of([{"finishReason": "SAFETY", "index": 0}])).body)
    assert out["choices"][0]["message"] == {"role": "assistant", "content": None}
    assert out["choices"][0]["finish_reason"] == "content_filter"
    blocked = reply_of(None, {"promptTokenCount": 3, "totalTokenCount": 3}, promptFeedback={"blockReason": "SAFETY"})
    out = orjson.loads(P.parse_response("chat", blocked).body)
    assert out["choices"] == [{"index": 0, "message": {"role": "assistant", "content": None}, "logprobs": None,
                               "finish_reason": "content_filter"}]
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}


def test_several_candidates_and_completions_shape():
    reply = reply_of([candidate([{"text": "a"}], index=0), candidate([{"text": "b"}], "MAX_TOKENS", index=1)])
    out = orjson.loads(P.parse_response("completions", reply).body)
    assert out["object"] == "text_completion"
    assert out["choices"] == [{"text": "a", "index": 0, "logprobs": None, "finish_reason": "stop"},
                              {"text": "b", "index": 1, "logprobs": None, "finish_reason": "length"}]


def test_embedding_replies():
    one = P.parse_response("embeddings", UpstreamReply(200, {}, b'{"embedding": {"values": [0.1, 0.2]}}'))
    assert orjson.loads(one.body) == {"object": "list", "model": "",
                                      "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                                      "usage": {"prompt_tokens": 0, "total_tokens": 0}}
    body = b'{"embeddings": [{"values": [1]}, {"values": [2]}]}'
    batch = P.parse_response("embeddings", UpstreamReply(200, {}, body))
    assert [d["embedding"] for d in orjson.loads(batch.body)["data"]] == [[1], [2]]


def test_reply_that_is_not_json_is_502():
    with pytest.raises(Exception) as info:
        P.parse_response("chat", UpstreamReply(200, {}, b"<html>"))
    assert info.value.status == 502


# --- stream events --------------------------------------------------------------------------------

def event(parts=None, finish=None, usage=None, index=0):
    body = {"modelVersion": "gemini-2.0-flash", "responseId": "r9"}
    if parts is not None or finish:
        c = {"content": {"role": "model", "parts": parts or []}, "index": index}
        if finish:
            c["finishReason"] = finish
        body["candidates"] = [c]
    if usage:
        body["usageMetadata"] = usage
    return orjson.dumps(body)


def run_stream(events, include_usage=False, endpoint="chat"):
    state = StreamState(include_usage=include_usage)
    out = [orjson.loads(c) for e in events for c in P.parse_event(endpoint, e, state)]
    return out, state


USAGE = {"promptTokenCount": 3, "candidatesTokenCount": 2, "totalTokenCount": 5}


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_text(include_usage):
    out, state = run_stream([event([{"text": "Hel"}], usage={"promptTokenCount": 3, "totalTokenCount": 3}),
                             event([{"text": "lo"}], "STOP", USAGE)], include_usage)
    assert [c["choices"][0]["delta"] for c in out if c["choices"]] == [
        {"role": "assistant", "content": "Hel"}, {"content": "lo"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in out if c["choices"]] == [None, None, "stop"]
    assert {c["id"] for c in out} == {"chatcmpl-r9"} and {c["object"] for c in out} == {"chat.completion.chunk"}
    assert state.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5} and state.done
    if include_usage:
        assert out[-1]["choices"] == [] and out[-1]["usage"] == state.usage
        assert all(c["usage"] is None for c in out[:-1])
    else:
        assert all("usage" not in c for c in out)


def test_stream_parallel_tool_calls_across_events():
    out, _ = run_stream([event([{"text": "ok"}, {"functionCall": {"name": "a", "args": {"x": 1}}}]),
                         event([{"functionCall": {"name": "b", "args": {}}}], "STOP", USAGE)])
    calls = [t for c in out for t in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [(t["index"], t["function"]["name"], t["function"]["arguments"]) for t in calls] == [
        (0, "a", '{"x":1}'), (1, "b", "{}")]
    assert out[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_stream_thoughts_empty_events_and_completions():
    out, _ = run_stream([event([{"text": "hmm", "thought": True}]), event([{"text": ""}]),
                         event([{"text": "A"}], "STOP")])
    deltas = [c["choices"][0]["delta"] for c in out]
    assert deltas == [{"role": "assistant", "content": "", "reasoning_content": "hmm"}, {"content": "A"}, {}]
    out, _ = run_stream([event([{"text": "A"}]), event([{"text": "B"}], "MAX_TOKENS")], endpoint="completions")
    assert [(c["object"], c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in out] == [
        ("text_completion", "A", None), ("text_completion", "B", None), ("text_completion", "", "length")]


def test_stream_blocked_prompt_and_error_event():
    out, state = run_stream([orjson.dumps({"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": USAGE})],
                            include_usage=True)
    assert out[-2]["choices"][0]["finish_reason"] == "content_filter" and out[-1]["usage"]["total_tokens"] == 5
    state = StreamState()
    error = orjson.dumps({"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}})
    assert P.parse_event("chat", error, state) == []
    assert state.error.status == 503 and "overloaded" in state.error.message
    assert P.parse_event("chat", b"not json", StreamState()) == []


# --- errors ---------------------------------------------------------------------------------------

def google_error(code, message, status, details=None):
    err = {"code": code, "message": message, "status": status}
    if details:
        err["details"] = details
    return orjson.dumps({"error": err})


RETRY = [{"@type": "type.googleapis.com/google.rpc.QuotaFailure"},
         {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1.5s"}]
BAD_KEY = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}]


@pytest.mark.parametrize("status,body,headers,expected_status,type_,retry_after", [
    (400, google_error(400, "Invalid value at 'contents'", "INVALID_ARGUMENT"), {}, 400, "invalid_request_error", None),
    (400, google_error(400, "API key not valid. Please pass a valid API key.", "INVALID_ARGUMENT", BAD_KEY), {},
     401, "authentication_error", None),
    (401, google_error(401, "Request had invalid authentication credentials.", "UNAUTHENTICATED"), {}, 401,
     "authentication_error", None),
    (403, google_error(403, "Method doesn't allow unregistered callers", "PERMISSION_DENIED"), {}, 403,
     "permission_denied", None),
    (404, google_error(404, "models/x is not found for API version v1beta", "NOT_FOUND"), {}, 404,
     "not_found_error", None),
    (429, google_error(429, "You exceeded your current quota", "RESOURCE_EXHAUSTED", RETRY), {}, 429,
     "rate_limit_error", "2"),
    (429, google_error(429, "Resource has been exhausted", "RESOURCE_EXHAUSTED", RETRY), {"Retry-After": "9"}, 429,
     "rate_limit_error", "9"),
    (429, google_error(429, "Resource has been exhausted", "RESOURCE_EXHAUSTED"), {}, 429, "rate_limit_error", None),
    (500, google_error(500, "An internal error has occurred.", "INTERNAL"), {}, 500, "api_error", None),
    (503, google_error(503, "The model is overloaded.", "UNAVAILABLE"), {}, 503, "service_unavailable", None),
    (504, google_error(504, "Deadline expired", "DEADLINE_EXCEEDED"), {}, 504, "api_error", None),
    (502, b"<html>Bad Gateway</html>", {}, 502, "api_error", None),
    (400, b'[{"error": {"code": 400, "message": "wrapped in a list", "status": "INVALID_ARGUMENT"}}]', {}, 400,
     "invalid_request_error", None),
])
def test_errors(status, body, headers, expected_status, type_, retry_after):
    err = P.parse_error(UpstreamReply(status, headers, body), deployment(api_key=KEY))
    assert (err.status, err.type) == (expected_status, type_)
    assert err.message.startswith("GeminiException - gemini/gemini-2.0-flash: ")
    assert err.headers == ({"retry-after": retry_after} if retry_after else {})
    assert err.to_body()["error"]["code"] == str(expected_status)


def test_error_never_carries_the_key():
    body = google_error(400, f"API key not valid: {KEY}", "INVALID_ARGUMENT")
    err = P.parse_error(UpstreamReply(400, {}, body), deployment(api_key=KEY))
    assert KEY not in err.message and KEY not in orjson.dumps(err.to_body()).decode()
