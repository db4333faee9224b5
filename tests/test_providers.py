"""Provider adapters: pure translation, tested without servers."""

import base64
import struct

import orjson
import pytest

from tornado_proxy.config import ModelSpec, Secret
from tornado_proxy.errors import InvalidRequestError, RateLimitError, UpstreamError, UpstreamTimeoutError
from tornado_proxy.providers import PROVIDERS, provider_for, split_model
from tornado_proxy.providers.anthropic import AnthropicProvider
from tornado_proxy.providers.base import Deployment, StreamState, UpstreamReply
from tornado_proxy.providers.mock import EMBEDDING_DIMENSIONS, MockProvider
from tornado_proxy.providers.openai import OpenAIProvider, OpenRouterProvider
from tornado_proxy.registry import build_deployment

KEY = "sk-provider-secret-for-unit-tests"
USER = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": "hello big world"}]


def deployment(model="openai/gpt-4o-mini", environ=None, **params) -> Deployment:
    spec = ModelSpec("group", {"model": model, **params}, {}, "model_list[0]")
    return build_deployment(spec, environ or {})


def sent_body(req) -> dict:
    return orjson.loads(req.body)


# --- split_model -------------------------------------------------------------------------

@pytest.mark.parametrize("model,custom,expected", [
    ("gpt-4o", None, ("openai", "gpt-4o")),
    ("openai/gpt-4o", None, ("openai", "gpt-4o")),
    ("openrouter/openai/gpt-3.5-turbo", None, ("openrouter", "openai/gpt-3.5-turbo")),
    ("openrouter/meta-llama/llama-3-70b-instruct", None, ("openrouter", "meta-llama/llama-3-70b-instruct")),
    ("hosted_vllm/Qwen/Qwen2-7B", None, ("hosted_vllm", "Qwen/Qwen2-7B")),
    ("mock/demo", None, ("mock", "demo")),
    ("groq/llama3-8b-8192", None, ("groq", "llama3-8b-8192")),
    ("anthropic/claude-3-haiku", None, ("anthropic", "claude-3-haiku")),
    ("my-model", "openai", ("openai", "my-model")),
    ("openai/my-model", "openai", ("openai", "my-model")),
    ("org/model", "hosted_vllm", ("hosted_vllm", "org/model")),
])
def test_split_model(model, custom, expected):
    assert split_model(model, custom) == expected


def test_provider_for():
    assert isinstance(provider_for(deployment()), OpenAIProvider)
    assert isinstance(provider_for(deployment("openrouter/openai/gpt-3.5-turbo")), OpenRouterProvider)
    assert isinstance(provider_for(deployment("mock/demo")), MockProvider)
    assert isinstance(provider_for(deployment("anthropic/claude-3")), AnthropicProvider)
    assert provider_for(deployment("bedrock/anthropic.claude-3")) is None


# --- OpenAIProvider.build_request --------------------------------------------------------

def test_build_request_rewrites_model_and_keeps_every_parameter():
    d = deployment(api_base="http://127.0.0.1:9/v1/", api_key=KEY)
    body = {"model": "group", "messages": USER, "temperature": 0.2, "max_tokens": 7, "seed": 42,
            "stop": ["\n"], "n": 2, "logprobs": True, "top_logprobs": 2, "user": "u-1",
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "tool_choice": "auto", "response_format": {"type": "json_object"},
            "stream_options": {"include_usage": True}, "some_future_param": {"x": [1]}}
    req = OpenAIProvider().build_request(d, "chat", body, stream=True)
    assert req.method == "POST"
    assert req.url == "http://127.0.0.1:9/v1/chat/completions"
    assert req.headers["Authorization"] == "Bearer " + KEY
    assert req.headers["Content-Type"] == "application/json"
    assert sent_body(req) == {**body, "model": "gpt-4o-mini"}
    assert body["model"] == "group"  # the caller's dict is not modified


@pytest.mark.parametrize("endpoint,path", [("chat", "/chat/completions"), ("completions", "/completions"),
                                           ("embeddings", "/embeddings")])
def test_build_request_paths(endpoint, path):
    d = deployment(api_base="https://example.test/api/v1")
    assert OpenAIProvider().build_request(d, endpoint, {"model": "g"}, stream=False).url == \
        "https://example.test/api/v1" + path


def test_build_request_drops_proxy_only_fields():
    d = deployment(api_base="http://h/v1", api_key=KEY)
    body = {"model": "g", "messages": USER, "mock_response": "hi", "api_key": "sk-client", "fallbacks": ["x"],
            "num_retries": 3, "caching": True}
    sent = sent_body(OpenAIProvider().build_request(d, "chat", body, stream=False))
    assert sent == {"model": "gpt-4o-mini", "messages": USER}


def test_config_defaults_apply_but_the_client_wins():
    d = deployment(api_base="http://h/v1", temperature=0.9, max_tokens=100)
    sent = sent_body(OpenAIProvider().build_request(d, "chat", {"model": "g", "messages": USER,
                                                                "temperature": 0.1}, stream=False))
    assert sent["temperature"] == 0.1 and sent["max_tokens"] == 100


def test_no_key_means_no_authorization_header():
    d = deployment(api_base="http://h/v1")
    assert "Authorization" not in OpenAIProvider().build_request(d, "chat", {"model": "g"}, stream=False).headers


def test_key_from_environment_when_config_gives_none():
    d = deployment(environ={"OPENAI_API_KEY": KEY})
    req = OpenAIProvider().build_request(d, "chat", {"model": "g"}, stream=False)
    assert req.url == "https://api.openai.com/v1/chat/completions"
    assert req.headers["Authorization"] == "Bearer " + KEY


def test_extra_headers_from_config():
    d = deployment(api_base="http://h/v1", extra_headers={"X-Custom": "1"})
    assert OpenAIProvider().build_request(d, "chat", {"model": "g"}, stream=False).headers["X-Custom"] == "1"


def test_mistral_renames_seed():
    d = deployment("mistral/mistral-small", api_key=KEY)
    req = PROVIDERS["mistral"].build_request(d, "chat", {"model": "g", "seed": 5}, stream=False)
    assert req.url == "https://api.mistral.ai/v1/chat/completions"
    assert sent_body(req) == {"model": "mistral-small", "random_seed": 5}


@pytest.mark.parametrize("model,base", [
    ("groq/llama3", "https://api.groq.com/openai/v1"),
    ("deepseek/deepseek-chat", "https://api.deepseek.com/v1"),
    ("together_ai/meta/llama", "https://api.together.xyz/v1"),
])
def test_compatible_default_bases(model, base):
    d = deployment(model)
    req = provider_for(d).build_request(d, "chat", {"model": "g"}, stream=False)
    assert req.url == base + "/chat/completions"
    assert sent_body(req)["model"] == split_model(model)[1]


# --- OpenRouter --------------------------------------------------------------------------

def test_openrouter_request():
    d = deployment("openrouter/openai/gpt-3.5-turbo", environ={"OPENROUTER_API_KEY": KEY,
                                                                "OR_SITE_URL": "https://my.site",
                                                                "OR_APP_NAME": "My App"})
    req = provider_for(d).build_request(d, "chat", {"model": "g", "messages": USER}, stream=True)
    assert req.url == "https://openrouter.ai/api/v1/chat/completions"
    assert sent_body(req)["model"] == "openai/gpt-3.5-turbo"
    assert req.headers["HTTP-Referer"] == "https://my.site"
    assert req.headers["X-Title"] == "My App"
    assert req.headers["Authorization"] == "Bearer " + KEY


def test_openrouter_header_defaults_match_litellm():
    headers = OpenRouterProvider().defaults({}).headers
    assert headers == {"HTTP-Referer": "https://litellm.ai", "X-Title": "liteLLM"}


def test_openrouter_api_base_from_config_wins():
    d = deployment("openrouter/openai/gpt-3.5-turbo", api_base="http://127.0.0.1:9/api/v1")
    assert provider_for(d).build_request(d, "chat", {"model": "g"}, stream=False).url == \
        "http://127.0.0.1:9/api/v1/chat/completions"


# --- parse_response / parse_event ---------------------------------------------------------

def test_parse_response_passes_bytes_and_reads_usage():
    body = orjson.dumps({"id": "x", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    out = OpenAIProvider().parse_response("chat", UpstreamReply(200, {}, body))
    assert out.body == body
    assert out.usage == {"prompt_tokens": 3, "completion_tokens": 4}


def test_parse_response_not_json_is_a_502():
    with pytest.raises(UpstreamError) as info:
        OpenAIProvider().parse_response("chat", UpstreamReply(200, {}, b"<html>oops</html>"))
    assert info.value.status == 502


def test_parse_event_passes_chunks_and_tracks_usage_and_done():
    p, state = OpenAIProvider(), StreamState(include_usage=True)
    chunk = b'{"choices":[{"delta":{"content":"hi"}}],"usage":null}'
    assert p.parse_event("chat", chunk, state) == [chunk]
    assert state.usage is None
    usage_chunk = b'{"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":5,"total_tokens":7}}'
    assert p.parse_event("chat", usage_chunk, state) == [usage_chunk]
    assert state.usage == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
    assert not state.done
    assert p.parse_event("chat", b"[DONE]", state) == []
    assert state.done and state.chunks == 2


def test_stream_usage_is_always_asked_for_and_hidden_unless_the_client_asked():
    p = OpenAIProvider()
    d = Deployment(id="x", model_name="m", provider="openai", model="gpt-4o-mini", api_base="http://h/v1")
    for endpoint in ("chat", "completions"):
        sent = orjson.loads(p.build_request(d, endpoint, {"model": "m", "stream": True}, stream=True).body)
        assert sent["stream_options"] == {"include_usage": True}
    asked = {"model": "m", "stream": True, "stream_options": {"include_usage": False, "other": 1}}
    assert orjson.loads(p.build_request(d, "chat", asked, stream=True).body)["stream_options"] == {
        "include_usage": True, "other": 1}
    assert "stream_options" not in orjson.loads(p.build_request(d, "chat", {"model": "m"}, stream=False).body)
    state = StreamState(include_usage=False)
    chunk = b'{"choices":[{"delta":{"content":"hi"}}],"usage":null}'
    assert p.parse_event("chat", chunk, state) == [b'{"choices":[{"delta":{"content":"hi"}}]}']
    usage_chunk = b'{"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":5,"total_tokens":7}}'
    assert p.parse_event("chat", usage_chunk, state) == []
    assert state.usage == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
    # a provider that puts usage on a chunk with choices: relayed as it came
    last = b'{"choices":[{"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"total_tokens":1}}'
    assert p.parse_event("chat", last, state) == [last]
    assert state.usage == {"prompt_tokens": 1, "total_tokens": 1}


def test_parse_event_refuses_non_json_data():
    # issue 9 item 12: an event that is not a JSON object ends the stream as an upstream error
    state = StreamState()
    assert OpenAIProvider().parse_event("chat", b'not json "usage"', state) == []
    assert state.usage is None and state.error is not None and state.error.status == 502


# --- parse_error ----------------------------------------------------------------------------

def openai_error(message, type_="invalid_request_error", param=None, code=None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


@pytest.mark.parametrize("status,type_", [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_denied"),
    (404, "not_found_error"), (429, "rate_limit_error"), (500, "api_error"), (502, "api_error"),
    (503, "service_unavailable")])
def test_parse_error_keeps_status_and_maps_type(status, type_):
    d = deployment(api_base="http://h/v1", api_key=KEY)
    err = OpenAIProvider().parse_error(UpstreamReply(status, {}, openai_error("Boom.", param="messages")), d)
    assert err.status == status
    body = err.to_body()["error"]
    assert body["type"] == type_ and body["code"] == str(status)
    assert "Boom." in body["message"] and "gpt-4o-mini" in body["message"]
    assert body["param"] == "messages"
    assert err.retryable == (status == 429 or status >= 500)


def test_parse_error_keeps_retry_after_only():
    d = deployment(api_base="http://h/v1")
    err = OpenAIProvider().parse_error(UpstreamReply(429, {"Retry-After": "7", "Set-Cookie": "a=b",
                                                           "x-request-id": "r"}, openai_error("slow")), d)
    assert err.headers == {"Retry-After": "7"}


def test_parse_error_never_echoes_the_key():
    d = deployment(api_base="http://h/v1", api_key=KEY)
    body = openai_error(f"Incorrect API key provided: {KEY}. You can find your key ...")
    err = OpenAIProvider().parse_error(UpstreamReply(401, {}, body), d)
    assert KEY not in orjson.dumps(err.to_body()).decode()
    assert "Incorrect API key provided" in err.message


def test_parse_error_plain_text_and_empty_bodies():
    d = deployment(api_base="http://h/v1")
    assert "upstream exploded" in OpenAIProvider().parse_error(UpstreamReply(500, {}, b"upstream exploded"), d).message
    err = OpenAIProvider().parse_error(UpstreamReply(502, {}, b""), d)
    assert err.status == 502 and err.message


def test_parse_error_other_shapes():
    d = deployment(api_base="http://h/v1")
    assert "bad thing" in OpenAIProvider().parse_error(UpstreamReply(422, {}, b'{"detail":"bad thing"}'), d).message
    assert "plain" in OpenAIProvider().parse_error(UpstreamReply(400, {}, b'{"error":"plain"}'), d).message


def test_parse_error_truncates_huge_bodies():
    d = deployment(api_base="http://h/v1")
    err = OpenAIProvider().parse_error(UpstreamReply(500, {}, b"x" * 100_000), d)
    assert len(err.message) < 3000


# --- mock provider ----------------------------------------------------------------------------

def mock_d(**params) -> Deployment:
    return deployment("mock/demo", **params)


def stable(obj: bytes) -> dict:
    out = orjson.loads(obj)
    out.pop("id", None)
    out.pop("created", None)
    return out


def test_mock_chat_echoes_last_user_message_deterministically():
    m = MockProvider()
    body = {"model": "demo", "messages": USER}
    a, b = m.respond(mock_d(), "chat", body), m.respond(mock_d(), "chat", body)
    assert stable(a.body) == stable(b.body)
    parsed = orjson.loads(a.body)
    assert parsed["object"] == "chat.completion"
    assert parsed["model"] == "demo"
    assert parsed["choices"][0]["message"] == {"role": "assistant", "content": "hello big world"}
    assert a.usage == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def test_mock_content_parts_and_n():
    body = {"model": "demo", "n": 3, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "parts"}, {"type": "image_url", "image_url": {}},
                                     {"type": "text", "text": "work"}]}]}
    parsed = orjson.loads(MockProvider().respond(mock_d(), "chat", body).body)
    assert [c["message"]["content"] for c in parsed["choices"]] == ["parts work"] * 3


def test_mock_response_field_and_deployment_param():
    m = MockProvider()
    reply = m.respond(mock_d(), "chat", {"model": "demo", "messages": USER, "mock_response": "hi"})
    assert orjson.loads(reply.body)["choices"][0]["message"]["content"] == "hi"
    reply = m.respond(mock_d(mock_response="from config"), "chat", {"model": "demo", "messages": USER})
    assert orjson.loads(reply.body)["choices"][0]["message"]["content"] == "from config"


@pytest.mark.parametrize("name,kind,status", [
    ("litellm.RateLimitError", RateLimitError, 429), ("litellm.Timeout", UpstreamTimeoutError, 408),
    ("litellm.InternalServerError", UpstreamError, 500), ("litellm.BadRequestError", InvalidRequestError, 400)])
def test_mock_response_errors(name, kind, status):
    with pytest.raises(kind) as info:
        MockProvider().respond(mock_d(), "chat", {"model": "demo", "messages": USER, "mock_response": name})
    assert info.value.status == status


def test_mock_legacy_completion():
    parsed = orjson.loads(MockProvider().respond(mock_d(), "completions", {"model": "demo", "prompt": "say this"}).body)
    assert parsed["object"] == "text_completion"
    assert parsed["choices"][0]["text"] == "say this"


def test_mock_stream_word_by_word():
    chunks, usage = MockProvider().stream(mock_d(), "chat", {"model": "demo", "messages": USER, "stream": True})
    parsed = [orjson.loads(c) for c in chunks]
    deltas = [p["choices"][0]["delta"].get("content") for p in parsed]
    assert deltas == ["", "hello ", "big ", "world", None]
    assert parsed[0]["choices"][0]["delta"]["role"] == "assistant"
    assert parsed[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(p["object"] == "chat.completion.chunk" and "usage" not in p for p in parsed)
    assert len({p["id"] for p in parsed}) == 1
    assert usage["completion_tokens"] == 3


def test_mock_stream_include_usage():
    chunks, usage = MockProvider().stream(mock_d(), "chat", {"model": "demo", "messages": USER, "stream": True,
                                                             "stream_options": {"include_usage": True}})
    parsed = [orjson.loads(c) for c in chunks]
    assert parsed[-1]["choices"] == [] and parsed[-1]["usage"] == usage
    assert all(p["usage"] is None for p in parsed[:-1])


def test_mock_stream_is_deterministic():
    body = {"model": "demo", "messages": USER, "stream": True}
    a, _ = MockProvider().stream(mock_d(), "chat", body)
    b, _ = MockProvider().stream(mock_d(), "chat", body)
    assert [stable(c) for c in a] == [stable(c) for c in b]


def test_mock_completions_stream():
    chunks, _ = MockProvider().stream(mock_d(), "completions", {"model": "demo", "prompt": "a b", "stream": True})
    assert "".join(orjson.loads(c)["choices"][0]["text"] for c in chunks) == "a b"


def test_mock_embeddings_float_and_base64_agree():
    m = MockProvider()
    floats = orjson.loads(m.respond(mock_d(), "embeddings", {"model": "demo", "input": ["a", "b"]}).body)
    assert [len(x["embedding"]) for x in floats["data"]] == [EMBEDDING_DIMENSIONS] * 2
    assert floats["data"][0]["embedding"] != floats["data"][1]["embedding"]
    again = orjson.loads(m.respond(mock_d(), "embeddings", {"model": "demo", "input": "a"}).body)
    assert again["data"][0]["embedding"] == floats["data"][0]["embedding"]
    b64 = orjson.loads(m.respond(mock_d(), "embeddings", {"model": "demo", "input": "a",
                                                          "encoding_format": "base64"}).body)
    raw = base64.b64decode(b64["data"][0]["embedding"])
    decoded = struct.unpack(f"<{EMBEDDING_DIMENSIONS}f", raw)
    assert decoded == pytest.approx(floats["data"][0]["embedding"], abs=1e-6)


def test_mock_embedding_dimensions():
    out = orjson.loads(MockProvider().respond(mock_d(), "embeddings",
                                              {"model": "demo", "input": "x", "dimensions": 4}).body)
    assert len(out["data"][0]["embedding"]) == 4


def test_mock_is_local():
    assert MockProvider.local and not OpenAIProvider.local


def test_secret_never_prints():
    s = Secret(KEY)
    assert KEY not in repr(s) and KEY not in str(s) and KEY not in f"{s}"
    assert KEY not in repr(deployment(api_base="http://h/v1", api_key=KEY))
