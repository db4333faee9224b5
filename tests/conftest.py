"""Shared fixtures: fake providers, an in-process gateway built the way ``proxyctl serve``
builds one, and HTTP helpers. Everything talks over real loopback sockets on one event loop."""

from __future__ import annotations

import asyncio
import textwrap

import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.netutil import bind_sockets

from contrib.fake_providers import openai_compat
from tornado_proxy import config as config_module
from tornado_proxy.server import run_worker

MASTER_KEY = "sk-master-test-0123456789"
PROVIDER_KEY = "sk-provider-secret-9876543210"


@pytest.fixture
async def fake_openai():
    """A fake OpenAI-compatible provider; ``.state`` has the knobs and what it received."""
    server, port, state = await openai_compat.start(openai_compat.FakeState(api_key=PROVIDER_KEY))
    state.port = port
    state.base = f"http://127.0.0.1:{port}/v1"
    yield state
    server.stop()
    await server.close_all_connections()


class RunningGateway:
    def __init__(self, port: int, task: asyncio.Task, stop: asyncio.Event, config):
        self.port, self.task, self.stop_event, self.config = port, task, stop, config
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, 30)


@pytest.fixture
async def gateway(tmp_path, monkeypatch):
    """``await gateway(yaml_text, env={...})`` -> a running gateway on a free port."""
    running: list[RunningGateway] = []

    async def start(yaml_text: str, env: dict | None = None, master_key: str | None = MASTER_KEY):
        path = tmp_path / f"config{len(running)}.yaml"
        path.write_text(textwrap.dedent(yaml_text))
        environ = {"LITELLM_MASTER_KEY": master_key} if master_key else {}
        environ.update(env or {})
        config = config_module.load(path, environ=environ)
        sockets = bind_sockets(0, "127.0.0.1")
        port = sockets[0].getsockname()[1]
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(run_worker(config, sockets, stop=stop, ready=ready, handle_signals=False))
        await asyncio.wait_for(ready.wait(), 10)
        gw = RunningGateway(port, task, stop, config)
        running.append(gw)
        return gw

    yield start
    for gw in running:
        if not gw.task.done():
            await gw.stop()


@pytest.fixture
async def http():
    client = AsyncHTTPClient(force_instance=True)
    yield client
    client.close()


@pytest.fixture
def fetch(http):
    """``await fetch(gw, "/v1/models", body=..., key=...)`` -> tornado HTTPResponse (no raise)."""

    async def do(gw, path: str, body=None, method: str | None = None, key: str | None = MASTER_KEY,
                 headers: dict | None = None, raw: bytes | None = None, **kwargs):
        hdrs = {"Authorization": f"Bearer {key}"} if key else {}
        hdrs.update(headers or {})
        data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        req = HTTPRequest(gw.url + path, method=method or ("POST" if data is not None else "GET"),
                          headers=hdrs, body=data, request_timeout=30, allow_nonstandard_methods=True,
                          **kwargs)
        return await http.fetch(req, raise_error=False)

    return do


def error_of(response) -> dict:
    """The ``error`` object of an OpenAI-style error response, checking its shape."""
    body = orjson.loads(response.body)
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == str(response.code)
    return body["error"]


def provider_yaml(fake, name: str = "gpt-fake", model: str = "openai/gpt-4o-mini", extra: str = "") -> str:
    """A model_list entry pointing at a fake provider."""
    return f"""
    model_list:
      - model_name: {name}
        litellm_params:
          model: {model}
          api_base: {fake.base}
          api_key: {PROVIDER_KEY}
    {extra}
    """
