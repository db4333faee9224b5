"""Shared fixtures: fake providers, an in-process gateway built the way ``proxyctl serve``
builds one, and HTTP helpers. Everything talks over real loopback sockets on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import openai
import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.netutil import bind_sockets

import psycopg2
import psycopg2.extensions
import redis

from contrib.fake_providers import anthropic as anthropic_fake
from contrib.fake_providers import gemini as gemini_fake
from contrib.fake_providers import ollama as ollama_fake
from contrib.fake_providers import openai_compat
from contrib.fake_providers.common import listen
from tornado_proxy.app import settle_auth
from tornado_proxy import config as config_module
from tornado_proxy.config import resource_dir
from tornado_proxy.db import Database
from tornado_proxy.embedded import EmbeddedPostgres
from tornado_proxy.server import run_worker

MASTER_KEY = "sk-master-test-0123456789"
PROVIDER_KEY = "sk-provider-secret-9876543210"


LOCAL_PG = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"


def admin_sql(dsn: str, statement: str) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        conn.cursor().execute(statement)
    finally:
        conn.close()


def server_reachable(dsn: str) -> bool:
    try:
        psycopg2.connect(dsn).close()
        return True
    except psycopg2.OperationalError:
        return False


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL: $DATABASE_URL, else the local server, else a throwaway cluster.

    The cluster lives outside pytest's temp root: pytest makes that root 0700 whenever a session
    starts, and the cluster runs as the postgres user, who must keep reaching its folder."""
    cluster = folder = None
    dsn = os.environ.get("DATABASE_URL")
    if not dsn:
        if server_reachable(LOCAL_PG):
            dsn = LOCAL_PG
        else:
            folder = tempfile.mkdtemp(prefix="tp-pg-")
            cluster = EmbeddedPostgres(Path(folder) / "data")
            dsn = cluster.start()
    yield dsn
    if cluster is not None:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_template(pg_server):
    """A migrated template database; each test copies it."""
    name = f"tp_template_{os.getpid()}"
    admin_sql(pg_server, f"DROP DATABASE IF EXISTS {name}")
    admin_sql(pg_server, f"CREATE DATABASE {name}")
    db = Database(psycopg2.extensions.make_dsn(pg_server, dbname=name))

    async def migrate():
        await db.migrate(resource_dir("sql"))
        await db.close()

    asyncio.run(migrate())
    yield name
    admin_sql(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def pg_dsn(pg_server, pg_template):
    """A fresh, migrated database for one test (dropped afterwards)."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin_sql(pg_server, f"CREATE DATABASE {name} TEMPLATE {pg_template}")
    yield psycopg2.extensions.make_dsn(pg_server, dbname=name)
    admin_sql(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def empty_pg_dsn(pg_server):
    """A fresh database with no tables at all."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin_sql(pg_server, f"CREATE DATABASE {name}")
    yield psycopg2.extensions.make_dsn(pg_server, dbname=name)
    admin_sql(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def free_port() -> int:
    sock = bind_sockets(0, "127.0.0.1")[0]
    port = sock.getsockname()[1]
    sock.close()
    return port


class ThrowawayRedis:
    """A ``redis-server`` of the test's own (no persistence) on ``port``: started, killed and
    started again on the same port, for tests of what the gateway does when Redis goes away."""

    def __init__(self, port: int, directory: str | None = None):
        self.port, self.directory = port, directory
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if self.directory:
            args += ["--dir", str(self.directory)]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        for _ in range(200):
            if redis_answers(self.url) or self.process.poll() is not None:
                break
            time.sleep(0.05)
        assert redis_answers(self.url), "redis-server did not start"

    def kill(self) -> None:
        """SIGKILL: no shutdown, connections just drop."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture(scope="session")
def redis_url():
    """A real Redis: the one on 127.0.0.1:6379, else a throwaway ``redis-server`` on a free port."""
    if redis_answers("redis://127.0.0.1:6379/0"):
        yield "redis://127.0.0.1:6379/0"
        return
    server = ThrowawayRedis(free_port())
    try:
        server.start()
        yield server.url
    finally:
        server.stop()


@pytest.fixture
async def client(gw):
    """The official openai SDK on the test module's ``gw`` gateway (no retries)."""
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=MASTER_KEY, max_retries=0) as c:
        yield c


@contextlib.asynccontextmanager
async def running_fake(module, state, path: str = ""):
    """Serve a fake provider module on a free port; ``state.base`` is the api_base to configure."""
    server, port = listen(module.make_app(state))
    state.port = port
    state.base = f"http://127.0.0.1:{port}{path}"
    try:
        yield state
    finally:
        server.stop()
        await server.close_all_connections()


@pytest.fixture
async def fake_openai():
    """A fake OpenAI-compatible provider; ``.state`` has the knobs and what it received."""
    async with running_fake(openai_compat, openai_compat.FakeState(api_key=PROVIDER_KEY), "/v1") as state:
        yield state


@pytest.fixture
async def fake_openai_b():
    """A second fake OpenAI-compatible provider, for groups of two deployments."""
    async with running_fake(openai_compat, openai_compat.FakeState(api_key=PROVIDER_KEY), "/v1") as state:
        yield state


@pytest.fixture
async def fake_anthropic():
    """A fake Anthropic API (its paths start with /v1 themselves)."""
    async with running_fake(anthropic_fake, anthropic_fake.FakeState(api_key=PROVIDER_KEY)) as state:
        yield state


@pytest.fixture
async def fake_gemini():
    """A fake Gemini API (Google AI Studio); ``.base`` ends in ``/v1beta``."""
    async with running_fake(gemini_fake, gemini_fake.FakeState(api_key=PROVIDER_KEY), "/v1beta") as state:
        yield state


@pytest.fixture
async def fake_ollama():
    """A fake Ollama server (no auth, as Ollama)."""
    async with running_fake(ollama_fake, ollama_fake.FakeState()) as state:
        yield state


@pytest.fixture
def restore_logging():
    """`proxyctl` configures logging for its process; undo that after a test that runs it in-process."""
    root, access = logging.getLogger(), logging.getLogger("tornado_proxy.access")
    saved = (list(root.handlers), root.level, list(access.handlers), access.propagate)
    yield
    root.handlers[:], access.handlers[:] = saved[0], saved[2]
    root.setLevel(saved[1])
    access.propagate = saved[3]


async def wait_for(predicate, timeout: float = 5.0) -> None:
    """Poll until ``predicate()`` holds; fail (not hang) after ``timeout`` seconds."""
    async def poll():
        while not predicate():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), timeout)


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
        environ["SPEND_SPILL_DIR"] = str(tmp_path / "spend")
        environ.update(env or {})
        config, _ = settle_auth(config_module.load(path, environ=environ))  # as `proxyctl serve` does
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
