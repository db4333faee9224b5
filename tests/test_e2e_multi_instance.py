"""Many gateways on one database: a model added, changed or removed through the API on one
instance, or by `proxyctl sync` from a third party, is served by every other instance (every
worker) within 2 seconds, through PostgreSQL LISTEN/NOTIFY.

The only time bound asserted is the issue's "within 2 s", as a bounded poll. The periodic full
refresh runs every 30 s by default, so within 2 s only a notification can have done it.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
import time

import orjson
import pytest
from click.testing import CliRunner

from tornado_proxy.cli import cli

from . import test_e2e_serve as serve_helpers
from .conftest import MASTER_KEY, PROVIDER_KEY
from .test_e2e_model_api import body_of, db_config, table

PROPAGATION = 2.0  # seconds, from the issue
POLL = 0.02
HELLO = [{"role": "user", "content": "hello instances"}]

GATEWAY_MODELS = """
  - model_name: shared-yaml
    litellm_params: {model: mock/shared}
    model_info: {id: shared-yaml-id}
"""


async def served_within(fetch, gw, check, what: str, limit: float = PROPAGATION, since: float | None = None):
    """Poll ``gw`` until ``await check(gw)`` is true; fail once ``limit`` seconds have passed."""
    deadline = (time.monotonic() if since is None else since) + limit
    while True:
        asked = time.monotonic()
        if await check(gw):
            return
        if asked > deadline:
            pytest.fail(f"{gw.url}: {what} not seen within {limit} s")
        await asyncio.sleep(POLL)


def model_listed(fetch, name: str, present: bool = True):
    async def check(gw) -> bool:
        r = await fetch(gw, "/v1/models")
        assert r.code == 200, r.body
        return (name in {m["id"] for m in orjson.loads(r.body)["data"]}) == present
    return check


def info_matches(fetch, model_id: str, predicate):
    async def check(gw) -> bool:
        r = await fetch(gw, f"/model/info?litellm_model_id={model_id}")
        assert r.code == 200, r.body
        data = orjson.loads(r.body)["data"]
        return bool(data) and predicate(data[0])
    return check


async def chat(fetch, gw, model: str):
    return await fetch(gw, "/v1/chat/completions", {"model": model, "messages": HELLO})


async def test_api_changes_on_one_instance_reach_another_within_2s(gateway, fetch, fake_openai, pg_dsn):
    a = await gateway(db_config(pg_dsn, GATEWAY_MODELS))
    b = await gateway(db_config(pg_dsn, GATEWAY_MODELS))

    # added on A -> served on B, with the key from A's request reaching the provider
    since = time.monotonic()
    added = body_of(await fetch(a, "/model/new", {"model_name": "late-model", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": fake_openai.base, "api_key": PROVIDER_KEY}}))
    model_id = added["model_id"]
    await served_within(fetch, b, model_listed(fetch, "late-model"), "the added model", since=since)
    r = await chat(fetch, b, "late-model")
    assert r.code == 200, r.body
    assert orjson.loads(r.body)["choices"][0]["message"]["content"] == "echo: hello instances"
    assert fake_openai.received[-1].headers["authorization"] == f"Bearer {PROVIDER_KEY}"

    # changed on A (params merged, a new name) -> B serves the new version
    since = time.monotonic()
    body_of(await fetch(a, "/model/update", {"model_info": {"id": model_id},
                                             "model_name": "renamed-model", "litellm_params": {"temperature": 0.7}}))
    await served_within(fetch, b, info_matches(
        fetch, model_id, lambda e: e["model_name"] == "renamed-model" and e["litellm_params"].get("temperature") == 0.7),
        "the changed model", since=since)
    assert (await chat(fetch, b, "renamed-model")).code == 200
    assert fake_openai.received[-1].body["temperature"] == 0.7
    assert (await chat(fetch, b, "late-model")).code == 400

    # removed on A -> gone from B
    since = time.monotonic()
    body_of(await fetch(a, "/model/delete", {"id": model_id}))
    await served_within(fetch, b, model_listed(fetch, "renamed-model", present=False), "the removal", since=since)
    assert (await chat(fetch, b, "renamed-model")).code == 400

    # and the other direction: added on B -> served on A
    since = time.monotonic()
    body_of(await fetch(b, "/model/new", {"model_name": "from-b", "litellm_params": {"model": "mock/b"}}))
    await served_within(fetch, a, model_listed(fetch, "from-b"), "the model added on B", since=since)
    assert (await chat(fetch, a, "from-b")).code == 200
    # the YAML model was served all along by both
    for gw in (a, b):
        assert (await chat(fetch, gw, "shared-yaml")).code == 200


async def test_a_burst_of_changes_settles_to_the_same_registry(gateway, fetch, pg_dsn):
    a = await gateway(db_config(pg_dsn, GATEWAY_MODELS))
    b = await gateway(db_config(pg_dsn, GATEWAY_MODELS))
    since = time.monotonic()
    ids = []
    for i in range(8):
        ids.append(body_of(await fetch(a, "/model/new", {"model_name": f"burst-{i}",
                                                         "litellm_params": {"model": f"mock/{i}"}}))["model_id"])
    for model_id in ids[:3]:
        body_of(await fetch(a, "/model/delete", {"id": model_id}))
    wanted = {"shared-yaml"} | {f"burst-{i}" for i in range(3, 8)}

    async def same_models(gw) -> bool:
        r = await fetch(gw, "/v1/models")
        return {m["id"] for m in orjson.loads(r.body)["data"]} == wanted

    await served_within(fetch, b, same_models, "the settled registry", since=since)


# --- proxyctl sync from a third party ------------------------------------------------------------------

@pytest.fixture
def sync_cli(tmp_path, monkeypatch):
    """``await sync_cli(yaml_text, "--dry-run"?)`` -> click Result (run in a thread: it runs its own loop)."""
    for name in ("DATABASE_URL", "STORE_MODEL_IN_DB", "LITELLM_SALT_KEY", "CONFIG_FILE_PATH", "LITELLM_MASTER_KEY"):
        monkeypatch.delenv(name, raising=False)
    runner = CliRunner()
    count = 0

    async def run(yaml_text: str, *args: str):
        nonlocal count
        count += 1
        path = tmp_path / f"third-party-{count}.yaml"
        path.write_text(textwrap.dedent(yaml_text))
        return await asyncio.to_thread(runner.invoke, cli, ["sync", "--config", str(path), *args],
                                       env={"LITELLM_MASTER_KEY": MASTER_KEY})
    return run


THIRD_PARTY = """
  - model_name: synced-model
    litellm_params: {model: mock/synced, api_key: sk-synced-secret}
    model_info: {id: synced-id}
"""


async def test_proxyctl_sync_reaches_every_instance_within_2s(gateway, fetch, sync_cli, pg_dsn):
    a = await gateway(db_config(pg_dsn, GATEWAY_MODELS))
    b = await gateway(db_config(pg_dsn, GATEWAY_MODELS))

    since = time.monotonic()
    result = await sync_cli(db_config(pg_dsn, THIRD_PARTY))
    assert result.exit_code == 0, result.output
    assert "sk-synced-secret" not in result.output
    for gw in (a, b):
        await served_within(fetch, gw, model_listed(fetch, "synced-model"), "the synced model", since=since)
        assert (await chat(fetch, gw, "synced-model")).code == 200

    # a change to the same entry (same id): both serve the new version
    since = time.monotonic()
    changed = THIRD_PARTY.replace("synced-model", "synced-renamed")
    result = await sync_cli(db_config(pg_dsn, changed))
    assert result.exit_code == 0, result.output
    for gw in (a, b):
        await served_within(fetch, gw, info_matches(fetch, "synced-id", lambda e: e["model_name"] == "synced-renamed"),
                            "the synced change", since=since)
        assert (await chat(fetch, gw, "synced-model")).code == 400

    # removed from the third party's file: gone from both; their own YAML model still served
    since = time.monotonic()
    result = await sync_cli(db_config(pg_dsn))
    assert result.exit_code == 0, result.output
    for gw in (a, b):
        await served_within(fetch, gw, model_listed(fetch, "synced-renamed", present=False), "the synced removal",
                            since=since)
        assert (await chat(fetch, gw, "shared-yaml")).code == 200
    assert "synced-id" not in table(pg_dsn)


# --- real processes: two `proxyctl serve --num-workers 2` on one database -------------------------------

def readiness(port: int) -> dict:
    code, _, body = serve_helpers.request(port, "GET", "/health/readiness", key=None)
    assert code == 200, body
    return json.loads(body)


def every_worker_has(servers, models: int, since: float, limit: float = PROPAGATION) -> None:
    """Poll readiness across the servers until every worker has reported ``models`` deployments.
    A worker still reporting another count more than ``limit`` s after ``since`` fails the test.
    (Past the limit the poll only goes on to reach workers the load balancing has not hit yet.)"""
    workers = set().union(*(s.workers() for s in servers))
    fresh: set[int] = set()
    give_up = time.monotonic() + 20
    while fresh != workers:
        for s in servers:
            asked = time.monotonic()
            state = readiness(s.port)
            assert state["db"] == "connected", state
            if state["models"] == models:
                fresh.add(state["worker_pid"])
            elif asked > since + limit:
                pytest.fail(f"worker {state['worker_pid']} on port {s.port} still has {state['models']} "
                            f"deployments, not {models}, {limit} s after the change")
        if time.monotonic() > give_up:
            pytest.fail(f"workers {sorted(workers - fresh)} never answered readiness")
        time.sleep(POLL)


def test_two_served_instances_with_two_workers_each(tmp_path, pg_dsn):
    config = db_config(pg_dsn, GATEWAY_MODELS)
    servers = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            servers.append(serve_helpers.Served(tmp_path / name, config, 2))
        for s in servers:
            s.wait_alive()
            serve_helpers.wait_for(lambda s=s: len(s.workers()) == 2, what="two workers")
        a, b = servers
        every_worker_has(servers, 1, since=time.monotonic(), limit=15)  # every worker up, on the YAML model

        since = time.monotonic()
        code, _, body = serve_helpers.request(a.port, "POST", "/model/new", {
            "model_name": "proc-model", "litellm_params": {"model": "mock/proc"}})
        assert code == 200, body
        model_id = json.loads(body)["model_id"]
        every_worker_has(servers, 2, since)
        for s in servers:
            for _ in range(4):  # new connections: any worker may answer
                code, _, body = serve_helpers.request(s.port, "POST", "/v1/chat/completions",
                                                      {"model": "proc-model", "messages": HELLO})
                assert code == 200, body

        since = time.monotonic()
        code, _, body = serve_helpers.request(b.port, "POST", "/model/delete", {"id": model_id})
        assert code == 200, body
        every_worker_has(servers, 1, since)
        for s in servers:
            for _ in range(4):
                code, _, _ = serve_helpers.request(s.port, "POST", "/v1/chat/completions",
                                                   {"model": "proc-model", "messages": HELLO})
                assert code == 400

        for s in servers:
            assert s.terminate() == 0
    finally:
        for s in servers:
            s.close()


async def test_a_row_one_instance_cannot_build_does_not_freeze_its_registry(gateway, fetch, pg_dsn):
    """A model whose os.environ/ value resolves on A but not on B: B skips that one model and keeps
    following every other change (and stays 'connected')."""
    a = await gateway(db_config(pg_dsn, GATEWAY_MODELS), env={"MODEL_RPM": "60"})
    b = await gateway(db_config(pg_dsn, GATEWAY_MODELS), env={"MODEL_RPM": "sixty"})
    since = time.monotonic()
    body_of(await fetch(a, "/model/new", {"model_name": "env-rpm", "litellm_params": {
        "model": "mock/e", "rpm": "os.environ/MODEL_RPM"}}))
    assert (await chat(fetch, a, "env-rpm")).code == 200
    r = await fetch(a, "/model/new", {"model_name": "after-it", "litellm_params": {"model": "mock/after"}})
    assert r.code == 200, r.body
    await served_within(fetch, b, model_listed(fetch, "after-it"), "a model added after the unbuildable one",
                        since=since)
    assert (await chat(fetch, b, "after-it")).code == 200
    assert (await chat(fetch, b, "env-rpm")).code == 400  # not served there, and not a 500
    r = await fetch(b, "/health/readiness", key=None)
    assert orjson.loads(r.body)["db"] == "connected"
    # B's own writes still work (its refresh after the write must not fail on that row)
    r = await fetch(b, "/model/new", {"model_name": "from-b", "litellm_params": {"model": "mock/b"}})
    assert r.code == 200, r.body
    assert (await chat(fetch, b, "from-b")).code == 200
