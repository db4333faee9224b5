"""The spend log survives a PostgreSQL outage: requests keep flowing with a known key, their
events wait in memory and then in the spill file, and once the database is back every
request's row is there, each counted once in the key's spend.

The PostgreSQL here is the throwaway cluster of tests/test_e2e_db_faults.py (never the shared
server), stopped and started by the test. Every wait is a bounded poll."""

from __future__ import annotations

import asyncio

import orjson
import psycopg2
import pytest

from .test_e2e_db_faults import cluster, fault_db, until, wait_db  # noqa: F401 - fixtures
from .test_e2e_reload import terminate
from .test_e2e_serve import request, serve  # noqa: F401 - fixture

IN, OUT = 0.001, 0.002
HELLO = [{"role": "user", "content": "hello outage"}]


def config(dsn: str, queue_size: int) -> str:
    return f"""
    model_list:
      - model_name: priced
        litellm_params: {{model: mock/priced, input_cost_per_token: {IN}, output_cost_per_token: {OUT}}}
    general_settings:
      store_model_in_db: true
      database_url: "{dsn}"
      database_connection_timeout: 2
      graceful_shutdown_timeout: 5
      spend_queue_size: {queue_size}
    """


def query(dsn: str, sql: str) -> list[tuple]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


class Traffic:
    """Chat calls one after another with one key until stopped; remembers each call's id and cost."""

    def __init__(self, fetch, gw, key: str):
        self.calls: dict[str, float] = {}
        self.failures: list[int] = []
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run(fetch, gw, key))

    async def _run(self, fetch, gw, key: str) -> None:
        while not self._stop.is_set():
            r = await fetch(gw, "/v1/chat/completions", {"model": "priced", "messages": HELLO}, key=key)
            if r.code != 200:
                self.failures.append(r.code)
                continue
            usage = orjson.loads(r.body)["usage"]
            self.calls[r.headers["x-litellm-call-id"]] = usage["prompt_tokens"] * IN + usage["completion_tokens"] * OUT
            await asyncio.sleep(0.005)

    async def more(self, n: int) -> None:
        target = len(self.calls) + n

        async def enough() -> bool:
            return len(self.calls) >= target
        await until(enough, what=f"{n} more calls")

    async def stop(self) -> None:
        self._stop.set()
        await self._task


async def test_database_stopped_under_traffic_loses_no_spend_row(cluster, fault_db, gateway, fetch,  # noqa: F811
                                                                tmp_path):
    gw = await gateway(config(fault_db, queue_size=20))
    resp = await fetch(gw, "/key/generate", {"user_id": "outage-user"})
    assert resp.code == 200, resp.body
    key = orjson.loads(resp.body)["key"]
    traffic = Traffic(fetch, gw, key)
    try:
        await traffic.more(10)
        await asyncio.to_thread(cluster.stop)
        await wait_db(fetch, gw, "disconnected")
        await traffic.more(60)  # more than the queue holds: the rest goes to the spill file
        spilled = list((tmp_path / "spend").glob("*.jsonl"))
        assert spilled, "the events past spend_queue_size should be in the spill file"
        await asyncio.to_thread(cluster.start)
        await wait_db(fetch, gw, "connected", timeout=30)
        await traffic.more(10)
    finally:
        await traffic.stop()
    assert traffic.failures == []

    async def all_rows() -> bool:
        return len(query(fault_db, "SELECT request_id FROM proxy_spend_logs")) >= len(traffic.calls)
    await until(all_rows, timeout=30, what="every request's spend row")
    rows = {r[0] for r in query(fault_db, "SELECT request_id FROM proxy_spend_logs")}
    assert rows == set(traffic.calls)
    spend = query(fault_db, "SELECT spend FROM proxy_keys")[0][0]
    assert spend == pytest.approx(sum(traffic.calls.values()))
    assert query(fault_db, "SELECT spend FROM proxy_users WHERE user_id = 'outage-user'")[0][0] == pytest.approx(spend)
    assert not list((tmp_path / "spend").glob("*.jsonl"))


def test_sigterm_writes_the_queued_spend(serve, pg_dsn):
    """``proxyctl serve`` with two workers: calls, then SIGTERM at once; every call's row is in
    PostgreSQL after the exit (what was still queued was written on the way out)."""
    served = serve(f"""
    model_list:
      - model_name: priced
        litellm_params: {{model: mock/priced, input_cost_per_token: {IN}, output_cost_per_token: {OUT}}}
    general_settings:
      store_model_in_db: true
      database_url: "{pg_dsn}"
    """, 2)
    status, _, made = request(served.port, "POST", "/key/generate", {"key_alias": "flush"})
    assert status == 200, made
    key = orjson.loads(made)["key"]
    ids, total = set(), 0.0
    for _ in range(40):
        status, headers, reply = request(served.port, "POST", "/v1/chat/completions",
                                         {"model": "priced", "messages": HELLO}, key=key)
        assert status == 200, reply
        usage = orjson.loads(reply)["usage"]
        ids.add(headers["x-litellm-call-id"])
        total += usage["prompt_tokens"] * IN + usage["completion_tokens"] * OUT
    assert terminate(served) == 0
    assert {r[0] for r in query(pg_dsn, "SELECT request_id FROM proxy_spend_logs")} == ids
    assert query(pg_dsn, "SELECT spend FROM proxy_keys")[0][0] == pytest.approx(total)
    assert key not in served.stderr()
