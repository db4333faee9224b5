"""``ollama/`` and ``ollama_chat/``: OpenAI <-> Ollama translation (requests, replies, NDJSON
stream events, errors), table-driven and without servers."""

import orjson
import pytest

from tornado_proxy.config import ModelSpec
from tornado_proxy.errors import InvalidRequestError
from tornado_proxy.providers import PROVIDERS
from tornado_proxy.providers.base import StreamState, UpstreamReply
from tornado_proxy.providers.ollama import (DEFAULT_BASE, NdjsonParser, OllamaChatProvider, OllamaProvider,
                                            chat_messages, common_fields, generate_prompt)
from tornado_proxy.registry import build_deployment

GEN, CHAT = OllamaProvider(), OllamaChatProvider()
KEY = "ollama-secret-for-unit-tests"


def deployment(model="ollama_chat/llama3.2", environ=None, **params):
    return build_deployment(ModelSpec("group", {"model": model, **params}, {}, "model_list[0]"), environ or {})


def call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def sent(provider, endpoint, body, stream=False, d=None):
    req = provider.build_request(d or deployment(), endpoint, {"model": "group", **body}, stream)
    return req, orjson.loads(req.body)


# --- set-up and URLs ------------------------------------------------------------------------------

def test_registered_with_defaults():
    assert isinstance(PROVIDERS["ollama"], OllamaProvider) and not isinstance(PROVIDERS["ollama"], OllamaChatProvider)
    assert isinstance(PROVIDERS["ollama_chat"], OllamaChatProvider)
    d = deployment()
    assert d.problem is None and d.api_base == DEFAULT_BASE == "http://localhost:11434" and d.api_key is None
    d = deployment("ollama/llama3", environ={"OLLAMA_API_BASE": "http://gpu:11434", "OLLAMA_API_KEY": KEY})
    assert d.api_base == "http://gpu:11434" and d.api_key.reveal() == KEY


@pytest.mark.parametrize("provider,endpoint,body,path", [
    (CHAT, "chat", {"messages": [{"role": "user", "content": "x"}]}, "/api/chat"),
    (GEN, "chat", {"messages": [{"role": "user", "content": "x"}]}, "/api/generate"),
    (GEN, "completions", {"prompt": "x"}, "/api/generate"),
    (CHAT, "completions", {"prompt": ["x"]}, "/api/generate"),
    (GEN, "embeddings", {"input": "x"}, "/api/embed"),
    (CHAT, "embeddings", {"input": ["x", "y"]}, "/api/embed"),
])
def test_paths(provider, endpoint, body, path):
    req, _ = sent(provider, endpoint, body, d=deployment(api_base="http://box:11434/"))
    assert req.url == "http://box:11434" + path and req.method == "POST"
    assert req.headers == {"Content-Type": "application/json"}


def test_key_is_a_bearer_header_when_configured():
    req, _ = sent(CHAT, "chat", {"messages": [{"role": "user", "content": "x"}]}, d=deployment(api_key=KEY))
    assert req.headers["Authorization"] == "Bearer " + KEY and KEY not in req.url


@pytest.mark.parametrize("stream", [False, True])
def test_stream_flag_is_always_sent(stream):  # Ollama streams when it is left out
    assert sent(CHAT, "chat", {"messages": [{"role": "user", "content": "x"}]}, stream)[1]["stream"] is stream
    assert sent(GEN, "completions", {"prompt": "x"}, stream)[1]["stream"] is stream


# --- options and formats --------------------------------------------------------------------------

@pytest.mark.parametrize("body,fields", [
    ({}, {}),
    ({"temperature": 0.2, "top_p": 0.9, "top_k": 5, "seed": 1, "presence_penalty": 0.3, "frequency_penalty": 0.4},
     {"options": {"temperature": 0.2, "top_p": 0.9, "top_k": 5, "seed": 1, "presence_penalty": 0.3,
                  "frequency_penalty": 0.4}}),
    ({"max_tokens": 10}, {"options": {"num_predict": 10}}),
    ({"max_tokens": 10, "max_completion_tokens": 20}, {"options": {"num_predict": 20}}),
    ({"stop": "###"}, {"options": {"stop": ["###"]}}),
    ({"num_ctx": 8192, "options": {"num_gpu": 1}}, {"options": {"num_ctx": 8192, "num_gpu": 1}}),
    ({"response_format": {"type": "json_object"}}, {"format": "json"}),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
     {"format": {"type": "object"}}),
    ({"response_format": {"type": "text"}}, {}),
    ({"format": "json"}, {"format": "json"}),
    ({"keep_alive": "5m"}, {"keep_alive": "5m"}),
    ({"reasoning_effort": "high"}, {"think": True}),
    ({"reasoning_effort": "none"}, {"think": False}),
    ({"n": 2, "user": "u", "logprobs": True, "tool_choice": "auto"}, {}),
])
def test_common_fields(body, fields):
    assert common_fields("m", body, False) == {"model": "m", "stream": False, **fields}


def test_config_defaults_apply_and_client_wins():
    d = deployment(temperature=0.3, max_tokens=9)
    _, body = sent(CHAT, "chat", {"messages": [{"role": "user", "content": "x"}], "temperature": 0.9}, d=d)
    assert body["options"] == {"temperature": 0.9, "num_predict": 9}


# --- /api/chat messages ---------------------------------------------------------------------------

PNG = "data:image/png;base64,iVBORw0KGgo="


@pytest.mark.parametrize("messages,expected", [
    pytest.param([{"role": "user", "content": "hi"}], [{"role": "user", "content": "hi"}], id="plain"),
    pytest.param([{"role": "system", "content": "a"}, {"role": "developer", "content": "b"},
                  {"role": "user", "content": None}],
                 [{"role": "system", "content": "a"}, {"role": "system", "content": "b"},
                  {"role": "user", "content": ""}], id="several-system-and-empty"),
    pytest.param([{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"},
                                               {"type": "image_url", "image_url": {"url": PNG}}]}],
                 [{"role": "user", "content": "one\ntwo", "images": ["iVBORw0KGgo="]}], id="parts-and-images"),
    pytest.param([{"role": "assistant", "content": None, "reasoning_content": "hmm", "tool_calls": [
                      call("c1", "get_weather", '{"city": "Paris"}'), call("c2", "get_time", "")]},
                  {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                  {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "noon"}]},
                  {"role": "tool", "tool_call_id": "unknown", "content": "?"},
                  {"role": "function", "name": "legacy", "content": "x"}],
                 [{"role": "assistant", "content": "", "thinking": "hmm", "tool_calls": [
                     {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                     {"function": {"name": "get_time", "arguments": {}}}]},
                  {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
                  {"role": "tool", "content": "noon", "tool_name": "get_time"},
                  {"role": "tool", "content": "?"},
                  {"role": "tool", "content": "x", "tool_name": "legacy"}], id="parallel-tool-calls"),
])
def test_chat_messages(messages, expected):
    assert chat_messages(messages) == expected


@pytest.mark.parametrize("messages,param", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/a.png"}}]}],
     "messages[0].content[0].image_url"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], "messages[0].content[0].type"),
    ([{"role": "assistant", "tool_calls": [call("c", "f", "not json")]}],
     "messages[0].tool_calls[0].function.arguments"),
])
def test_bad_messages_are_400(messages, param):
    with pytest.raises(InvalidRequestError) as info:
        chat_messages(messages)
    assert info.value.param == param


def test_chat_tools_pass_through_without_tool_choice():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    _, body = sent(CHAT, "chat", {"messages": [{"role": "user", "content": "x"}], "tools": tools,
                                  "tool_choice": "required", "parallel_tool_calls": False})
    assert body["tools"] == tools and "tool_choice" not in body and "parallel_tool_calls" not in body


# --- /api/generate prompts ------------------------------------------------------------------------

@pytest.mark.parametrize("messages,prompt,images", [
    ([{"role": "user", "content": "hi"}], "### User:\nhi\n\n", []),
    ([{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "yo"}, {"role": "user", "content": ""}, {"role": "user", "content": "more"}],
     "### System:\na\nb\n\n### User:\nhi\n\n### Assistant:\nyo\n\n### User:\nmore\n\n", []),
    ([{"role": "user", "content": [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": PNG}}]}],
     "### User:\nsee\n\n", ["iVBORw0KGgo="]),
    ([{"role": "user", "content": "w?"}, {"role": "assistant", "content": None, "tool_calls": [call("c", "f", "{}")]},
      {"role": "tool", "tool_call_id": "c", "content": "sunny"}],
     ('### User:\nw?\n\n### Assistant:\nTool Calls: [\n  {\n    "type": "function",\n    "function": {\n'
      '      "name": "f",\n      "arguments": {}\n    }\n  }\n]\n\n### User:\nsunny\n\n'), []),
])
def test_generate_prompt(messages, prompt, images):
    assert generate_prompt(messages) == (prompt, images)


def test_generate_refuses_tools_and_takes_images():
    with pytest.raises(InvalidRequestError) as info:
        sent(GEN, "chat", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]})
    assert info.value.param == "tools"
    _, body = sent(GEN, "chat", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": PNG}}]}]})
    assert body["images"] == ["iVBORw0KGgo="]


@pytest.mark.parametrize("body,param", [({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [1, 2]}, "prompt")])
def test_completions_take_one_text_prompt(body, param):
    with pytest.raises(InvalidRequestError) as info:
        sent(GEN, "completions", body)
    assert info.value.param == param


@pytest.mark.parametrize("inputs", [[1, 2], [[1, 2]], ["a", 3]])
def test_embeddings_need_text(inputs):
    with pytest.raises(InvalidRequestError) as info:
        sent(GEN, "embeddings", {"input": inputs})
    assert info.value.param == "input"


def test_embedding_request():
    assert sent(GEN, "embeddings", {"input": ["a"], "dimensions": 4, "encoding_format": "float"})[1] == {
        "model": "llama3.2", "input": ["a"], "dimensions": 4}


# --- replies --------------------------------------------------------------------------------------

def reply(obj) -> UpstreamReply:
    return UpstreamReply(200, {}, orjson.dumps({"model": "llama3.2", "created_at": "2025-01-01T00:00:00Z", **obj}))


FINAL = {"done": True, "prompt_eval_count": 7, "eval_count": 3}


@pytest.mark.parametrize("obj,endpoint,choice", [
    ({"message": {"role": "assistant", "content": "hi"}, "done_reason": "stop", **FINAL}, "chat",
     {"index": 0, "message": {"role": "assistant", "content": "hi"}, "logprobs": None, "finish_reason": "stop"}),
    ({"message": {"role": "assistant", "content": ""}, "done_reason": "length", **FINAL}, "chat",
     {"index": 0, "message": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": "length"}),
    ({"message": {"role": "assistant", "content": "x"}, "done_reason": "unload", **FINAL}, "chat",
     {"index": 0, "message": {"role": "assistant", "content": "x"}, "logprobs": None, "finish_reason": "stop"}),
    ({"message": {"role": "assistant", "content": "x", "thinking": "hmm"}, **FINAL}, "chat",
     {"index": 0, "message": {"role": "assistant", "content": "x", "reasoning_content": "hmm"}, "logprobs": None,
      "finish_reason": "stop"}),
    ({"response": "gen", "done_reason": "stop", **FINAL}, "chat",
     {"index": 0, "message": {"role": "assistant", "content": "gen"}, "logprobs": None, "finish_reason": "stop"}),
    ({"response": "gen", "done_reason": "length", **FINAL}, "completions",
     {"text": "gen", "index": 0, "logprobs": None, "finish_reason": "length"}),
])
def test_replies(obj, endpoint, choice):
    response = GEN.parse_response(endpoint, reply(obj))
    out = orjson.loads(response.body)
    assert out["choices"] == [choice] and out["model"] == "llama3.2"
    assert out["object"] == ("text_completion" if endpoint == "completions" else "chat.completion")
    assert response.usage == out["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def test_reply_with_parallel_tool_calls():
    calls = [{"function": {"name": "a", "arguments": {"x": 1}}},
             {"id": "call_x", "function": {"name": "b", "arguments": {}}}]
    out = orjson.loads(CHAT.parse_response("chat", reply({"message": {"role": "assistant", "content": "",
                                                                      "tool_calls": calls}, "done_reason": "stop",
                                                          **FINAL})).body)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    got = choice["message"]["tool_calls"]
    assert [(c["type"], c["function"]["name"], c["function"]["arguments"]) for c in got] == [
        ("function", "a", '{"x":1}'), ("function", "b", "{}")]
    assert got[0]["id"].startswith("call_") and got[1]["id"] == "call_x"


def test_embedding_reply():
    response = GEN.parse_response("embeddings", reply({"embeddings": [[0.1], [0.2]], "prompt_eval_count": 4}))
    assert orjson.loads(response.body) == {"object": "list", "model": "llama3.2", "data": [
        {"object": "embedding", "index": 0, "embedding": [0.1]},
        {"object": "embedding", "index": 1, "embedding": [0.2]}],
        "usage": {"prompt_tokens": 4, "total_tokens": 4}}


# --- NDJSON streams -------------------------------------------------------------------------------

def test_ndjson_parser_splits_lines_across_chunks():
    parser = NdjsonParser()
    assert [e.data for e in parser.feed(b'{"a":1}\n{"b"')] == [b'{"a":1}']
    assert [e.data for e in parser.feed(b':2}\r\n\n  \n{"c":3}')] == [b'{"b":2}']
    assert [e.data for e in parser.feed(b"\n\n")] == [b'{"c":3}']  # how the gateway flushes at the end
    assert parser.feed(b'{"d":4}') == [] and [e.data for e in parser.close()] == [b'{"d":4}']
    assert parser.close() == []


def line(obj) -> bytes:
    return orjson.dumps({"model": "llama3.2", "created_at": "2025-01-01T00:00:00Z", **obj})


def run_stream(lines, include_usage=False, endpoint="chat", provider=CHAT):
    state = StreamState(include_usage=include_usage)
    return [orjson.loads(c) for x in lines for c in provider.parse_event(endpoint, x, state)], state


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_chat(include_usage):
    out, state = run_stream([line({"message": {"role": "assistant", "content": "Hel"}, "done": False}),
                             line({"message": {"role": "assistant", "content": "lo"}, "done": False}),
                             line({"message": {"role": "assistant", "content": ""}, "done_reason": "stop", **FINAL})],
                            include_usage)
    assert [c["choices"][0]["delta"] for c in out if c["choices"]] == [
        {"role": "assistant", "content": "Hel"}, {"content": "lo"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in out if c["choices"]] == [None, None, "stop"]
    assert len({c["id"] for c in out}) == 1 and {c["model"] for c in out} == {"llama3.2"}
    assert state.done and state.usage == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert (out[-1]["choices"] == [] and out[-1]["usage"] == state.usage) if include_usage else "usage" not in out[-1]


def test_stream_tool_calls_and_thinking():
    out, _ = run_stream([
        line({"message": {"role": "assistant", "content": "", "thinking": "hmm"}, "done": False}),
        line({"message": {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "a", "arguments": {"x": 1}}}]}, "done": False}),
        line({"message": {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "b", "arguments": {}}}]}, "done": False}),
        line({"message": {"role": "assistant", "content": ""}, "done_reason": "stop", **FINAL})])
    assert out[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "reasoning_content": "hmm"}
    calls = [t for c in out for t in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [(t["index"], t["function"]["name"], t["function"]["arguments"]) for t in calls] == [
        (0, "a", '{"x":1}'), (1, "b", "{}")]
    assert out[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_stream_generate_and_completions():
    lines = [line({"response": "A", "done": False}), line({"response": "", "done_reason": "length", **FINAL})]
    out, _ = run_stream(lines, provider=GEN)
    assert [c["choices"][0]["delta"] for c in out] == [{"role": "assistant", "content": "A"}, {}]
    out, _ = run_stream(lines, endpoint="completions", provider=GEN)
    assert [(c["object"], c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in out] == [
        ("text_completion", "A", None), ("text_completion", "", "length")]


def test_stream_error_line():
    state = StreamState()
    assert CHAT.parse_event("chat", b'{"error": "an error was encountered while running the model"}', state) == []
    assert state.error.status == 500 and "encountered while running" in state.error.message
    assert CHAT.parse_event("chat", b"garbage", StreamState()) == []


# --- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("status,body,type_,text", [
    (404, b'{"error": "model \\"llama9\\" not found, try pulling it first"}', "not_found_error",
     'model "llama9" not found'),
    (400, b'{"error": "json: cannot unmarshal array into Go struct field"}', "invalid_request_error",
     "cannot unmarshal"),
    (401, b'{"error": "unauthorized"}', "authentication_error", "unauthorized"),
    (500, b'{"error": "llama runner process has terminated"}', "api_error", "runner process"),
    (503, b'{"error": "server busy, please try again."}', "service_unavailable", "server busy"),
    (502, b"Bad Gateway", "api_error", "Bad Gateway"),
])
def test_errors(status, body, type_, text):
    err = CHAT.parse_error(UpstreamReply(status, {}, body), deployment(api_key=KEY))
    assert (err.status, err.type) == (status, type_)
    assert err.message.startswith("OllamaException - ollama_chat/llama3.2: ") and text in err.message


def test_error_never_carries_the_key():
    err = GEN.parse_error(UpstreamReply(401, {}, orjson.dumps({"error": f"bad token {KEY}"})),
                          deployment("ollama/llama3", api_key=KEY))
    assert KEY not in err.message
