"""Router state shared through Redis, end to end: two gateway instances on one Redis see each
other's cooldowns and usage-based-routing-v2 usage; a Redis that goes away mid-traffic fails no
request, and sharing resumes when it is back (issue 11, "Shared state").

Each test names its deployments with fresh ids: the Redis keys are per deployment id (as
LiteLLM's), so tests on the one Redis never see each other's counts. Waits are bounded polls on
a gateway's own mirror, never timing assertions."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
import uuid

import pytest
import redis
from tornado.netutil import bind_sockets

from tornado_proxy import server
from tornado_proxy.app import Gateway
from tests.conftest import error_of, wait_for
from tests.test_e2e_router import CHAT, deployment

WAIT = 10.0  # seconds any propagation may take before a test fails (it takes about one)


@pytest.fixture
def built(monkeypatch):
    """The ``Gateway`` objects the ``gateway`` fixture builds, in order, to look at their counters."""
    gateways: list[Gateway] = []

    class Recorded(Gateway):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            gateways.append(self)

    monkeypatch.setattr(server, "Gateway", Recorded)
    return gateways


def shared_pair(fake_a, fake_b, url: str, router: str = "", a: str = "", b: str = "") -> tuple[str, str, str]:
    """A config for group "pair" on ``url``'s Redis, with fresh deployment ids -> (yaml, id a, id b)."""
    id_a, id_b = f"dep-a-{uuid.uuid4().hex[:12]}", f"dep-b-{uuid.uuid4().hex[:12]}"
    yaml = ("model_list:" + deployment("pair", fake_a.base, id_a, a) + deployment("pair", fake_b.base, id_b, b)
            + f"\nrouter_settings:\n  cooldown_time: 30\n  redis_url: {url}\n" + router)
    return yaml, id_a, id_b


async def answered_by(fetch, gw, times: int) -> list[str]:
    ids = []
    for _ in range(times):
        r = await fetch(gw, "/v1/chat/completions", CHAT)
        assert r.code == 200, r.body
        ids.append(r.headers["x-litellm-model-id"])
    return ids


async def cool_down_on(fetch, gw, fake, id_cooled: str, counters) -> None:
    """Make ``fake`` answer one 429 on ``gw`` (a 429 cools a deployment of a pair down at once)."""
    fake.fail_times, fake.fail_status, fake.retry_after = 1, 429, "0"
    for _ in range(60):  # the shuffle picks it first half the time
        await answered_by(fetch, gw, 1)
        if fake.fail_times == 0:
            break
    assert id_cooled in counters.cooling([id_cooled])


async def test_a_cooldown_on_one_instance_is_honoured_by_the_other(gateway, built, fetch, redis_url,
                                                                   fake_openai, fake_openai_b):
    yaml, id_a, id_b = shared_pair(fake_openai, fake_openai_b, redis_url)
    gw_a, gw_b = await gateway(yaml), await gateway(yaml)
    counters_a, counters_b = built[0].router.counters, built[1].router.counters
    await cool_down_on(fetch, gw_a, fake_openai, id_a, counters_a)
    # dep-a is healthy again; instance B never saw it fail, yet skips it for the cooldown
    await wait_for(lambda: id_a in counters_b.cooling([id_a]), WAIT)
    assert 0 < counters_b.cooling([id_a])[id_a] <= 30
    before = len(fake_openai.received)
    assert set(await answered_by(fetch, gw_b, 20)) == {id_b}
    assert len(fake_openai.received) == before


async def test_failures_on_both_instances_add_up_to_one_cooldown(gateway, built, fetch, redis_url,
                                                                 fake_openai, fake_openai_b):
    yaml, id_a, id_b = shared_pair(fake_openai, fake_openai_b, redis_url, router="  allowed_fails: 3\n",
                                   a="\n      order: 1", b="\n      order: 2")  # dep-a first while usable
    gw_a, gw_b = await gateway(yaml), await gateway(yaml)
    counters_a, counters_b = built[0].router.counters, built[1].router.counters
    fake_openai.fail_times = 100
    for _ in range(2):
        assert await answered_by(fetch, gw_a, 1) == [id_b]  # dep-a failed, dep-b answered
    await wait_for(lambda: counters_b.failures(id_a) == 2, WAIT)
    for _ in range(2):  # the 4th failure in this minute, counted on B, is more than allowed_fails
        assert await answered_by(fetch, gw_b, 1) == [id_b]
    assert id_a in counters_b.cooling([id_a])
    await wait_for(lambda: id_a in counters_a.cooling([id_a]), WAIT)
    assert len(fake_openai.received) == 4


async def fresh_minute() -> None:
    """Usage counts are per calendar minute: start a usage test with enough of one left."""
    left = 60 - time.time() % 60
    if left < 20:
        await asyncio.sleep(left + 0.1)


async def test_usage_based_routing_v2_counts_both_instances(gateway, built, fetch, redis_url,
                                                            fake_openai, fake_openai_b):
    yaml, id_a, id_b = shared_pair(fake_openai, fake_openai_b, redis_url,
                                   router="  routing_strategy: usage-based-routing-v2\n",
                                   a="\n      rpm: 2", b="\n      rpm: 2")
    gw_a, gw_b = await gateway(yaml), await gateway(yaml)
    counters_b = built[1].router.counters
    await fresh_minute()
    assert sorted(await answered_by(fetch, gw_a, 3)) in ([id_a, id_a, id_b], [id_a, id_b, id_b])
    await wait_for(lambda: counters_b.usage(id_a)[0] + counters_b.usage(id_b)[0] == 3, WAIT)
    assert len(await answered_by(fetch, gw_b, 1)) == 1  # the group's 4th request this minute
    r = await fetch(gw_b, "/v1/chat/completions", CHAT)
    assert r.code == 429 and "rpm/tpm limit" in error_of(r)["message"]
    await wait_for(lambda: built[0].router.counters.usage(id_a)[0] + built[0].router.counters.usage(id_b)[0] == 4,
                   WAIT)
    r = await fetch(gw_a, "/v1/chat/completions", CHAT)
    assert r.code == 429
    assert len(fake_openai.received) + len(fake_openai_b.received) == 4


class ThrowawayRedis:
    """A ``redis-server`` on a free port that a test may kill and start again on that port."""

    def __init__(self):
        sock = bind_sockets(0, "127.0.0.1")[0]
        self.port = sock.getsockname()[1]
        sock.close()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                         "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=1)
        try:
            for _ in range(200):
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    time.sleep(0.05)
            raise AssertionError("redis-server did not start")
        finally:
            client.close()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def throwaway_redis():
    r = ThrowawayRedis()
    r.start()
    yield r
    r.kill()


async def test_a_redis_outage_fails_no_request_and_sharing_resumes(gateway, built, fetch, throwaway_redis,
                                                                   fake_openai, fake_openai_b, caplog):
    caplog.set_level(logging.INFO, "tornado_proxy.counters")
    yaml, id_a, id_b = shared_pair(fake_openai, fake_openai_b, throwaway_redis.url)
    gw_a, gw_b = await gateway(yaml), await gateway(yaml)
    counters_a, counters_b = built[0].router.counters, built[1].router.counters
    answered: list[int] = []

    async def traffic(until) -> None:
        """Requests to both instances, one after the other, until ``until()`` holds."""
        async def loop():
            while True:
                for gw in (gw_a, gw_b):
                    answered.append((await fetch(gw, "/v1/chat/completions", CHAT)).code)
                if until():
                    return
        await asyncio.wait_for(loop(), WAIT)

    await traffic(lambda: len(answered) >= 10)
    throwaway_redis.kill()  # mid-traffic
    await traffic(lambda: counters_a.down and counters_b.down)
    seen = len(answered)
    await traffic(lambda: len(answered) >= seen + 20)  # without Redis
    # while Redis is down, each instance routes on its own state
    await cool_down_on(fetch, gw_a, fake_openai, id_a, counters_a)
    assert id_a not in counters_b.cooling([id_a])
    throwaway_redis.start()  # empty: whatever B learns now went through this Redis
    await traffic(lambda: not counters_a.down and not counters_b.down)
    seen = len(answered)
    await traffic(lambda: len(answered) >= seen + 20)
    assert set(answered) == {200}, answered
    # shared again: the cooldown A set during the outage reached Redis, and B
    await wait_for(lambda: id_a in counters_b.cooling([id_a]), WAIT)
    messages = [r.getMessage() for r in caplog.records if r.name == "tornado_proxy.counters"]
    assert sum("Redis unavailable for router state" in m for m in messages) == 2  # once per instance
    assert sum("Redis answers again" in m for m in messages) == 2
