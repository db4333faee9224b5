"""Rate limits: windows, limits, headers, the shared table across processes, and Redis."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid

import pytest
from tornado.netutil import bind_sockets

from tornado_proxy.config import Secret, Settings, load
from tornado_proxy.errors import RateLimitError
from tornado_proxy.ratelimit import LimitScope, LimitTable, RateLimiter, RedisCounters, redis_client

T0 = 60.0 * 28_000_000  # the start of a minute; tests inject ``now`` and never sleep


@pytest.fixture
def table():
    t = LimitTable(slots=256, workers=2)
    yield t
    t.close()


def key(rpm=None, tpm=None, parallel=None, id="h-key"):
    return LimitScope("key", id, rpm_limit=rpm, tpm_limit=tpm, max_parallel_requests=parallel)


async def refused(limiter, scopes, now) -> RateLimitError:
    with pytest.raises(RateLimitError) as info:
        await limiter.admit(scopes, now=now)
    assert info.value.status == 429
    return info.value


# --- windows and limits ---------------------------------------------------------------------

async def test_rpm_counts_a_calendar_minute_and_names_the_limit(table):
    limiter, scope = RateLimiter(table), key(rpm=3)
    for i in range(3):
        limiter.finish(await limiter.admit([scope], now=T0 + 10 + i), 0, now=T0 + 10 + i)
    error = await refused(limiter, [scope], T0 + 45.5)
    assert error.message == ("Rate limit exceeded for api_key: h-key. Limit type: requests. Current limit: 3, "
                             "Remaining: 0. Limit resets at: 2023-03-28 10:41:00 UTC")
    assert error.headers["Retry-After"] == "15"  # ceil(60 - 45.5)
    assert error.headers["rate_limit_type"] == "requests"
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    assert error.headers["x-ratelimit-limit-requests"] == "3"
    assert error.headers["x-ratelimit-api_key-remaining-requests"] == "0"
    await limiter.admit([scope], now=T0 + 60)  # the next minute starts from zero


async def test_a_refused_request_counts_nowhere(table):
    """All or nothing: the team refuses, so the key is not charged either (LiteLLM's v3 limiter
    increments before it checks; here a rejected request leaves every count as it was)."""
    limiter = RateLimiter(table)
    k, team = key(rpm=5), LimitScope("team", "t1", rpm_limit=1)
    await limiter.admit([k, team], now=T0)
    error = await refused(limiter, [k, team], T0)
    assert "for team: t1. Limit type: requests. Current limit: 1" in error.message
    assert table.usage(k, T0).requests == 1
    for _ in range(3):
        await refused(limiter, [k, team], T0)
    assert table.usage(k, T0).requests == 1 and table.usage(team, T0).requests == 1


async def test_tpm_refuses_once_this_minutes_tokens_are_used(table):
    limiter, scope = RateLimiter(table), key(tpm=100)
    limiter.finish(await limiter.admit([scope], now=T0), 60, now=T0 + 1)
    admission = await limiter.admit([scope], now=T0 + 2)
    assert admission.headers["x-ratelimit-remaining-tokens"] == "40"
    limiter.finish(admission, 40, now=T0 + 3)
    error = await refused(limiter, [scope], T0 + 4)
    assert "Limit type: tokens. Current limit: 100, Remaining: 0" in error.message
    assert error.headers["x-ratelimit-remaining-tokens"] == "0"
    assert error.headers["Retry-After"] == "56"
    await limiter.admit([scope], now=T0 + 61)


async def test_tokens_count_in_the_minute_the_request_finishes(table):
    limiter, scope = RateLimiter(table), key(tpm=100)
    admission = await limiter.admit([scope], now=T0 + 59)
    limiter.finish(admission, 100, now=T0 + 61)
    assert table.usage(scope, T0 + 61).tokens == 100
    await refused(limiter, [scope], T0 + 62)


async def test_max_parallel_requests_and_idempotent_finish(table):
    limiter, scope = RateLimiter(table), key(parallel=2)
    first = await limiter.admit([scope], now=T0)
    second = await limiter.admit([scope], now=T0)
    error = await refused(limiter, [scope], T0)
    assert error.message == ("Rate limit exceeded for api_key: h-key. Limit type: max_parallel_requests. "
                             "Current limit: 2, Remaining: 0. Limit resets when a running request finishes")
    assert error.headers["Retry-After"] == "1"
    assert error.headers["x-ratelimit-api_key-remaining-max_parallel_requests"] == "0"
    for _ in range(3):
        limiter.finish(first, 10, now=T0)  # only the first call counts
    assert table.usage(scope, T0).parallel == 1 and table.usage(scope, T0).tokens == 10
    third = await limiter.admit([scope], now=T0)
    await refused(limiter, [scope], T0)
    limiter.finish(second, 0, now=T0)
    limiter.finish(third, 0, now=T0)
    assert table.usage(scope, T0).parallel == 0


async def test_success_headers_per_scope_and_the_tightest_overall(table):
    limiter = RateLimiter(table)
    scopes = [key(rpm=10, tpm=1000, parallel=5), LimitScope("team", "t", rpm_limit=4),
              LimitScope("user", "u", tpm_limit=50), LimitScope("user", "free")]
    admission = await limiter.admit(scopes, now=T0)
    assert admission.headers == {
        "x-ratelimit-api_key-remaining-requests": "9", "x-ratelimit-api_key-limit-requests": "10",
        "x-ratelimit-api_key-remaining-tokens": "1000", "x-ratelimit-api_key-limit-tokens": "1000",
        "x-ratelimit-api_key-remaining-max_parallel_requests": "4",
        "x-ratelimit-api_key-limit-max_parallel_requests": "5",
        "x-ratelimit-team-remaining-requests": "3", "x-ratelimit-team-limit-requests": "4",
        "x-ratelimit-user-remaining-tokens": "50", "x-ratelimit-user-limit-tokens": "50",
        "x-ratelimit-remaining-requests": "3", "x-ratelimit-limit-requests": "4",
        "x-ratelimit-remaining-tokens": "50", "x-ratelimit-limit-tokens": "50",
    }
    assert admission.scopes == tuple(scopes[:3])  # a scope without limits is not counted
    unlimited = await limiter.admit([LimitScope("team", "none")], now=T0)
    assert unlimited.headers == {}
    limiter.finish(unlimited, 5)


def test_scope_kind_is_checked():
    with pytest.raises(ValueError):
        LimitScope("org", "x", rpm_limit=1)


# --- the table ------------------------------------------------------------------------------

async def test_full_table_admits_unlimited_with_a_warning_and_reuses_stale_slots(caplog):
    table = LimitTable(slots=2, workers=1)
    try:
        limiter = RateLimiter(table)
        held = [await limiter.admit([key(parallel=1, id=f"k{i}")], now=T0) for i in range(2)]
        extra = key(parallel=1, id="k-extra")
        with caplog.at_level(logging.WARNING, logger="tornado_proxy.ratelimit"):
            a = await limiter.admit([extra], now=T0)
            b = await limiter.admit([extra], now=T0)  # over its limit, but the table has no room
        assert [r.message for r in caplog.records].count(
            "rate-limit table full (2 slots): api_key k-extra is not limited for this request; more scopes "
            "are active this minute than the table holds") == 1  # once a minute, not per request
        assert a.entries == () and b.entries == ()
        limiter.finish(a, 5)
        for admission in held:
            limiter.finish(admission, 0, now=T0)
        # finished and from an older minute: the slots are free for other scopes
        await limiter.admit([extra], now=T0 + 60)
        await refused(limiter, [extra], T0 + 60)
    finally:
        table.close()


async def test_a_dead_workers_running_requests_are_released(table):
    """The supervisor calls ``release_worker`` when a worker dies holding parallel slots."""
    scope = key(parallel=2)
    alive, dead = RateLimiter(table, worker=0), RateLimiter(table, worker=1)
    await alive.admit([scope], now=T0)
    lost = await dead.admit([scope], now=T0)
    await refused(alive, [scope], T0)
    assert table.release_worker(1) == 1
    assert table.usage(scope, T0).parallel == 1
    await alive.admit([scope], now=T0)
    dead.finish(lost, 7, now=T0)  # late: frees nothing that belongs to the live worker
    assert table.usage(scope, T0).parallel == 2 and table.usage(scope, T0).tokens == 7


def hammer(table: LimitTable, worker: int, scope: LimitScope, write_fd: int) -> None:
    """In a forked child: admit until the minute's requests are gone; report admitted and the
    most running requests the table ever showed while this child held one."""
    async def run():
        limiter = RateLimiter(table, worker)
        admitted = peak = 0
        while True:
            try:
                admission = await limiter.admit([scope], now=T0)
            except RateLimitError as exc:
                if exc.headers["rate_limit_type"] == "requests":
                    return admitted, peak
                await asyncio.sleep(0)
                continue
            admitted += 1
            peak = max(peak, table.usage(scope, T0).parallel)
            await asyncio.sleep(0.0005)
            peak = max(peak, table.usage(scope, T0).parallel)
            limiter.finish(admission, 2, now=T0)

    admitted, peak = asyncio.run(run())
    os.write(write_fd, f"{admitted} {peak}\n".encode())


def test_four_processes_share_one_table_exactly():
    table = LimitTable(slots=1024, workers=4)
    scope = key(rpm=100, parallel=3, id="shared")
    read_fd, write_fd = os.pipe()
    pids = []
    for worker in range(4):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            status = 1
            try:
                os.close(read_fd)
                hammer(table, worker, scope, write_fd)
                status = 0
            finally:
                os._exit(status)
        pids.append(pid)
    os.close(write_fd)
    statuses = [os.waitpid(pid, 0)[1] for pid in pids]
    with os.fdopen(read_fd) as pipe:
        results = [tuple(map(int, line.split())) for line in pipe.read().splitlines()]
    assert statuses == [0, 0, 0, 0] and len(results) == 4
    assert sum(admitted for admitted, _ in results) == 100
    assert max(peak for _, peak in results) <= 3
    usage = table.usage(scope, T0)
    assert (usage.requests, usage.tokens, usage.parallel) == (100, 200, 0)
    table.close()


# --- Redis: across instances ----------------------------------------------------------------

def redis_limiter(url: str) -> RateLimiter:
    """One instance: its own table, the shared Redis (built as the gateway builds it)."""
    return RateLimiter(LimitTable(slots=64), redis=redis_client(Settings(redis_url=Secret(url))))


async def close(*limiters: RateLimiter) -> None:
    for limiter in limiters:
        await limiter.close()
        limiter.table.close()


async def test_two_instances_share_limits_through_redis(redis_url):
    a, b = redis_limiter(redis_url), redis_limiter(redis_url)
    try:
        rpm = LimitScope("team", uuid.uuid4().hex, rpm_limit=10)
        admitted = 0
        for i in range(25):
            limiter = (a, b)[i % 2]
            try:
                limiter.finish(await limiter.admit([rpm], now=T0), 1, now=T0)
                admitted += 1
            except RateLimitError as exc:
                assert "Limit type: requests. Current limit: 10" in exc.message
        assert admitted == 10

        parallel = LimitScope("key", uuid.uuid4().hex, max_parallel_requests=3)
        held = [await a.admit([parallel], now=T0), await b.admit([parallel], now=T0), await a.admit([parallel], now=T0)]
        assert held[2].headers["x-ratelimit-api_key-remaining-max_parallel_requests"] == "0"
        for limiter in (a, b):
            error = await refused(limiter, [parallel], T0)
            assert error.headers["rate_limit_type"] == "max_parallel_requests"
        b.finish(held[1], 0, now=T0)
        b.finish(held[1], 0, now=T0)  # idempotent here too
        await b.flush()
        again = await b.admit([parallel], now=T0)
        await refused(a, [parallel], T0)

        tpm = LimitScope("user", uuid.uuid4().hex, tpm_limit=100)
        a.finish(await a.admit([tpm], now=T0), 150, now=T0)
        await a.flush()
        error = await refused(b, [tpm], T0)
        assert "Limit type: tokens. Current limit: 100" in error.message
        await a.admit([tpm], now=T0 + 60)
        for admission in (held[0], held[2], again):
            a.finish(admission, 0, now=T0)
    finally:
        await close(a, b)


def closed_port() -> int:
    sock = bind_sockets(0, "127.0.0.1")[0]
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    return port


async def test_unreachable_redis_falls_back_to_the_table(caplog):
    limiter = RateLimiter(LimitTable(slots=64),
                          redis=redis_client(Settings(redis_host="127.0.0.1", redis_port=closed_port())))
    try:
        scope = key(rpm=2, id=uuid.uuid4().hex)
        with caplog.at_level(logging.WARNING, logger="tornado_proxy.ratelimit"):
            first = await limiter.admit([scope], now=T0)
            limiter.finish(first, 3, now=T0)
            await limiter.admit([scope], now=T0)
            await refused(limiter, [scope], T0)  # the table still counts exactly
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "Redis unavailable for rate limits" in warnings[0]
        assert first.entries  # counted in the table
        assert limiter.table.usage(scope, T0).tokens == 3
    finally:
        await close(limiter)


async def test_redis_lost_after_admission_finish_does_not_raise(redis_url, caplog):
    limiter = redis_limiter(redis_url)
    try:
        scope = key(parallel=1, id=uuid.uuid4().hex)
        admission = await limiter.admit([scope], now=T0)
        assert admission.token is not None  # counted in Redis
        shared, limiter.redis = limiter.redis, RedisCounters(  # Redis is gone
            redis_client(Settings(redis_host="127.0.0.1", redis_port=closed_port())))
        await shared.close()
        with caplog.at_level(logging.WARNING, logger="tornado_proxy.ratelimit"):
            limiter.finish(admission, 10, now=T0)
            await limiter.flush()
            fallback = await limiter.admit([scope], now=T0)  # served from the table meanwhile
        assert fallback.entries
        assert any("Redis unavailable" in r.getMessage() for r in caplog.records)
        limiter.finish(fallback, 0, now=T0)
    finally:
        await close(limiter)


# --- settings -------------------------------------------------------------------------------

def test_redis_settings_as_litellm_names_them(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("router_settings: {redis_host: os.environ/REDIS_HOST, redis_port: 6390, "
                    "redis_password: os.environ/REDIS_PASSWORD}\n")
    s = load(path, environ={"REDIS_HOST": "cache.internal", "REDIS_PASSWORD": "pw"}).settings
    assert (s.redis_host, s.redis_port, s.redis_password.reveal(), s.redis_url) == ("cache.internal", 6390, "pw", None)
    s = load(path.with_name("none.yaml") if path.with_name("none.yaml").write_text("{}\n") else None,
             environ={"REDIS_URL": "redis://:pw@r:6379/1"}).settings
    assert s.redis_url.reveal() == "redis://:pw@r:6379/1" and repr(s.redis_url) == "***"
    assert redis_client(Settings()) is None


# --- wiring -----------------------------------------------------------------------------------

async def test_gateway_limiter_uses_the_supervisors_table_or_its_own(tmp_path, redis_url):
    from tornado_proxy.app import Gateway

    path = tmp_path / "c.yaml"
    path.write_text("model_list: []\n")
    alone = Gateway(load(path, environ={}))
    assert alone.limiter.redis is None and alone.limiter.worker == 0
    shared = LimitTable(slots=64, workers=4)
    path.write_text(f"model_list: []\nrouter_settings: {{redis_url: {redis_url}}}\n")
    worker = Gateway(load(path, environ={}), limits=shared, worker=3)
    try:
        assert worker.limiter.table is shared and worker.limiter.worker == 3
        admission = await worker.limiter.admit([key(rpm=5, id=uuid.uuid4().hex)])
        assert admission.token is not None  # counted in Redis
        worker.limiter.finish(admission, 1)
    finally:
        for gw in (alone, worker):
            await gw.limiter.close()
        alone.limiter.table.close()
        shared.close()
