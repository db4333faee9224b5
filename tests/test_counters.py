"""The router's counters: this worker's own, and the Redis-shared mirror (its round trips as
data, with a fake clock; then two mirrors on a real Redis, and one on a Redis that is gone)."""

from __future__ import annotations

import logging
import uuid

from tornado_proxy.config import Secret, Settings
from tornado_proxy.counters import KEY_PREFIX, MINUTE_TTL, LocalCounters, SharedCounters, cooldown_key, usage_key
from tornado_proxy.ratelimit import redis_client
from tests.test_e2e_upstream_errors import closed_port

MINUTE = 1000  # the fake wall clock starts in this minute


class Clock:
    def __init__(self, now: float = MINUTE * 60 + 10.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def shared(ids=("a", "b"), client=None, clock=None) -> tuple[SharedCounters, Clock]:
    clock = clock or Clock()
    return SharedCounters(client, lambda: ids, clock=clock, wall=clock), clock


def replies_for(sync, counts: dict[str, tuple[int, int, int]] | None = None, ttl_ms: dict[str, int] | None = None):
    """What Redis answers to ``sync``: OK for every write, then the MGET and one PTTL per id."""
    counts, ttl_ms = counts or {}, ttl_ms or {}
    mget = [None if not counts.get(d, (0, 0, 0))[i] else str(counts[d][i]).encode()
            for i in range(3) for d in sync.ids]
    return [True] * sync.reads + [mget] + [ttl_ms.get(d, -2) for d in sync.ids]


# --- LocalCounters ----------------------------------------------------------------------------

def test_local_counters_count_per_minute_and_cool_down():
    clock = Clock()
    c = LocalCounters(clock=clock, wall=clock)
    c.add_request("a"); c.add_tokens("a", 7)
    assert c.usage("a") == (1, 7) and c.add_failure("a") == 1 and c.add_failure("a") == 2
    c.cool_down("a", 5)
    assert set(c.cooling(["a", "b"])) == {"a"}
    assert c.add_failure("a") == 1  # a fresh count once cooled down
    clock.now += 5.01
    assert c.cooling(["a"]) == {}
    clock.now += 60
    assert c.usage("a") == (0, 0)


# --- SharedCounters as data -------------------------------------------------------------------

def test_writes_change_the_mirror_at_once_and_wait_for_the_round_trip():
    c, _ = shared()
    c.add_request("a"); c.add_request("a"); c.add_tokens("a", 30); c.add_failure("b")
    assert c.usage("a") == (2, 30)  # no Redis needed to read
    sync = c.begin_sync()
    assert sync.commands[:sync.reads] == (
        ("INCRBY", usage_key("a", MINUTE, "requests"), 2), ("EXPIRE", usage_key("a", MINUTE, "requests"), MINUTE_TTL),
        ("INCRBY", usage_key("a", MINUTE, "tokens"), 30), ("EXPIRE", usage_key("a", MINUTE, "tokens"), MINUTE_TTL),
        ("INCRBY", usage_key("b", MINUTE, "failures"), 1), ("EXPIRE", usage_key("b", MINUTE, "failures"), MINUTE_TTL))
    assert sync.ids == ("a", "b")
    mget = sync.commands[sync.reads]
    assert mget[0] == "MGET" and mget[1:] == tuple(usage_key(d, MINUTE, k) for k in ("requests", "tokens", "failures")
                                                   for d in ("a", "b"))
    assert sync.commands[sync.reads + 1:] == (("PTTL", cooldown_key("a")), ("PTTL", cooldown_key("b")))
    assert c.begin_sync().reads == 0  # sent once


def test_the_mirror_is_the_shared_counts_plus_what_was_counted_since():
    c, _ = shared()
    c.add_request("a")
    sync = c.begin_sync()
    c.add_request("a"); c.add_tokens("b", 5)  # during the round trip
    c.end_sync(sync, replies_for(sync, {"a": (7, 100, 2), "b": (0, 40, 0)}))
    assert c.usage("a") == (8, 100) and c.usage("b") == (0, 45)
    assert c.add_failure("a") == 3  # two counted elsewhere, this one


def test_a_cooldown_set_elsewhere_reaches_the_mirror_for_the_time_it_has_left():
    c, clock = shared()
    sync = c.begin_sync()
    c.end_sync(sync, replies_for(sync, ttl_ms={"b": 4000}))
    assert c.cooling(["a", "b"]) == {"b": 4.0}
    clock.now += 4.01
    assert c.cooling(["a", "b"]) == {}


def test_a_cooldown_here_is_sent_with_its_time_left_and_restarts_the_failure_count():
    c, clock = shared()
    c.add_failure("a"); c.add_failure("a")
    c.cool_down("a", 30)
    clock.now += 10
    sync = c.begin_sync()
    writes = sync.commands[:sync.reads]
    assert writes == (("DEL", usage_key("a", MINUTE, "failures")), ("SET", cooldown_key("a"), "1", "PX", 20000))
    # a round trip begun before the cooldown must not bring the old count back
    c2, _ = shared()
    c2.add_failure("a")
    early = c2.begin_sync()
    c2.cool_down("a", 30)
    c2.end_sync(early, replies_for(early, {"a": (0, 0, 5)}))
    assert c2.add_failure("a") == 1


def test_a_longer_local_cooldown_is_kept_against_a_shorter_shared_one():
    c, _ = shared()
    sync = c.begin_sync()
    c.cool_down("a", 30)  # not sent yet
    c.end_sync(sync, replies_for(sync, ttl_ms={"a": 1000}))
    assert c.cooling(["a"])["a"] == 30


def test_writes_of_a_failed_round_trip_go_with_the_next():
    c, _ = shared()
    c.add_request("a"); c.add_failure("b")
    c.failed_sync(c.begin_sync())  # Redis did not answer
    c.add_request("a")
    c.cool_down("b", 5)  # newer than the failure put back: that one is dropped
    sync = c.begin_sync()
    writes = sync.commands[:sync.reads]
    assert ("INCRBY", usage_key("a", MINUTE, "requests"), 2) in writes
    assert not any(w[0] == "INCRBY" and w[1] == usage_key("b", MINUTE, "failures") for w in writes)
    assert ("DEL", usage_key("b", MINUTE, "failures")) in writes and writes[-1][:2] == ("SET", cooldown_key("b"))


def test_a_new_minute_drops_unsent_counts_but_not_cooldowns():
    c, clock = shared()
    c.add_request("a"); c.cool_down("b", 90)
    clock.now += 60
    assert c.usage("a") == (0, 0)
    sync = c.begin_sync()
    assert [w[0] for w in sync.commands[:sync.reads]] == ["SET"]
    # replies to a round trip of the minute before do not count in this one
    c3, clock3 = shared()
    old = c3.begin_sync()
    clock3.now += 60
    c3.end_sync(old, replies_for(old, {"a": (9, 9, 9)}))
    assert c3.usage("a") == (0, 0)


def test_ids_written_here_are_mirrored_even_outside_the_registry():
    c, _ = shared(ids=("a",))
    c.add_request("wild")
    assert c.begin_sync().ids == ("a", "wild")


# --- on a real Redis --------------------------------------------------------------------------

async def test_two_mirrors_share_usage_failures_and_cooldowns(redis_url):
    ids = (f"a-{uuid.uuid4().hex}", f"b-{uuid.uuid4().hex}")
    one = SharedCounters(redis_client(Settings(redis_url=Secret(redis_url))), lambda: ids)
    two = SharedCounters(redis_client(Settings(redis_url=Secret(redis_url))), lambda: ids)
    try:
        one.add_request(ids[0]); one.add_tokens(ids[0], 12); one.add_failure(ids[1])
        two.add_request(ids[0])
        assert await one.sync_once() and await two.sync_once() and await one.sync_once()
        assert one.usage(ids[0]) == two.usage(ids[0]) == (2, 12)
        assert two.add_failure(ids[1]) == 2
        two.cool_down(ids[1], 30)
        assert await two.sync_once() and await one.sync_once()
        assert 29 < one.cooling(ids)[ids[1]] <= 30
        assert one.add_failure(ids[1]) == 1  # the cooldown restarted the count everywhere
    finally:
        await one.client.aclose()
        await two.client.aclose()


async def test_a_redis_that_is_gone_leaves_this_workers_counts_and_logs_once(caplog):
    c = SharedCounters(redis_client(Settings(redis_host="127.0.0.1", redis_port=closed_port())), lambda: ("a",))
    try:
        with caplog.at_level(logging.WARNING, "tornado_proxy.counters"):
            c.add_request("a"); c.cool_down("a", 30)
            assert not await c.sync_once() and not await c.sync_once()
            c.add_request("a")
        assert c.usage("a") == (2, 0) and "a" in c.cooling(["a"]) and c.down
        warnings = [r.getMessage() for r in caplog.records if r.name == "tornado_proxy.counters"]
        assert len(warnings) == 1 and "Redis unavailable for router state" in warnings[0]
        sync = c.begin_sync()  # everything unsent is still on its way
        assert ("INCRBY", usage_key("a", c._minute, "requests"), 2) in sync.commands
        assert any(w[:2] == ("SET", cooldown_key("a")) for w in sync.commands)
    finally:
        await c.client.aclose()


def test_keys_are_namespaced():
    assert usage_key("d", 5, "tokens") == f"{KEY_PREFIX}:d:5:tokens"
    assert cooldown_key("d").startswith(KEY_PREFIX + ":")


# --- wiring -----------------------------------------------------------------------------------

async def test_the_gateway_shares_router_state_only_with_redis(tmp_path, redis_url):
    from tornado_proxy.app import Gateway
    from tornado_proxy.config import load

    path = tmp_path / "c.yaml"
    path.write_text("model_list: [{model_name: m, litellm_params: {model: mock/m}, model_info: {id: m-1}}]\n")
    alone = Gateway(load(path, environ={}))
    assert type(alone.router.counters) is LocalCounters and alone.shared_counters is None  # the cheap path
    path.write_text(path.read_text() + f"router_settings: {{redis_url: {redis_url}}}\n")
    gw = Gateway(load(path, environ={}))
    try:
        assert gw.router.counters is gw.shared_counters and gw.shared_counters.client is gw.limiter.redis.client
        assert gw.shared_counters.begin_sync().ids == ("m-1",)  # the registry's deployments are mirrored
    finally:
        for g in (alone, gw):
            await g.limiter.close()
            g.limiter.table.close()
