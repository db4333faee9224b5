"""The Redis response cache going away mid-traffic: a throwaway ``redis-server`` is killed
(SIGKILL) while requests are in flight, every request is still answered by the fake provider,
the cache-error metric counts the skipped reads and writes, and once Redis is started again on
the same port the gateway uses it again by itself. And the skipping after a failure, alone."""

import asyncio
import re
import time

import orjson
import pytest
import redis

from tornado_proxy.cache import CacheUnavailable, RedisCache
from tests.conftest import ThrowawayRedis, free_port, wait_for
from tests.test_e2e_cache import CHAT, ask, config

SLOW_BOUND = 5.0  # seconds: far above the 0.2 s Redis timeout plus the provider's latency


async def cache_errors(fetch, gw) -> float:
    metrics = (await fetch(gw, "/metrics")).body.decode()
    found = re.search(r'^litellm_cache_errors_metric_total\{model="gpt-fake"\} (\S+)$', metrics, re.M)
    return float(found.group(1)) if found else 0.0


def is_hit(response) -> bool:
    return response.headers.get("x-litellm-cache-hit") == "True"


async def test_redis_killed_mid_traffic_then_restarted(gateway, fetch, fake_openai, tmp_path):
    server = ThrowawayRedis(free_port(), tmp_path)
    server.start()
    try:
        await run_outage(gateway, fetch, fake_openai, server)
    finally:
        server.kill()


async def run_outage(gateway, fetch, fake_openai, server):
    gw = await gateway(config(fake_openai, f"type: redis\n        host: 127.0.0.1\n        port: {server.port}"))
    answered: list[tuple[str, object, float]] = []  # (prompt, response, seconds)

    async def timed(prompt: str):
        started = time.perf_counter()
        response = await fetch(gw, CHAT, ask(prompt))
        answered.append((prompt, response, time.perf_counter() - started))
        return response

    def provider_calls() -> int:
        return fake_openai.count("/chat/completions")

    # Redis up: concurrent misses, stored, then concurrent hits
    warm = [f"warm {i}" for i in range(4)]
    assert not any(is_hit(r) for r in await asyncio.gather(*(timed(p) for p in warm)))
    client = redis.Redis.from_url(server.url)
    await wait_for(lambda: len(client.keys("litellm-cache:*")) == len(warm))
    client.close()
    assert all(is_hit(r) for r in await asyncio.gather(*(timed(p) for p in warm)))
    assert provider_calls() == len(warm)
    errors_before = await cache_errors(fetch, gw)

    # killed while misses wait on the provider (their store fails) and hits come in alongside
    fake_openai.latency = 0.5
    calls_before = provider_calls()
    in_flight = [asyncio.create_task(timed(f"flight {i}")) for i in range(3)]
    await wait_for(lambda: provider_calls() == calls_before + 3)
    server.kill()
    # during the outage: stored answers cannot be read, nothing can be stored
    during = [asyncio.create_task(timed(p)) for p in ("warm 0", "warm 1", "flight 0", "outage 0")]
    await asyncio.gather(*in_flight, *during)
    fake_openai.latency = 0.0
    for prompt in ("warm 2", "flight 1", "outage 0"):
        await timed(prompt)

    for prompt, response, seconds in answered:
        assert response.code == 200, (prompt, response.code)
        assert orjson.loads(response.body)["choices"][0]["message"]["content"] == "echo: " + prompt
        assert seconds < SLOW_BOUND, (prompt, seconds)
    after_kill = answered[2 * len(warm):]
    assert not any(is_hit(r) for _, r, _ in after_kill)
    assert provider_calls() == sum(1 for _, r, _ in answered if not is_hit(r))
    assert await cache_errors(fetch, gw) > errors_before

    # Redis back on the same port (empty): the gateway stores and hits again by itself
    server.start()
    deadline = time.monotonic() + 30
    hit = None
    while time.monotonic() < deadline:
        calls = provider_calls()
        response = await timed("after restart")
        assert response.code == 200
        if is_hit(response):
            hit = response
            assert provider_calls() == calls  # answered from Redis, not the provider
            break
        await asyncio.sleep(0.2)
    assert hit is not None, "the gateway did not use Redis again after it came back"
    assert orjson.loads(hit.body)["choices"][0]["message"]["content"] == "echo: after restart"
    assert is_hit(await timed("after restart"))


class HeldClient:
    """Stands in for the ``redis.asyncio`` client in a test of the skipping logic alone: each
    ``get`` waits until the test answers it."""

    def __init__(self):
        self.pending: list[asyncio.Future] = []

    async def get(self, name):
        answer = asyncio.get_running_loop().create_future()
        self.pending.append(answer)
        return await answer


async def test_a_call_answered_after_a_timeout_ends_the_skipping():
    client = HeldClient()
    cache = RedisCache(client, timeout=0.05)
    slow = asyncio.create_task(cache.get("k", None))  # this one times out
    await wait_for(lambda: len(client.pending) == 1)
    cache.timeout = 30.0
    answered = asyncio.create_task(cache.get("k", None))  # under way when the first one fails
    await wait_for(lambda: len(client.pending) == 2)
    with pytest.raises(CacheUnavailable):
        await slow
    assert not cache.usable()
    with pytest.raises(CacheUnavailable):
        await cache.get("k", None)  # new calls are skipped
    client.pending[1].set_result(b"v")
    assert await answered == b"v"
    assert cache.usable()  # Redis answered: no waiting out REDIS_CACHE_RETRY
