"""``GET /health`` end to end against the fake providers: healthy and unhealthy deployments
(5xx, a 401 that quotes the key, a hang past the timeout, a refused connection), counts,
``?model=`` / ``?model_id=``, the master key, and background checks: answered from the latest
report without probing, a deployment turning unhealthy at the next interval, and one loop per
instance under ``proxyctl serve --num-workers 2``.

Every wait is a bounded poll; nothing asserts on how long anything took."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap

import orjson
import pytest

from contrib.fake_providers.common import RawReply
from tests.conftest import MASTER_KEY, PROVIDER_KEY, error_of, wait_for

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHAT_PATH = "/v1/chat/completions"


def model(name: str, litellm_model: str, fake=None, key: str | None = PROVIDER_KEY, info: str = "") -> str:
    lines = [f"  - model_name: \"{name}\"", "    litellm_params:", f"      model: \"{litellm_model}\""]
    if fake is not None:
        lines.append(f"      api_base: {fake.base if hasattr(fake, 'base') else fake}")
    if key:
        lines.append(f"      api_key: {key}")
    if info:
        lines.append(f"    model_info: {info}")
    return "\n".join(lines) + "\n"


def config(*models: str, general: str = "") -> str:
    out = "model_list:\n" + "".join(models)
    return out + (f"general_settings: {general}\n" if general else "")


def closed_port_base() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"  # nothing listens there once the socket is closed


async def health(fetch, gw, query: str = "", key: str | None = MASTER_KEY):
    r = await fetch(gw, "/health" + query, key=key)
    return r.code, orjson.loads(r.body)


def by_model_id(body: dict) -> dict[str, dict]:
    return {e["model_id"]: e for e in body["healthy_endpoints"] + body["unhealthy_endpoints"]}


async def test_every_provider_healthy_with_one_minimal_call_each(gateway, fetch, fake_openai, fake_anthropic,
                                                                fake_gemini, fake_ollama):
    gw = await gateway(config(
        model("gpt", "openai/gpt-4o-mini", fake_openai, info="{id: gpt}"),
        model("emb", "openai/text-embedding-3-small", fake_openai, info="{id: emb, mode: embedding}"),
        model("claude", "anthropic/claude-3-5-haiku-20241022", fake_anthropic, info="{id: claude}"),
        model("gem", "gemini/gemini-2.0-flash", fake_gemini, info="{id: gem}"),
        model("llama", "ollama_chat/llama3.2", fake_ollama, key=None, info="{id: llama}"),
        model("demo", "mock/demo", info="{id: demo}"),
    ))
    status, body = await health(fetch, gw)
    assert status == 200
    assert body["healthy_count"] == 6 and body["unhealthy_count"] == 0, body
    assert set(by_model_id(body)) == {"gpt", "emb", "claude", "gem", "llama", "demo"}
    assert by_model_id(body)["gpt"] == {"model": "openai/gpt-4o-mini", "model_id": "gpt", "api_base": fake_openai.base}
    # one call per deployment, as small as it gets
    chat = [r.body for r in fake_openai.received if r.path == CHAT_PATH]
    assert chat == [{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}]
    assert [r.body for r in fake_openai.received if r.path.endswith("/embeddings")] == [
        {"model": "text-embedding-3-small", "input": "ping"}]
    assert len(fake_anthropic.received) == len(fake_gemini.received) == len(fake_ollama.received) == 1
    assert fake_anthropic.received[0].body["max_tokens"] == 1


async def test_unhealthy_deployments_say_why_without_their_key(gateway, fetch, fake_openai, fake_anthropic):
    hung = closed_port_base()
    gw = await gateway(config(
        model("ok", "openai/gpt-4o-mini", fake_openai, info="{id: ok}"),
        model("claude", "anthropic/claude-3-5-haiku-20241022", fake_anthropic, info="{id: claude}"),
        model("refused", "openai/gpt-4o-mini", hung, info="{id: refused}"),
        general="{health_check_timeout: 0.5}",
    ))
    # the Anthropic fake echoes the key in a 401, the OpenAI fake answers 500
    echo = orjson.dumps({"type": "error", "error": {"type": "authentication_error",
                                                    "message": f"invalid x-api-key: {PROVIDER_KEY}"}})
    fake_anthropic.raw_reply = RawReply(status=401, content_type="application/json", frames=(echo,))
    fake_openai.fail_times, fake_openai.fail_status = 1, 500
    status, body = await health(fetch, gw)
    assert status == 200
    assert body["healthy_count"] == 0 and body["unhealthy_count"] == 3
    found = by_model_id(body)
    assert found["ok"]["exception_status"] == 500
    assert found["claude"]["exception_status"] == 401 and "invalid x-api-key" in found["claude"]["error"]
    assert found["refused"]["exception_status"] == 503 and "connect" in found["refused"]["error"]
    assert PROVIDER_KEY not in orjson.dumps(body).decode()

    fake_openai.latency = 30  # past the 0.5 s health_check_timeout
    status, body = await health(fetch, gw, "?model=ok")
    assert status == 503  # a model asked for by name with nothing healthy, as LiteLLM answers
    [timed_out] = body["unhealthy_endpoints"]
    assert timed_out["exception_status"] == 408 and "Timeout" in timed_out["error"]


async def test_a_deployments_own_timeout_and_health_check_model(gateway, fetch, fake_openai):
    gw = await gateway(config(
        model("openai/*", "openai/*", fake_openai, info="{id: wild, health_check_model: openai/gpt-4o}"),
        model("other/*", "openai/*", fake_openai, info="{id: unchecked}"),
        model("slow", "openai/gpt-4o-mini", fake_openai, info="{id: slow, health_check_timeout: 0.3}"),
    ))
    fake_openai.latency = 30
    status, body = await health(fetch, gw, "?model=slow")
    assert status == 503 and body["unhealthy_endpoints"][0]["exception_status"] == 408
    fake_openai.latency = 0
    status, body = await health(fetch, gw)
    assert [e["model_id"] for e in body["healthy_endpoints"]] == ["wild", "slow"]
    [skipped] = body["skipped_endpoints"]
    assert skipped["model_id"] == "unchecked" and "health_check_model" in skipped["reason"]
    assert {r.body["model"] for r in fake_openai.received} == {"gpt-4o", "gpt-4o-mini"}


async def test_one_group_by_name_alias_or_id(gateway, fetch, fake_openai):
    gw = await gateway(config(
        model("a", "openai/gpt-4o-mini", fake_openai, info="{id: a1}"),
        model("a", "openai/gpt-4o", fake_openai, info="{id: a2}"),
        model("b", "openai/gpt-3.5-turbo-instruct", fake_openai, info="{id: b1, mode: completion}"),
    ) + "router_settings: {model_group_alias: {alias-a: a}}\n")
    status, body = await health(fetch, gw, "?model=a")
    assert status == 200 and sorted(by_model_id(body)) == ["a1", "a2"] and body["healthy_count"] == 2
    assert len(fake_openai.received) == 2  # only the group asked for is probed
    _, body = await health(fetch, gw, "?model=alias-a")
    assert sorted(by_model_id(body)) == ["a1", "a2"]
    _, body = await health(fetch, gw, "?model=openai/gpt-3.5-turbo-instruct")  # a litellm_params.model
    assert list(by_model_id(body)) == ["b1"]
    assert fake_openai.received[-1].path.endswith("/completions") and fake_openai.received[-1].body["prompt"] == "ping"
    _, body = await health(fetch, gw, "?model_id=a2")
    assert list(by_model_id(body)) == ["a2"]

    r = await fetch(gw, "/health?model=nope")
    assert r.code == 400 and error_of(r)["param"] == "model"
    r = await fetch(gw, "/health?model_id=nope")
    assert r.code == 404 and error_of(r)["param"] == "model_id"


async def test_only_the_master_key_may_ask(gateway, fetch, fake_openai):
    gw = await gateway(config(model("a", "openai/gpt-4o-mini", fake_openai)))
    for key in (None, "sk-wrong"):
        r = await fetch(gw, "/health", key=key)
        assert r.code == 401, r.body
    assert fake_openai.received == []  # refused callers cause no provider call
    r = await fetch(gw, "/health", method="POST", raw=b"{}")
    assert r.code == 405
    for path in ("/health/liveliness", "/health/readiness"):  # unchanged: open, no provider call
        r = await fetch(gw, path, key=None)
        assert r.code == 200
    assert fake_openai.received == []


async def first_report(fetch, gw) -> dict:
    for _ in range(500):
        _, body = await health(fetch, gw)
        if body["checked_at"] is not None:
            return body
        await asyncio.sleep(0.02)
    pytest.fail("no background health report")


async def test_background_checks_are_answered_from_the_latest_report_without_probing(gateway, fetch, fake_openai):
    gw = await gateway(config(
        model("a", "openai/gpt-4o-mini", fake_openai, info="{id: a}"),
        model("b", "openai/gpt-4o", fake_openai, info="{id: b}"),
        general="{background_health_checks: true, health_check_interval: 3600}",
    ))
    first = await first_report(fetch, gw)
    assert first["healthy_count"] == 2 and len(fake_openai.received) == 2
    for query in ("", "", "?model=a", "?model_id=b"):
        status, body = await health(fetch, gw, query)
        assert status == 200 and body["checked_at"] == first["checked_at"]
    _, one = await health(fetch, gw, "?model=a")
    assert list(by_model_id(one)) == ["a"]
    assert len(fake_openai.received) == 2  # no probe of its own


async def test_background_report_follows_a_deployment_down_and_up_again(gateway, fetch, fake_openai):
    gw = await gateway(config(
        model("a", "openai/gpt-4o-mini", fake_openai, info="{id: a}"),
        model("demo", "mock/demo", info="{id: demo}"),
        general="{background_health_checks: true, health_check_interval: 0.2}",
    ))
    first = await first_report(fetch, gw)
    assert first["healthy_count"] == 2

    async def report_where(predicate) -> dict:
        for _ in range(500):
            _, body = await health(fetch, gw)
            if predicate(body):
                return body
            await asyncio.sleep(0.02)
        pytest.fail("the background report did not change")

    fake_openai.fail_times, fake_openai.fail_status = 10**6, 500  # the fake breaks
    down = await report_where(lambda b: b["unhealthy_count"] == 1)
    assert [e["model_id"] for e in down["unhealthy_endpoints"]] == ["a"]
    assert down["healthy_count"] == 1 and down["checked_at"] > first["checked_at"]
    status, one = await health(fetch, gw, "?model=a")
    assert status == 503 and one["unhealthy_count"] == 1 and one["healthy_count"] == 0

    fake_openai.fail_times = 0  # and recovers at a later round
    up = await report_where(lambda b: b["unhealthy_count"] == 0)
    assert up["healthy_count"] == 2


# --- proxyctl serve --num-workers 2: one background loop per instance ----------------------------

class Serve:
    """``bin/proxyctl serve`` as a subprocess; the test's event loop keeps serving the fake."""

    def __init__(self, tmp_path: pathlib.Path, yaml_text: str, workers: int):
        (tmp_path / "config.yaml").write_text(textwrap.dedent(yaml_text))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "STORE_MODEL_IN_DB", "NUM_WORKERS")}
        env.update(LITELLM_MASTER_KEY=MASTER_KEY, PYTHONUNBUFFERED="1")
        self.stderr_path = tmp_path / "stderr.log"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bin" / "proxyctl"), "serve", "--config", "config.yaml", "--host",
             "127.0.0.1", "--port", str(self.port), "--num-workers", str(workers)],
            stdout=subprocess.DEVNULL, stderr=self._stderr, env=env, cwd=tmp_path, start_new_session=True)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._stderr.close()


@pytest.fixture
def serve(tmp_path):
    started: list[Serve] = []

    def start(yaml_text: str, workers: int) -> Serve:
        started.append(Serve(tmp_path, yaml_text, workers))
        return started[-1]

    yield start
    for s in started:
        s.close()


async def poll(check, what: str, timeout: float = 20.0):
    """``await check()`` until it returns something truthy; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if loop.time() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        await asyncio.sleep(0.05)


async def test_two_workers_share_one_background_loop(serve, fetch, fake_openai, tmp_path):
    # a long interval: each round is started on purpose (start-up, then a reload)
    server = serve(config(model("a", "openai/gpt-4o-mini", fake_openai, info="{id: a}"),
                          general="{background_health_checks: true, health_check_interval: 3600}"), workers=2)

    async def readiness_pids() -> set[int]:
        pids = set()
        for _ in range(20):  # new connections spread over both workers
            try:
                r = await fetch(server, "/health/readiness", key=None)
            except OSError:
                return set()
            if r.code == 200:
                pids.add(orjson.loads(r.body)["worker_pid"])
        return pids if len(pids) == 2 else set()

    async def reported(after: float | None = None):
        r = await fetch(server, "/health")
        body = orjson.loads(r.body)
        fresh = body["checked_at"] is not None and (after is None or body["checked_at"] > after)
        return body if fresh and server.proc.poll() is None else None

    try:
        await poll(readiness_pids, "both workers serving")
        first = await poll(reported, "the first background report")
        assert first["healthy_count"] == 1
        await asyncio.sleep(1.0)  # a second loop, if there were one, would have probed by now
        assert fake_openai.count(CHAT_PATH) == 1  # one probe per deployment per round, not per worker
        # every worker answers from that one report
        for _ in range(10):
            assert (await poll(reported, "a report"))["checked_at"] == first["checked_at"]

        server.proc.send_signal(signal.SIGHUP)  # a reload wakes the loop for a new round
        await poll(lambda: reported(after=first["checked_at"]), "a second round after the reload")
        await asyncio.sleep(1.0)
        assert fake_openai.count(CHAT_PATH) == 2
    finally:
        if server.proc.poll() is not None:
            print(server.stderr_path.read_text(errors="replace"))
