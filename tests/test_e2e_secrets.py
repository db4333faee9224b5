"""No key ever reaches a log record, an error body or a response header: failing requests with a
known master key and provider key (wrong key, an upstream that echoes what it was sent, upstream
500, unreachable upstream, unknown model, keys in the query string and in Referer)."""

from __future__ import annotations

import http.server
import json
import logging
import signal
import threading

import orjson
import pytest

from .conftest import MASTER_KEY, PROVIDER_KEY, error_of
from .test_e2e_serve import request, serve  # noqa: F401  (serve is a fixture)

WRONG_KEY = "sk-wrong-client-key-5550001"
SECRETS = (MASTER_KEY, PROVIDER_KEY, WRONG_KEY)
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hello"}]}


class EchoHandler(http.server.BaseHTTPRequestHandler):
    """Answers every call with the configured status and a body that repeats everything it got:
    headers (the provider key among them), the URL and the request body."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace")
        upstream: EchoUpstream = self.server.upstream
        upstream.received.append((self.path, dict(self.headers), body))
        auth = self.headers.get("Authorization", "")
        echo = f"you sent {auth!s} to {self.path} with headers {dict(self.headers)} and body {body}"
        if upstream.status == 500:
            payload = ("Internal error while handling " + echo).encode()
            content_type = "text/plain"
        else:
            payload = json.dumps({"error": {
                "message": f"Incorrect API key provided: {auth}. {echo}", "type": "invalid_request_error",
                "param": auth if upstream.echo_param else None, "code": "invalid_api_key"}}).encode()
            content_type = "application/json"
        self.send_response(upstream.status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("X-Echo-Authorization", auth)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:  # quiet
        pass


class EchoUpstream:
    def __init__(self, status: int = 401):
        self.status = status
        self.echo_param = False  # also echo the Authorization header in the error's `param`
        self.received: list[tuple[str, dict, str]] = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
        self.server.daemon_threads = True
        self.server.upstream = self
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def echo():
    upstream = EchoUpstream()
    yield upstream
    upstream.close()


def config(echo_base: str) -> str:
    return f"""
    model_list:
      - model_name: echo
        litellm_params:
          model: openai/gpt-4o-mini
          api_base: {echo_base}
          api_key: os.environ/ECHO_PROVIDER_KEY
      - model_name: down
        litellm_params:
          model: openai/gpt-4o-mini
          api_base: http://127.0.0.1:9/v1
          api_key: {PROVIDER_KEY}
      - model_name: demo
        litellm_params: {{model: mock/demo}}
    """


def assert_no_secrets(caplog, *responses) -> None:
    texts = [caplog.text]
    for record in caplog.records:
        texts += [record.getMessage(), repr(record.args), str(record.exc_text or "")]
    for r in responses:
        texts += [r.body.decode("utf-8", "replace"), repr(dict(r.headers))]
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, secret


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.DEBUG)  # everything every logger says, tracebacks included
    return caplog


@pytest.fixture
async def gw(gateway, echo, logs):
    return await gateway(config(echo.base), env={"ECHO_PROVIDER_KEY": PROVIDER_KEY})


LEAKY_CLIENT = {"path": f"/v1/chat/completions?api_key={MASTER_KEY}&key={PROVIDER_KEY}",
                "headers": {"Referer": f"https://app.example/chat?api_key={MASTER_KEY}&k={PROVIDER_KEY}"}}


async def test_wrong_master_key_in_every_header(gw, fetch, logs):
    responses = []
    for headers in ({"Authorization": f"Bearer {WRONG_KEY}"}, {"x-api-key": WRONG_KEY}, {"api-key": WRONG_KEY},
                    {"x-litellm-api-key": f"Bearer {WRONG_KEY}"}, {"Authorization": WRONG_KEY}):
        r = await fetch(gw, "/v1/chat/completions", CHAT, key=None, headers=headers)
        assert r.code == 401 and error_of(r)["type"] == "auth_error"
        responses.append(r)
    assert_no_secrets(logs, *responses)


async def test_keys_in_query_string_and_referer(gw, fetch, logs):
    responses = []
    for path, body, key, expected in (
        (LEAKY_CLIENT["path"], CHAT, None, 401),                  # a key in the URL is not a credential
        (LEAKY_CLIENT["path"], CHAT, WRONG_KEY, 401),
        (LEAKY_CLIENT["path"], {**CHAT, "model": "demo"}, MASTER_KEY, 200),
        (LEAKY_CLIENT["path"], {**CHAT, "model": "nope"}, MASTER_KEY, 400),
        (f"/v1/nowhere?api_key={MASTER_KEY}", None, MASTER_KEY, 404),
        (f"/v1/models?api_key={MASTER_KEY}", None, None, 401),
        (f"/v1/models?api_key={MASTER_KEY}", None, MASTER_KEY, 200),
        (f"/health/liveliness?api_key={MASTER_KEY}", CHAT, None, 405),
    ):
        r = await fetch(gw, path, body, key=key, headers=LEAKY_CLIENT["headers"])
        assert r.code == expected, (path, r.body)
        responses.append(r)
    access = [r for r in logs.records if r.name == "tornado_proxy.access"]
    assert len(access) == len(responses)
    assert all("?" not in orjson.loads(r.getMessage())["path"] for r in access)
    assert_no_secrets(logs, *responses)


async def test_unknown_model_with_leaky_client(gw, fetch, logs):
    r = await fetch(gw, LEAKY_CLIENT["path"], {**CHAT, "model": f"gpt-{WRONG_KEY}"}, headers=LEAKY_CLIENT["headers"])
    assert r.code == 400
    # the message names the model the client sent (its own text); no configured key is in it
    for secret in (MASTER_KEY, PROVIDER_KEY):
        assert secret not in r.body.decode()
        assert secret not in logs.text


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_401_that_echoes_the_key(gw, fetch, echo, logs, stream):
    r = await fetch(gw, LEAKY_CLIENT["path"], {**CHAT, "stream": stream}, headers=LEAKY_CLIENT["headers"])
    assert r.code == 401, r.body
    err = error_of(r)
    assert err["type"] == "authentication_error"
    assert "Incorrect API key provided" in err["message"]
    assert "X-Echo-Authorization" not in r.headers
    # the provider did get its key, and only its key
    (path, headers, body) = echo.received[-1]
    assert headers["Authorization"] == f"Bearer {PROVIDER_KEY}"
    for part in (path, repr(headers), body):
        assert MASTER_KEY not in part and WRONG_KEY not in part
    assert_no_secrets(logs, r)


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_401_that_echoes_the_key_in_param(gw, fetch, echo, logs, stream):
    echo.echo_param = True
    r = await fetch(gw, "/v1/chat/completions", {**CHAT, "stream": stream})
    assert r.code == 401, r.body
    assert_no_secrets(logs, r)


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_500_that_echoes_the_key(gw, fetch, echo, logs, stream):
    echo.status = 500
    r = await fetch(gw, "/v1/chat/completions", {**CHAT, "stream": stream}, headers=LEAKY_CLIENT["headers"])
    assert r.code == 500, r.body
    assert error_of(r)["type"] == "api_error"
    assert_no_secrets(logs, r)


async def test_unreachable_upstream(gw, fetch, logs):
    r = await fetch(gw, LEAKY_CLIENT["path"], {**CHAT, "model": "down"}, headers=LEAKY_CLIENT["headers"])
    assert r.code == 503 and error_of(r)["type"] == "api_connection_error"
    assert_no_secrets(logs, r)


async def test_client_keys_in_the_body_never_go_upstream(gw, fetch, echo, logs):
    echo.status = 500
    body = {**CHAT, "api_key": MASTER_KEY, "api_base": "http://evil.example/v1"}
    r = await fetch(gw, "/v1/chat/completions", body)
    assert r.code == 500
    (path, headers, sent) = echo.received[-1]
    assert MASTER_KEY not in sent and "evil.example" not in sent
    assert_no_secrets(logs, r)


async def test_model_info_hides_the_provider_key(gw, fetch, logs):
    r = await fetch(gw, "/v1/model/info")
    assert r.code == 200
    data = orjson.loads(r.body)["data"]
    assert {d["model_name"] for d in data} == {"echo", "down", "demo"}
    assert all("api_key" not in d["litellm_params"] for d in data)
    assert_no_secrets(logs, r)


def test_serve_stderr_has_no_keys_even_at_debug(serve, echo):  # noqa: F811
    """The real `proxyctl serve --log-level DEBUG`, failing requests, then its whole stderr."""
    served = serve(config(echo.base), 1, "--log-level", "DEBUG", ECHO_PROVIDER_KEY=PROVIDER_KEY,
                   LITELLM_MASTER_KEY=MASTER_KEY)
    statuses = []
    for path, body, key, headers in (
        ("/v1/chat/completions", CHAT, WRONG_KEY, {}),
        (LEAKY_CLIENT["path"], CHAT, MASTER_KEY, LEAKY_CLIENT["headers"]),
        (LEAKY_CLIENT["path"], {**CHAT, "stream": True}, MASTER_KEY, LEAKY_CLIENT["headers"]),
        (LEAKY_CLIENT["path"], {**CHAT, "model": "down"}, MASTER_KEY, LEAKY_CLIENT["headers"]),
        (LEAKY_CLIENT["path"], {**CHAT, "model": "nope"}, MASTER_KEY, LEAKY_CLIENT["headers"]),
        (f"/v1/nowhere?api_key={MASTER_KEY}", None, MASTER_KEY, LEAKY_CLIENT["headers"]),
    ):
        status, resp_headers, resp_body = request(served.port, "POST" if body else "GET", path, body, key=key,
                                                  headers=headers)
        statuses.append(status)
        for secret in SECRETS:
            assert secret not in resp_body.decode("utf-8", "replace")
            assert secret not in str(resp_headers)
    assert statuses == [401, 401, 401, 503, 400, 404]
    echo.status = 500
    status, _, resp_body = request(served.port, "POST", "/v1/chat/completions", CHAT, key=MASTER_KEY)
    assert status == 500 and PROVIDER_KEY not in resp_body.decode()
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(20) == 0
    stderr = served.stderr()
    assert " DEBUG " in stderr  # the debug loggers really were on
    assert len([line for line in served.access_lines() if line["route"] != "/health/liveliness"]) == 7
    for secret in SECRETS:
        assert secret not in stderr, secret


async def test_api_base_credentials_are_never_shown(gateway, fetch):
    """user:password@ and query strings in an api_base stay out of x-litellm-model-api-base and
    /model/info."""
    gw = await gateway("""
model_list:
  - model_name: m
    litellm_params:
      model: mock/m
      api_base: "http://svc-user:svc-pass-123@models.internal:8443/v1?token=tok-456"
""")
    r = await fetch(gw, "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.code == 200
    assert r.headers["x-litellm-model-api-base"] == "http://models.internal:8443/v1"
    info = await fetch(gw, "/model/info")
    assert info.code == 200
    for secret in ("svc-pass-123", "svc-user", "tok-456"):
        assert secret not in info.body.decode() and secret not in str(r.headers)
