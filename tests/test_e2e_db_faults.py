"""Database faults: a gateway with database storage keeps serving when PostgreSQL goes away,
answers model writes with a 503, reports ``db: disconnected``, reconnects and catches up on
what it missed; start-up with the database down serves the config models and keeps trying;
``--require-db`` fails fast instead.

The PostgreSQL here is a throwaway cluster of this module's own (never the machine's shared
server), stopped and started by the tests. Every wait is a bounded poll.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid

import orjson
import psycopg2
import psycopg2.extensions
import pytest

from tornado_proxy.embedded import EmbeddedPostgres

from .conftest import MASTER_KEY, admin_sql, error_of
from .test_e2e_reload import terminate
from .test_embedded import private_dir
from .test_e2e_serve import PROXYCTL, child_env, free_port, refused, request, serve, wait_for  # noqa: F401

HELLO = [{"role": "user", "content": "hello outage"}]


@pytest.fixture(scope="module")
def cluster():
    with private_dir() as folder:  # not below pytest's base temp: see private_dir
        pg = EmbeddedPostgres(folder / "pg")
        pg.start()
        yield pg


@pytest.fixture
def fault_db(cluster):
    """A fresh database in the module's cluster; the cluster is running again afterwards."""
    cluster.start()
    name = f"f_{uuid.uuid4().hex[:12]}"
    admin_sql(cluster.dsn, f"CREATE DATABASE {name}")
    yield psycopg2.extensions.make_dsn(cluster.dsn, dbname=name)
    cluster.start()
    admin_sql(cluster.dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def config(dsn: str, refresh: float = 2) -> str:
    return f"""
    model_list:
      - model_name: yaml-model
        litellm_params: {{model: mock/yaml-model}}
    general_settings:
      store_model_in_db: true
      database_url: "{dsn}"
      model_refresh_interval: {refresh}
      database_connection_timeout: 2
      graceful_shutdown_timeout: 5
    """


async def until(predicate, timeout: float = 20.0, what: str = "condition"):
    """Await ``predicate()`` (a coroutine function) until truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        await asyncio.sleep(0.1)


async def db_state(fetch, gw) -> str:
    resp = await fetch(gw, "/health/readiness", key=None)
    assert resp.code == 200
    return orjson.loads(resp.body)["db"]


async def wait_db(fetch, gw, want: str, timeout: float = 20.0) -> None:
    async def reached() -> bool:
        return await db_state(fetch, gw) == want

    await until(reached, timeout, what=f"readiness db: {want}")


async def wait_served(fetch, gw, model: str, timeout: float = 10.0) -> None:
    async def served() -> bool:
        return await chat(fetch, gw, model) == 200

    await until(served, timeout, what=f"{model} to be served")


async def chat(fetch, gw, model: str) -> int:
    resp = await fetch(gw, "/v1/chat/completions", {"model": model, "messages": HELLO})
    if resp.code == 200:
        assert orjson.loads(resp.body)["choices"][0]["message"]["content"] == "hello outage"
    return resp.code


async def new_model(fetch, gw, name: str, model: str | None = None):
    return await fetch(gw, "/model/new", {"model_name": name,
                                          "litellm_params": {"model": model or f"mock/{name}", "api_key": "sk-x"}})


async def info(fetch, gw) -> dict:
    resp = await fetch(gw, "/model/info")
    assert resp.code == 200
    return {m["model_name"]: m for m in orjson.loads(resp.body)["data"]}


class Traffic:
    """Chat requests for ``models``, one after another, until stopped."""

    def __init__(self, fetch, gw, models: list[str]):
        self.results: list[tuple[str, int]] = []
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run(fetch, gw, models))

    async def _run(self, fetch, gw, models) -> None:
        while not self._stop.is_set():
            for model in models:
                self.results.append((model, await chat(fetch, gw, model)))

    async def more(self, n: int, what: str) -> None:
        seen = len(self.results)

        async def enough() -> bool:
            return len(self.results) >= seen + n

        await until(enough, what=what)

    async def stop(self) -> list[tuple[str, int]]:
        self._stop.set()
        await asyncio.wait_for(self._task, 30)
        return self.results


def expect_503(resp) -> str:
    assert resp.code == 503, resp.body
    error = error_of(resp)
    assert error["type"] == "service_unavailable"
    assert "Database unavailable" in error["message"] and "not saved" in error["message"]
    return error["message"]


async def test_postgres_stopped_and_started_while_requests_flow(cluster, fault_db, gateway, fetch):
    gw = await gateway(config(fault_db))
    assert await db_state(fetch, gw) == "connected"
    resp = await new_model(fetch, gw, "db-model")
    assert resp.code == 200, resp.body
    db_model_id = orjson.loads(resp.body)["model_id"]

    traffic = Traffic(fetch, gw, ["yaml-model", "db-model"])
    try:
        await traffic.more(4, "requests before the outage")
        await asyncio.to_thread(cluster.stop)
        await wait_db(fetch, gw, "disconnected")
        await traffic.more(10, "requests during the outage")

        # writes are refused loudly, whichever kind
        expect_503(await new_model(fetch, gw, "during-outage"))
        expect_503(await fetch(gw, "/model/update", {"id": db_model_id, "litellm_params": {"rpm": 5}}))
        expect_503(await fetch(gw, "/model/delete", {"id": db_model_id}))
        # reads are answered from memory
        listed = await info(fetch, gw)
        assert set(listed) == {"yaml-model", "db-model"} and listed["db-model"]["model_info"]["db_model"] is True
        resp = await fetch(gw, "/v1/models")
        assert resp.code == 200 and {m["id"] for m in orjson.loads(resp.body)["data"]} == {"yaml-model", "db-model"}

        await asyncio.to_thread(cluster.start)
        await wait_db(fetch, gw, "connected", timeout=30)
        # connected means usable: the first write after recovery goes through
        resp = await new_model(fetch, gw, "after-restart")
        assert resp.code == 200, resp.body
        assert await chat(fetch, gw, "after-restart") == 200
        await traffic.more(4, "requests after the recovery")
    finally:
        results = await traffic.stop()
    failed = [r for r in results if r[1] != 200]
    assert not failed, failed
    assert {m for m, _ in results} == {"yaml-model", "db-model"}
    # nothing written during the outage appeared later
    assert "during-outage" not in await info(fetch, gw)
    rows = await asyncio.to_thread(model_rows, fault_db)
    assert rows == {"yaml-model": "yaml", "db-model": "api", "after-restart": "api"}


def model_rows(dsn: str) -> dict[str, str]:
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        cur = conn.cursor()
        cur.execute("SELECT model_name, source FROM proxy_models")
        return dict(cur.fetchall())
    finally:
        conn.close()


@pytest.fixture
def locked_role(cluster, fault_db):
    """A login role owning the test database, so a test can lock one gateway out of it."""
    role = f"gw_{uuid.uuid4().hex[:8]}"
    dbname = psycopg2.extensions.parse_dsn(fault_db)["dbname"]
    admin_sql(cluster.dsn, f"CREATE ROLE {role} LOGIN")
    admin_sql(cluster.dsn, f"ALTER DATABASE {dbname} OWNER TO {role}")
    yield role
    admin_sql(cluster.dsn, f"ALTER ROLE {role} LOGIN")
    admin_sql(cluster.dsn, f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
    admin_sql(cluster.dsn, f"DROP ROLE IF EXISTS {role}")


async def test_changes_missed_while_disconnected_are_caught_up(cluster, fault_db, locked_role, gateway, fetch):
    # A has no periodic refresh to speak of: only its reconnection can bring it up to date
    a = await gateway(config(psycopg2.extensions.make_dsn(fault_db, user=locked_role), refresh=300))
    b = await gateway(config(fault_db))
    for name, model in (("doomed", "mock/doomed"), ("changed", "mock/before")):
        resp = await new_model(fetch, a, name, model)
        assert resp.code == 200, resp.body
    ids = {name: m["model_info"]["id"] for name, m in (await info(fetch, a)).items()}
    await wait_served(fetch, b, "doomed")  # B heard about them (NOTIFY)

    # A loses the database (its sessions are ended and it may not log in again); B does not
    await asyncio.to_thread(admin_sql, cluster.dsn, f"ALTER ROLE {locked_role} NOLOGIN")
    await asyncio.to_thread(admin_sql, cluster.dsn,
                            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{locked_role}'")
    await wait_db(fetch, a, "disconnected")
    expect_503(await new_model(fetch, a, "refused"))

    # meanwhile another instance adds, changes and removes models
    assert (await new_model(fetch, b, "late")).code == 200
    resp = await fetch(b, "/model/update", {"id": ids["changed"], "litellm_params": {"model": "mock/after"}})
    assert resp.code == 200, resp.body
    assert (await fetch(b, "/model/delete", {"id": ids["doomed"]})).code == 200
    # A cannot know yet: it serves its last good registry
    assert await chat(fetch, a, "late") == 400
    assert await chat(fetch, a, "doomed") == 200
    assert await db_state(fetch, a) == "disconnected"

    await asyncio.to_thread(admin_sql, cluster.dsn, f"ALTER ROLE {locked_role} LOGIN")
    await wait_db(fetch, a, "connected", timeout=30)
    await wait_served(fetch, a, "late")
    assert await chat(fetch, a, "doomed") == 400
    listed = await info(fetch, a)
    assert set(listed) == {"yaml-model", "late", "changed"}
    assert listed["changed"]["litellm_params"]["model"] == "mock/after"


async def test_startup_with_the_database_down_serves_the_config_and_keeps_trying(cluster, fault_db, gateway,
                                                                                 fetch):
    await asyncio.to_thread(cluster.stop)
    gw = await gateway(config(fault_db))
    assert await db_state(fetch, gw) == "disconnected"
    assert await chat(fetch, gw, "yaml-model") == 200
    expect_503(await new_model(fetch, gw, "too-early"))

    await asyncio.to_thread(cluster.start)
    await wait_db(fetch, gw, "connected", timeout=30)
    # the late connection migrated and synced the config models, and writes now work
    resp = await new_model(fetch, gw, "late-model")
    assert resp.code == 200, resp.body
    assert await chat(fetch, gw, "late-model") == 200
    assert await asyncio.to_thread(model_rows, fault_db) == {"yaml-model": "yaml", "late-model": "api"}


# --- --require-db (the real command) ----------------------------------------------------------------

def run_serve(tmp_path, general: str, *args: str, timeout: float = 30, **env) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text("model_list:\n  - model_name: demo\n    litellm_params: {model: mock/demo}\n"
                    f"general_settings: {general}\n")
    port = free_port()
    env.setdefault("LITELLM_MASTER_KEY", MASTER_KEY)
    proc = subprocess.run([sys.executable, str(PROXYCTL), "serve", "--config", str(path), "--host", "127.0.0.1",
                           "--port", str(port), "--num-workers", "2", "--pid-file", str(tmp_path / "gw.pid"),
                           *args],
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=child_env(**env))
    assert refused(port)
    assert not (tmp_path / "gw.pid").exists()
    return proc


def test_require_db_with_the_database_down_exits_at_once(tmp_path):
    dead = f"host={tmp_path} port=5432 user=postgres dbname=postgres"  # no server has a socket there
    proc = run_serve(tmp_path, f"{{store_model_in_db: true, database_url: '{dead}', database_connection_timeout: 2}}",
                     "--require-db")
    assert proc.returncode != 0
    assert "--require-db: the database is unavailable" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_require_db_without_database_storage_exits_at_once(tmp_path):
    proc = run_serve(tmp_path, "{}", "--require-db")
    assert proc.returncode != 0
    assert "--require-db: database storage is not enabled (store_model_in_db)" in proc.stderr
    proc = run_serve(tmp_path, "{store_model_in_db: true}", "--require-db")
    assert proc.returncode != 0
    assert "--require-db: store_model_in_db is on but no database_url / DATABASE_URL is set" in proc.stderr


def test_require_db_with_the_database_up_serves(serve, fault_db):
    served = serve(f"model_list: []\ngeneral_settings: {{store_model_in_db: true, database_url: '{fault_db}'}}\n",
                   2, "--require-db")
    status, _, body = request(served.port, "GET", "/health/readiness", key=None)
    assert status == 200 and json.loads(body)["db"] == "connected"
    assert terminate(served) == 0


async def test_known_keys_keep_working_while_postgres_is_down(cluster, fault_db, gateway, fetch):
    gw = await gateway(config(fault_db))
    resp = await fetch(gw, "/key/generate", {"models": ["yaml-model"]})
    assert resp.code == 200, resp.body
    key = orjson.loads(resp.body)["key"]
    assert (await fetch(gw, "/v1/chat/completions", {"model": "yaml-model", "messages": HELLO}, key=key)).code == 200
    await asyncio.to_thread(cluster.stop)
    await wait_db(fetch, gw, "disconnected")
    resp = await fetch(gw, "/v1/chat/completions", {"model": "yaml-model", "messages": HELLO}, key=key)
    assert resp.code == 200, resp.body
    resp = await fetch(gw, "/v1/models", key="sk-never-seen-before")
    assert resp.code == 503 and "key store is unavailable" in error_of(resp)["message"]
    expect_503(await fetch(gw, "/key/generate", {}))
    await asyncio.to_thread(cluster.start)
    await wait_db(fetch, gw, "connected", timeout=30)

    async def unknown_is_401() -> bool:
        return (await fetch(gw, "/v1/models", key="sk-never-seen-before")).code == 401
    await until(unknown_is_401, what="an unknown key to be refused as unknown again")
