"""Upstream failures through the gateway: provider error statuses, connection refused,
timeouts (total and time to first byte). Before the first streamed byte every one of them is a
plain OpenAI-style JSON error, never a stream; no error body or log line carries a key."""

import logging
import uuid

import openai
import pytest
from tornado.netutil import bind_sockets

from .conftest import MASTER_KEY, PROVIDER_KEY, error_of

USER = [{"role": "user", "content": "hello big world"}]
STREAM_MODES = pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])


def deployment_yaml(api_base: str, key: str = PROVIDER_KEY, params: str = "", name: str = "gpt-fake") -> str:
    return f"""
model_list:
  - model_name: {name}
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: {api_base}
      api_key: {key}
{params}
router_settings:  # these tests check how one upstream error is answered
  num_retries: 0
"""


def closed_port() -> int:
    [sock] = bind_sockets(0, "127.0.0.1")
    port = sock.getsockname()[1]
    sock.close()
    return port


def request(stream: bool) -> dict:
    body = {"model": "gpt-fake", "messages": USER}
    return {**body, "stream": True} if stream else body


def assert_json_error(r, status: int) -> dict:
    """A plain JSON OpenAI-style error with this status; no stream, no key anywhere."""
    assert r.code == status, r.body
    assert r.headers["Content-Type"].startswith("application/json")
    assert b"data:" not in r.body
    text = r.body.decode()
    assert PROVIDER_KEY not in text and MASTER_KEY not in text
    uuid.UUID(r.headers["x-litellm-call-id"])
    return error_of(r)


@pytest.fixture
async def gw(gateway, fake_openai):
    return await gateway(deployment_yaml(fake_openai.base))


@STREAM_MODES
async def test_upstream_401_is_an_authentication_error(gateway, fetch, fake_openai, stream, caplog):
    caplog.set_level(logging.DEBUG)
    gw = await gateway(deployment_yaml(fake_openai.base, key="sk-wrong-provider-key-000"))
    r = await fetch(gw, "/v1/chat/completions", request(stream))
    err = assert_json_error(r, 401)
    assert err["type"] == "authentication_error"
    assert "Incorrect API key" in err["message"]
    assert "sk-wrong-provider-key-000" not in r.body.decode()
    assert len(fake_openai.received) == 1
    for secret in (PROVIDER_KEY, MASTER_KEY, "sk-wrong-provider-key-000"):
        assert secret not in caplog.text


@STREAM_MODES
@pytest.mark.parametrize("status,type_", [(400, "invalid_request_error"), (403, "permission_denied"),
                                          (404, "not_found_error")])
async def test_upstream_4xx_keeps_its_status(gw, fetch, fake_openai, stream, status, type_):
    fake_openai.fail_times, fake_openai.fail_status = 1, status
    err = assert_json_error(await fetch(gw, "/v1/chat/completions", request(stream)), status)
    assert err["type"] == type_
    assert "gpt-4o-mini" in err["message"]  # names the deployment that failed


@STREAM_MODES
async def test_upstream_429_passes_retry_after_on(gw, fetch, fake_openai, stream):
    fake_openai.fail_times, fake_openai.fail_status, fake_openai.retry_after = 1, 429, "17"
    r = await fetch(gw, "/v1/chat/completions", request(stream))
    err = assert_json_error(r, 429)
    assert err["type"] == "rate_limit_error"
    assert r.headers["retry-after"] == "17"
    assert "Rate limit reached" in err["message"]


@STREAM_MODES
@pytest.mark.parametrize("status", [500, 502, 503])
async def test_upstream_5xx(gw, fetch, fake_openai, stream, status):
    fake_openai.fail_times, fake_openai.fail_status = 1, status
    r = await fetch(gw, "/v1/chat/completions", request(stream))
    assert 500 <= r.code < 600
    assert r.code == status
    err = assert_json_error(r, status)
    assert err["message"]
    assert "retry-after" not in r.headers


async def test_upstream_errors_on_embeddings_and_completions(gateway, fetch, fake_openai):
    gw = await gateway(deployment_yaml(fake_openai.base))
    fake_openai.fail_times, fake_openai.fail_status = 2, 503
    assert_json_error(await fetch(gw, "/v1/embeddings", {"model": "gpt-fake", "input": "x"}), 503)
    assert_json_error(await fetch(gw, "/v1/completions", {"model": "gpt-fake", "prompt": "x"}), 503)


@STREAM_MODES
async def test_connection_refused_is_503(gateway, fetch, stream):
    gw = await gateway(deployment_yaml(f"http://127.0.0.1:{closed_port()}/v1"))
    err = assert_json_error(await fetch(gw, "/v1/chat/completions", request(stream)), 503)
    assert err["message"]


@STREAM_MODES
async def test_deployment_timeout_is_408(gateway, fetch, fake_openai, stream):
    gw = await gateway(deployment_yaml(fake_openai.base, params="      timeout: 0.3"))
    fake_openai.latency = 10
    err = assert_json_error(await fetch(gw, "/v1/chat/completions", request(stream)), 408)
    assert err["type"] == "timeout"


async def test_router_default_timeout_applies(gateway, fetch, fake_openai):
    gw = await gateway(deployment_yaml(fake_openai.base).replace("  num_retries: 0\n", "  num_retries: 0\n  timeout: 0.3\n"))
    fake_openai.latency = 10
    assert_json_error(await fetch(gw, "/v1/chat/completions", request(False)), 408)


async def test_stream_timeout_is_time_to_first_byte(gateway, fetch, fake_openai):
    gw = await gateway(deployment_yaml(fake_openai.base, params="      timeout: 30\n      stream_timeout: 0.2"))
    fake_openai.latency = 0.8
    err = assert_json_error(await fetch(gw, "/v1/chat/completions", request(True)), 408)
    assert err["type"] == "timeout"
    # the same latency is fine for a non-streamed call, which only has the 30 s timeout
    r = await fetch(gw, "/v1/chat/completions", request(False))
    assert r.code == 200, r.body
    # and for a stream whose first byte comes in time, however long the rest takes
    fake_openai.latency, fake_openai.chunk_delay, fake_openai.stream_chunks = 0, 0.1, 4
    r = await fetch(gw, "/v1/chat/completions", request(True))
    assert r.code == 200 and r.body.endswith(b"data: [DONE]\n\n")
    assert r.body.count(b'"content":"tok "') == 4


async def test_sdk_error_classes(gw, fake_openai):
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=MASTER_KEY, max_retries=0) as client:
        fake_openai.fail_times, fake_openai.fail_status = 1, 429
        with pytest.raises(openai.RateLimitError) as rate:
            await client.chat.completions.create(model="gpt-fake", messages=USER)
        assert rate.value.response.headers["retry-after"] == "1"
        fake_openai.fail_times, fake_openai.fail_status = 1, 404
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="gpt-fake", messages=USER, stream=True)
        fake_openai.fail_times, fake_openai.fail_status = 1, 500
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="gpt-fake", messages=USER)
        reply = await client.chat.completions.create(model="gpt-fake", messages=USER)  # still serving
        assert reply.choices[0].message.content == "echo: hello big world"


async def test_sdk_sees_upstream_401_as_authentication_error(gateway, fake_openai):
    gw = await gateway(deployment_yaml(fake_openai.base, key="sk-wrong-provider-key-000"))
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=MASTER_KEY, max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as info:
            await client.chat.completions.create(model="gpt-fake", messages=USER)
    assert info.value.status_code == 401
    assert info.value.body["type"] == "authentication_error"


async def test_errors_are_counted_in_metrics(gw, fetch, fake_openai):
    fake_openai.fail_times, fake_openai.fail_status = 2, 503
    await fetch(gw, "/v1/chat/completions", request(False))
    await fetch(gw, "/v1/chat/completions", request(True))
    text = (await fetch(gw, "/metrics", key=None)).body.decode()
    line = 'litellm_proxy_total_requests_metric_total{model="gpt-fake",route="/chat/completions",status="503"} 2.0'
    assert line in text


async def test_gateway_keeps_serving_after_every_kind_of_failure(gateway, fetch, fake_openai):
    gw = await gateway(deployment_yaml(fake_openai.base, params="      timeout: 0.3")
                       .replace("model_list:\n", f"""model_list:
  - model_name: dead
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: http://127.0.0.1:{closed_port()}/v1
""", 1))
    for status in (401, 429, 500):
        fake_openai.fail_times, fake_openai.fail_status = 1, status
        assert (await fetch(gw, "/v1/chat/completions", request(True))).code == status
    fake_openai.latency = 5
    assert (await fetch(gw, "/v1/chat/completions", request(False))).code == 408
    fake_openai.latency = 0
    assert (await fetch(gw, "/v1/chat/completions", {"model": "dead", "messages": USER})).code == 503
    r = await fetch(gw, "/v1/chat/completions", request(True))
    assert r.code == 200 and r.body.endswith(b"data: [DONE]\n\n")
