"""Bad input, end to end (issue 2, "Bad input"): every malformed request gets its proper 4xx with
an OpenAI-style error naming the problem, nothing is sent upstream, and the gateway keeps serving."""

from __future__ import annotations

import socket

import orjson
import pytest
from tornado.httpclient import HTTPRequest
from tornado.iostream import IOStream

from .conftest import MASTER_KEY, error_of, provider_yaml

MESSAGES = [{"role": "user", "content": "hi there"}]
GOOD_CHAT = {"model": "gpt-fake", "messages": MESSAGES}
LIMIT_YAML = "general_settings: {max_request_size_mb: 1}"
MB = 1024 * 1024


DEEP = "__DEEP_VALUE__"


def with_deep_list(body: dict, depth: int) -> bytes:
    """``body`` encoded, with the string DEEP replaced by ``depth`` nested lists (spliced in as
    text: orjson itself refuses to encode more than 254 levels)."""
    return orjson.dumps(body).replace(orjson.dumps(DEEP), b"[" * depth + b"]" * depth)


@pytest.fixture
async def gw(gateway, fake_openai):
    return await gateway(provider_yaml(fake_openai))


async def assert_still_serving(fetch, gw, fake_openai) -> None:
    """Nothing reached the provider before; a good request afterwards goes through (once)."""
    assert fake_openai.received == []
    r = await fetch(gw, "/v1/chat/completions", GOOD_CHAT)
    assert r.code == 200, r.body
    assert orjson.loads(r.body)["choices"][0]["message"]["content"] == "echo: hi there"
    assert len(fake_openai.received) == 1


# -- bodies that are not a JSON object -------------------------------------------------------------

UNDECODABLE = [
    pytest.param(b'{"model": "gpt-fake", "messages": [', "not valid JSON", id="truncated-json"),
    pytest.param(b"{'model': 'gpt-fake'}", "not valid JSON", id="single-quotes"),
    pytest.param(b"model=gpt-fake&messages=hi", "not valid JSON", id="form-encoded"),
    pytest.param(b'{"model": NaN}', "not valid JSON", id="nan"),
    pytest.param(b'{"model": "\xff"}', "UTF-8", id="not-utf8"),
    pytest.param(b'{"model": "gpt-fake", "messages": [{"role": "user", "content": "caf\xe9"}]}', "UTF-8",
                 id="latin1"),
    pytest.param(b"", "empty", id="empty"),
    pytest.param(b"   \r\n\t ", "empty", id="whitespace-only"),
    pytest.param(b"[]", "JSON object", id="array"),
    pytest.param(orjson.dumps([GOOD_CHAT]), "JSON object", id="array-of-good-body"),
    pytest.param(b"42", "JSON object", id="number"),
    pytest.param(b'"hello"', "JSON object", id="string"),
    pytest.param(b"null", "JSON object", id="null"),
    pytest.param(b"true", "JSON object", id="boolean"),
]


@pytest.mark.parametrize("raw, phrase", UNDECODABLE)
async def test_body_that_is_not_a_json_object(gw, fetch, fake_openai, raw, phrase):
    r = await fetch(gw, "/v1/chat/completions", raw=raw, method="POST")
    assert r.code == 400, r.body
    error = error_of(r)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "request_body"
    assert phrase in error["message"]
    await assert_still_serving(fetch, gw, fake_openai)


# -- schema errors: the JSON path of the problem is the param -----------------------------------------

SCHEMA_ERRORS = [
    pytest.param("/v1/chat/completions", {"messages": MESSAGES}, "model", "Missing required parameter",
                 id="missing-model"),
    pytest.param("/v1/chat/completions", {"model": "gpt-fake"}, "messages", "Missing required parameter",
                 id="missing-messages"),
    pytest.param("/v1/chat/completions", {}, "model", "Missing required parameter", id="empty-object"),
    pytest.param("/v1/chat/completions", {"model": "gpt-fake", "messages": None}, "messages", "null",
                 id="messages-null"),
    pytest.param("/v1/chat/completions", {"model": "gpt-fake", "messages": "hi"}, "messages", "expected an array",
                 id="messages-string"),
    pytest.param("/v1/chat/completions", {"model": "gpt-fake", "messages": {"role": "user", "content": "x"}},
                 "messages", "expected an array", id="messages-object"),
    pytest.param("/v1/chat/completions", {"model": "gpt-fake", "messages": ["hi"]}, "messages[0]",
                 "expected an object", id="message-item-string"),
    pytest.param("/v1/chat/completions", {"model": "gpt-fake", "messages": [MESSAGES[0], None]}, "messages[1]",
                 "expected an object", id="message-item-null"),
    pytest.param("/v1/chat/completions", {"model": "gpt-fake", "messages": []}, "messages", "empty array",
                 id="messages-empty"),
    pytest.param("/v1/chat/completions", {"model": "gpt-fake", "messages": [{"content": "x"}]},
                 "messages[0].role", "Missing required parameter", id="message-without-role"),
    pytest.param("/v1/chat/completions", {"model": "gpt-fake", "messages": [{"role": 7, "content": "x"}]},
                 "messages[0].role", "expected a string", id="role-not-string"),
    pytest.param("/v1/chat/completions", {"model": 42, "messages": MESSAGES}, "model", "expected a string",
                 id="model-integer"),
    pytest.param("/v1/chat/completions", {"model": ["gpt-fake"], "messages": MESSAGES}, "model",
                 "expected a string", id="model-list"),
    pytest.param("/v1/chat/completions", {"model": None, "messages": MESSAGES}, "model", "expected a string",
                 id="model-null"),
    pytest.param("/v1/chat/completions", {"model": "", "messages": MESSAGES}, "model", "model",
                 id="model-empty-string"),
    pytest.param("/v1/chat/completions", {**GOOD_CHAT, "stream": "yes"}, "stream", "expected a boolean",
                 id="stream-not-boolean"),
    pytest.param("/v1/embeddings", {"model": "gpt-fake"}, "input", "Missing required parameter",
                 id="embeddings-without-input"),
    pytest.param("/v1/embeddings", {"model": "gpt-fake", "input": []}, "input", "empty array",
                 id="embeddings-empty-input"),
    pytest.param("/v1/embeddings", {"input": "hello"}, "model", "Missing required parameter",
                 id="embeddings-without-model"),
    pytest.param("/v1/completions", {"model": "gpt-fake"}, "prompt", "Missing required parameter",
                 id="completions-without-prompt"),
    pytest.param("/v1/completions", {"model": "gpt-fake", "prompt": 5}, "prompt", "expected a string",
                 id="completions-prompt-number"),
    pytest.param("/chat/completions", {"model": "gpt-fake"}, "messages", "Missing required parameter",
                 id="unprefixed-alias"),
]


@pytest.mark.parametrize("path, body, param, phrase", SCHEMA_ERRORS)
async def test_schema_error_names_the_json_path(gw, fetch, fake_openai, path, body, param, phrase):
    r = await fetch(gw, path, body)
    assert r.code == 400, r.body
    error = error_of(r)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert f"'{param}'" in error["message"]
    assert phrase in error["message"]
    await assert_still_serving(fetch, gw, fake_openai)


async def test_azure_path_model_is_validated_too(gw, fetch, fake_openai):
    r = await fetch(gw, "/openai/deployments/gpt-fake/chat/completions", {"messages": []})
    assert r.code == 400, r.body
    assert error_of(r)["param"] == "messages"
    await assert_still_serving(fetch, gw, fake_openai)


# -- unknown model, unsupported provider --------------------------------------------------------------

@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": "gpt-nope", "messages": MESSAGES}),
    ("/v1/embeddings", {"model": "gpt-nope", "input": "hello"}),
    ("/v1/completions", {"model": "gpt-nope", "prompt": "hello"}),
    ("/openai/deployments/gpt-nope/chat/completions", {"messages": MESSAGES}),
])
async def test_unknown_model_is_400_naming_it(gw, fetch, fake_openai, path, body):
    r = await fetch(gw, path, body)
    assert r.code == 400, r.body
    error = error_of(r)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "model"
    assert "Invalid model name passed in model=gpt-nope" in error["message"]
    await assert_still_serving(fetch, gw, fake_openai)


@pytest.mark.parametrize("model, provider", [
    ("bedrock/anthropic.claude-v2", "bedrock"),
    ("vertex_ai/gemini-pro", "vertex_ai"),
    ("frobnicator/some-model", "frobnicator"),
])
async def test_unsupported_provider_does_not_stop_startup_and_gets_400(gateway, fetch, fake_openai, model,
                                                                        provider):
    extra = f"""
      - model_name: odd-one
        litellm_params:
          model: {model}
          api_key: sk-unused
    """
    gw = await gateway(provider_yaml(fake_openai) + extra)
    r = await fetch(gw, "/v1/chat/completions", {"model": "odd-one", "messages": MESSAGES})
    assert r.code == 400, r.body
    error = error_of(r)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "model"
    assert f"'{provider}'" in error["message"]
    assert "provider" in error["message"].lower()
    listed = await fetch(gw, "/v1/models")
    assert {m["id"] for m in orjson.loads(listed.body)["data"]} == {"gpt-fake", "odd-one"}
    await assert_still_serving(fetch, gw, fake_openai)


# -- deep nesting --------------------------------------------------------------------------------------

async def test_absurdly_deep_nesting_is_400(gw, fetch, fake_openai):
    depth = 100_000
    raw = b'{"model": "gpt-fake", "messages": ' + b"[" * depth + b"]" * depth + b"}"
    r = await fetch(gw, "/v1/chat/completions", raw=raw)
    assert r.code == 400, r.body
    error = error_of(r)
    assert error["param"] == "request_body"
    await assert_still_serving(fetch, gw, fake_openai)


async def test_deep_top_level_array_is_400(gw, fetch, fake_openai):
    r = await fetch(gw, "/v1/chat/completions", raw=b"[" * 100_000 + b"]" * 100_000)
    assert r.code == 400, r.body
    assert error_of(r)["param"] == "request_body"
    await assert_still_serving(fetch, gw, fake_openai)


@pytest.mark.parametrize("depth", [260, 1000])
@pytest.mark.parametrize("where", ["metadata", "message-content", "extra-param"])
async def test_nesting_the_schema_allows_is_still_400(gw, fetch, fake_openai, where, depth):
    """Deep but parseable, inside free-form fields the schema accepts: still a 400 with nothing
    sent upstream, never a 500 from re-encoding the body for the provider."""
    body = dict(GOOD_CHAT)
    if where == "metadata":
        body["metadata"] = {"x": DEEP}
    elif where == "message-content":
        body["messages"] = [{"role": "user", "content": [{"type": "text", "text": "hi", "x": DEEP}]}]
    else:
        body["some_provider_param"] = DEEP
    r = await fetch(gw, "/v1/chat/completions", raw=with_deep_list(body, depth))
    assert r.code == 400, r.body
    error = error_of(r)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "request_body"
    assert "nest" in error["message"].lower()
    await assert_still_serving(fetch, gw, fake_openai)


async def test_moderately_nested_body_is_still_served(gw, fetch, fake_openai):
    """The depth check does not reject ordinary structured bodies (tools with nested JSON schemas)."""
    schema = {"type": "object"}
    for _ in range(20):
        schema = {"type": "object", "properties": {"inner": schema}}
    body = {**GOOD_CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]}
    r = await fetch(gw, "/v1/chat/completions", body)
    assert r.code == 200, r.body
    assert fake_openai.received[-1].body["tools"] == body["tools"]


async def test_wide_and_fairly_deep_body_is_still_served(gw, fetch, fake_openai):
    """Hundreds of brackets (a long chat) plus 200 levels of nesting: legal, so forwarded intact."""
    history = [{"role": "user" if i % 2 else "assistant", "content": f"turn {i}"} for i in range(300)]
    body = {"model": "gpt-fake", "messages": history + MESSAGES, "metadata": {"x": DEEP}}
    r = await fetch(gw, "/v1/chat/completions", raw=with_deep_list(body, 200))
    assert r.code == 200, r.body
    sent = fake_openai.received[-1].body
    assert len(sent["messages"]) == 301
    depth, probe = 0, sent["metadata"]["x"]
    while isinstance(probe, list):
        depth, probe = depth + 1, (probe[0] if probe else None)
    assert depth == 200


# -- routing: unknown path, wrong method -----------------------------------------------------------

@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/chat/completions"),
    ("PUT", "/v1/chat/completions"),
    ("DELETE", "/chat/completions"),
    ("GET", "/v1/embeddings"),
    ("POST", "/v1/models"),
    ("POST", "/health/liveliness"),
])
async def test_unsupported_method_is_405_with_allow(gw, fetch, fake_openai, method, path):
    body = orjson.dumps(GOOD_CHAT) if method in ("POST", "PUT") else None
    r = await fetch(gw, path, method=method, raw=body)
    assert r.code == 405, r.body
    error = error_of(r)
    assert method in error["message"]
    expected = "GET" if method == "POST" else "POST"
    assert r.headers["Allow"] == expected
    await assert_still_serving(fetch, gw, fake_openai)


@pytest.mark.parametrize("method, path", [
    ("GET", "/v2/chat/completions"),
    ("POST", "/v1/chat/completion"),
    ("POST", "/v1/chat/completions/extra"),
    ("GET", "/"),
    ("GET", "/v1/../etc/passwd"),
])
async def test_unknown_path_is_404(gw, fetch, fake_openai, method, path):
    body = orjson.dumps(GOOD_CHAT) if method == "POST" else None
    r = await fetch(gw, path, method=method, raw=body)
    assert r.code == 404, r.body
    error = error_of(r)
    assert error["type"] == "not_found_error"
    await assert_still_serving(fetch, gw, fake_openai)


async def test_unknown_path_needs_no_key_to_get_404(gw, fetch, fake_openai):
    r = await fetch(gw, "/v1/nothing-here", key=None)
    assert r.code == 404
    error_of(r)
    await assert_still_serving(fetch, gw, fake_openai)


# -- body size limit -----------------------------------------------------------------------------------

def padded_chat(size: int) -> bytes:
    """A valid chat body of about ``size`` bytes."""
    return orjson.dumps({"model": "gpt-fake", "messages": [{"role": "user", "content": "x" * size}]})


@pytest.fixture
async def small_gw(gateway, fake_openai):
    return await gateway(provider_yaml(fake_openai, extra=LIMIT_YAML))


async def test_body_under_the_limit_is_served(small_gw, fetch, fake_openai):
    r = await fetch(small_gw, "/v1/chat/completions", raw=padded_chat(MB // 2))
    assert r.code == 200, r.body
    assert len(fake_openai.received) == 1


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings", "/v1/completions"])
async def test_body_over_the_limit_is_413(small_gw, fetch, fake_openai, path):
    r = await fetch(small_gw, path, raw=padded_chat(int(1.5 * MB)))
    assert r.code == 413, r.body[:300]
    error = error_of(r)
    assert error["param"] == "request_body"
    assert "1 MB" in error["message"]
    await assert_still_serving(fetch, small_gw, fake_openai)


async def test_body_far_over_the_limit_is_413_or_closed(small_gw, fetch, fake_openai):
    """20 MB against a 1 MB limit: the gateway may answer before reading the body and close the
    connection, so the client sees either the 413 or a connection error; never a 2xx or a 5xx."""
    r = await fetch(small_gw, "/v1/chat/completions", raw=padded_chat(20 * MB))
    if r.code != 599:
        assert r.code == 413, r.body[:300]
        assert error_of(r)["param"] == "request_body"
    await assert_still_serving(fetch, small_gw, fake_openai)


@pytest.mark.parametrize("declared", [5 * MB, 20 * MB, 10**12])
async def test_huge_content_length_is_answered_413_without_the_body(small_gw, fake_openai, fetch, declared):
    """Headers announce a body far over the limit and none follows: the answer must come from
    the headers alone (a 413), not after waiting for the body."""
    stream = IOStream(socket.socket())
    await stream.connect(("127.0.0.1", small_gw.port))
    await stream.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + MASTER_KEY.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(declared).encode() + b"\r\n\r\n")
    head = await stream.read_until(b"\r\n\r\n", max_bytes=65536)
    status_line = head.split(b"\r\n", 1)[0]
    assert status_line.split()[1] == b"413", head
    headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line)
    length = int(headers[b"Content-Length"])
    body = await stream.read_bytes(length)
    stream.close()
    body_json = orjson.loads(body)
    assert body_json["error"]["code"] == "413"
    assert body_json["error"]["param"] == "request_body"
    await assert_still_serving(fetch, small_gw, fake_openai)


async def test_chunked_body_over_the_limit_is_413(small_gw, http, fake_openai, fetch):
    """No Content-Length to check up front: the limit is enforced while the body streams in."""
    chunk = b"x" * (64 * 1024)
    total = int(1.5 * MB) // len(chunk)

    async def producer(write):
        await write(b'{"model": "gpt-fake", "messages": [{"role": "user", "content": "')
        for _ in range(total):
            await write(chunk)
        await write(b'"}]}')

    req = HTTPRequest(small_gw.url + "/v1/chat/completions", method="POST", body_producer=producer,
                      headers={"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"},
                      request_timeout=30)
    r = await http.fetch(req, raise_error=False)
    assert r.code == 413, r.body[:300]
    assert error_of(r)["param"] == "request_body"
    await assert_still_serving(fetch, small_gw, fake_openai)


async def test_chunked_body_under_the_limit_is_served(small_gw, http, fake_openai):
    async def producer(write):
        for piece in (b'{"model": "gpt-fake", ', b'"messages": [{"role": "user", ', b'"content": "hi there"}]}'):
            await write(piece)

    req = HTTPRequest(small_gw.url + "/v1/chat/completions", method="POST", body_producer=producer,
                      headers={"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"},
                      request_timeout=30)
    r = await http.fetch(req, raise_error=False)
    assert r.code == 200, r.body
    assert orjson.loads(r.body)["choices"][0]["message"]["content"] == "echo: hi there"
    assert len(fake_openai.received) == 1
