"""The fake Gemini and Ollama servers, and the Azure side of the OpenAI fake: the wire-format
details the gateway's adapters rely on (auth, framing, error bodies, body checks)."""

import asyncio
import json
import pathlib
import sys

import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient

from contrib.fake_providers import gemini, ollama, openai_compat

from .conftest import running_fake

ROOT = pathlib.Path(__file__).resolve().parent.parent
KEY = "fake-native-key"
HELLO = {"contents": [{"role": "user", "parts": [{"text": "hello big world"}]}]}


@pytest.fixture
async def http():
    client = AsyncHTTPClient(force_instance=True)
    yield client
    client.close()


@pytest.fixture
async def served(request):
    module, state = request.param
    async with running_fake(module, state) as state:
        yield state, state.base


def post(http, url, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body)
    return http.fetch(url, method="POST", body=data, headers=headers or {}, raise_error=False)


GEMINI = pytest.mark.parametrize("served", [(gemini, gemini.FakeState(api_key=KEY))], indirect=True)
OLLAMA = pytest.mark.parametrize("served", [(ollama, ollama.FakeState())], indirect=True)
AZURE = pytest.mark.parametrize("served", [(openai_compat, openai_compat.FakeState(api_key=KEY))], indirect=True)


# --- Gemini ---------------------------------------------------------------------------------------

@GEMINI
async def test_gemini_auth(served, http):
    base = served[1]
    url = base + "/v1beta/models/gemini-2.0-flash:generateContent"
    r = await post(http, url, HELLO)
    assert r.code == 403 and json.loads(r.body)["error"]["status"] == "PERMISSION_DENIED"
    r = await post(http, url, HELLO, {"x-goog-api-key": "wrong"})
    err = json.loads(r.body)["error"]
    assert r.code == 400 and err["details"][0]["reason"] == "API_KEY_INVALID" and "wrong" not in r.body.decode()
    r = await post(http, url + f"?key={KEY}", HELLO)
    assert r.code == 200 and json.loads(r.body)["candidates"][0]["content"]["parts"] == [
        {"text": "echo: hello big world"}]


@GEMINI
@pytest.mark.parametrize("body,message", [
    ({**HELLO, "model": "x"}, 'Unknown name "model"'),
    ({**HELLO, "generationConfig": {"max_tokens": 3}}, 'Unknown name "max_tokens"'),
    ({"contents": []}, "contents is not specified"),
    ({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}, "Please use a valid role"),
    ({"contents": [{"role": "user", "parts": []}]}, "contents.parts must not be empty"),
    ({"contents": [{"role": "user", "parts": [{"text": ""}]}]}, "empty text parameter"),
    ({"contents": [{"role": "user", "parts": [{"functionResponse": {"name": "f", "response": "x"}}]}]},
     "function_response.response"),
    ({**HELLO, "tools": [{"functionDeclarations": [{"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": False}}]}]},
     'Unknown name "additionalProperties"'),
])
async def test_gemini_checks_bodies(served, http, body, message):
    r = await post(http, served[1] + "/v1beta/models/gemini-2.0-flash:generateContent", body, {"x-goog-api-key": KEY})
    err = json.loads(r.body)["error"]
    assert r.code == 400 and err["status"] == "INVALID_ARGUMENT" and message in err["message"]


@GEMINI
async def test_gemini_stream_framing(served, http):
    base = served[1]
    headers = {"x-goog-api-key": KEY}
    r = await post(http, base + "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", HELLO, headers)
    assert r.headers["content-type"] == "text/event-stream" and r.body.endswith(b"\r\n\r\n")
    events = [json.loads(e[6:]) for e in r.body.split(b"\r\n\r\n") if e]
    assert b"[DONE]" not in r.body and events[-1]["candidates"][0]["finishReason"] == "STOP"
    assert "".join(e["candidates"][0]["content"]["parts"][0]["text"] for e in events) == "echo: hello big world"
    r = await post(http, base + "/v1beta/models/gemini-2.0-flash:streamGenerateContent", HELLO, headers)
    assert [e["candidates"][0]["content"]["parts"][0]["text"] for e in json.loads(r.body)] == [
        "echo: ", "hello ", "big ", "world"]


@GEMINI
async def test_gemini_embeddings_and_errors(served, http):
    state, base = served
    headers = {"x-goog-api-key": KEY}
    batch = {"requests": [{"model": "models/other", "content": {"parts": [{"text": "a"}]}}]}
    r = await post(http, base + "/v1beta/models/text-embedding-004:batchEmbedContents", batch, headers)
    assert r.code == 400 and "does not match" in json.loads(r.body)["error"]["message"]
    r = await post(http, base + "/v1beta/models/nope:generateContent", HELLO, headers)
    assert r.code == 404 and json.loads(r.body)["error"]["status"] == "NOT_FOUND"
    state.fail_times, state.fail_status = 1, 429
    r = await post(http, base + "/v1beta/models/gemini-2.0-flash:generateContent", HELLO, headers)
    err = json.loads(r.body)["error"]
    assert r.code == 429 and err["status"] == "RESOURCE_EXHAUSTED" and err["details"][0]["retryDelay"] == "1s"


# --- Ollama ---------------------------------------------------------------------------------------

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hello big world"}]}


@OLLAMA
async def test_ollama_streams_ndjson_unless_told_not_to(served, http):
    base = served[1]
    r = await post(http, base + "/api/chat", CHAT)
    assert r.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(x) for x in r.body.splitlines()]
    assert "".join(x["message"]["content"] for x in lines) == "echo: hello big world"
    assert [x["done"] for x in lines][-2:] == [False, True] and lines[-1]["eval_count"] == 4
    r = await post(http, base + "/api/chat", {**CHAT, "stream": False})
    reply = json.loads(r.body)
    assert reply["message"]["content"] == "echo: hello big world" and reply["done_reason"] == "stop"


@OLLAMA
@pytest.mark.parametrize("path,body,status,message", [
    ("/api/chat", {**CHAT, "model": "llama9"}, 404, 'model "llama9" not found, try pulling it first'),
    ("/api/chat", {"messages": []}, 400, "model is required"),
    ("/api/chat", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}, 400,
     "cannot unmarshal array into Go struct field Message.messages.content"),
    ("/api/chat", {**CHAT, "messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": "{}"}}]}]}, 400, "ToolCallFunctionArguments"),
    ("/api/chat", {**CHAT, "messages": [{"role": "user", "content": "x", "images": ["not base64!"]}]}, 400,
     "illegal base64 data"),
    ("/api/generate", {"model": "llama3.2", "prompt": ["a"]}, 400, "cannot unmarshal array"),
    ("/api/embed", {"model": "llama3.2", "input": [1]}, 400, "invalid input type"),
])
async def test_ollama_errors(served, http, path, body, status, message):
    r = await post(http, served[1] + path, {**body, "stream": False})
    assert r.code == status and message in json.loads(r.body)["error"]


@OLLAMA
async def test_ollama_generate_empty_prompt_loads(served, http):
    r = await post(http, served[1] + "/api/generate", {"model": "llama3.2"})
    assert json.loads(r.body)["done_reason"] == "load"


# --- Azure paths on the OpenAI fake ---------------------------------------------------------------

@AZURE
async def test_azure_needs_api_version_and_key(served, http):
    state, base = served
    url = base + "/openai/deployments/dep/chat/completions"
    body = {"messages": [{"role": "user", "content": "hi"}]}
    r = await post(http, url, body, {"api-key": KEY})
    assert r.code == 404 and json.loads(r.body) == {"error": {"code": "404", "message": "Resource not found"}}
    r = await post(http, url + "?api-version=2024-10-21", body, {"api-key": "wrong"})
    assert r.code == 401 and "Access denied" in json.loads(r.body)["error"]["message"]
    r = await post(http, url + "?api-version=2024-10-21", {**body, "stream": True}, {"api-key": KEY})
    first = orjson.loads(r.body.split(b"\n\n")[0][6:])
    assert first["choices"] == [] and first["prompt_filter_results"]
    assert state.received[-1].query == "api-version=2024-10-21"


# --- standalone -----------------------------------------------------------------------------------

@pytest.mark.parametrize("script,path,body", [
    ("gemini", "/v1beta/models/gemini-2.0-flash:generateContent", HELLO),
    ("ollama", "/api/chat", {**CHAT, "stream": False}),
])
async def test_standalone(http, script, path, body):
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", f"contrib.fake_providers.{script}", "--port", "0",
                                                stdout=asyncio.subprocess.PIPE, cwd=ROOT)
    try:
        port = int(await asyncio.wait_for(proc.stdout.readline(), 10))
        r = await post(http, f"http://127.0.0.1:{port}{path}", body)
        assert r.code == 200 and b"echo: hello big world" in r.body
    finally:
        proc.terminate()
        await proc.wait()
