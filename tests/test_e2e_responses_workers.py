"""Stored Responses API responses shared by every worker of an instance (``proxyctl serve
--num-workers 4`` as a subprocess, no database): conversations whose turns, ``GET`` and ``DELETE``
each come on a new connection, so any worker may answer any of them; and two in-process instances
on one PostgreSQL, where a follow-up reaches the other instance before the row is written.

Every wait is a bounded poll; nothing asserts on how long anything took.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time

import openai
import orjson
import psycopg2
import pytest

from . import test_e2e_serve as serve_helpers
from .conftest import PROVIDER_KEY as INPROC_PROVIDER_KEY
from .test_e2e_serve import MASTER_KEY, PROVIDER_KEY, FakeProvider, Served, request

WORKERS = 4
CONVERSATIONS = 12
SPREAD = 16  # new connections per shared read: with 4 workers, more than one of them answers
MAX_CONNECTIONS = 400  # new connections tried, at most, to have two different workers read


def served_config(fake: FakeProvider) -> str:
    return f"""
model_list:
  - model_name: compat
    litellm_params: {{model: hosted_vllm/llama-3-8b, api_base: "{fake.base}", api_key: {PROVIDER_KEY}}}
"""


def sdk(port: int) -> openai.OpenAI:
    """A client of its own: its first request opens a new connection."""
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=MASTER_KEY, max_retries=0)


def create(port: int, stream: bool = False, **kwargs):
    with sdk(port) as client:
        if not stream:
            return client.responses.create(model="compat", **kwargs)
        with client.responses.stream(model="compat", **kwargs) as events:
            return events.get_final_response()


def read_on_a_new_connection(port: int, path: str) -> tuple[int, int]:
    """``GET path`` on a new connection after asking the same connection which worker it is on:
    (status, worker pid)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/health/readiness")
        resp = conn.getresponse()
        pid = json.loads(resp.read())["worker_pid"]
        conn.request("GET", path, headers={"Authorization": f"Bearer {MASTER_KEY}"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, pid
    finally:
        conn.close()


def worker_of(port: int) -> int:
    code, _, body = request(port, "GET", "/health/readiness", key=None)
    assert code == 200
    return json.loads(body)["worker_pid"]


@pytest.fixture
def instance(tmp_path):
    fake = FakeProvider()
    served = Served(tmp_path, served_config(fake), WORKERS)
    try:
        served.wait_alive()
        serve_helpers.wait_for(lambda: len(served.workers()) == WORKERS, what=f"{WORKERS} workers")
        yield served
    finally:
        served.close()
        fake.stop()


def test_every_worker_serves_every_stored_response(instance, tmp_path):
    port, seen = instance.port, set()
    conversations = []
    for i in range(5 * CONVERSATIONS):  # at least CONVERSATIONS, more until two workers took part
        if i >= CONVERSATIONS and len(seen) > 1:
            break
        first = create(port, input=f"My name is N{i}.")
        seen.add(worker_of(port))
        # the follow-up right away, on a new connection (streamed for every other one)
        second = create(port, stream=i % 2 == 1, input="What is my name?", previous_response_id=first.id)
        seen.add(worker_of(port))
        assert second.previous_response_id == first.id and second.output_text == "echo: What is my name?"
        third = create(port, input="And again?", previous_response_id=second.id)
        conversations.append((first, second, third))
    for conversation in conversations:
        for response in conversation:
            with sdk(port) as client:
                got = client.responses.retrieve(response.id)
            # (a streamed one's final response, as the SDK assembles it, has parsed-text extras)
            assert (got.id, got.output_text, got.usage, got.previous_response_id) == (
                response.id, response.output_text, response.usage, response.previous_response_id)
            assert got.model_dump() == response.model_dump() or response is conversation[1]
    assert len(seen) > 1, "one worker answered every connection: the test proves nothing"

    responses_dir = tmp_path / "var" / f"proxyctl-{port}.responses"
    assert {f"{r.id}.json" for c in conversations for r in c} <= {p.name for p in responses_dir.iterdir()}


def test_a_delete_on_one_worker_is_a_404_on_every_worker(instance, tmp_path):
    port = instance.port
    made = create(port, input="Forget me.")
    kept = create(port, input="Keep me.")
    answered = set()
    for _ in range(MAX_CONNECTIONS):  # until two workers read it: each then holds a copy in memory
        code, pid = read_on_a_new_connection(port, f"/v1/responses/{made.id}")
        assert code == 200
        answered.add(pid)
        if len(answered) > 1:
            break
        time.sleep(0.01)  # the kernel hands a new connection to whichever worker waits: let others
    assert len(answered) > 1, "one worker took every connection: the test proves nothing"

    code, _, body = request(port, "DELETE", f"/v1/responses/{made.id}")
    assert code == 200 and orjson.loads(body) == {"id": made.id, "object": "response", "deleted": True}
    for _ in range(SPREAD):
        code, _, body = request(port, "GET", f"/v1/responses/{made.id}")
        assert code == 404 and orjson.loads(body)["error"]["param"] == "response_id"
        code, _, body = request(port, "POST", "/v1/responses", {"model": "compat", "input": "x",
                                                                "previous_response_id": made.id})
        assert code == 404 and orjson.loads(body)["error"]["param"] == "previous_response_id"
        code, _, _ = request(port, "GET", f"/v1/responses/{kept.id}")
        assert code == 200
    code, _, _ = request(port, "DELETE", f"/v1/responses/{made.id}")
    assert code == 404

    responses_dir = tmp_path / "var" / f"proxyctl-{port}.responses"
    names = {p.name for p in responses_dir.iterdir()}
    assert f"{made.id}.deleted" in names and f"{made.id}.json" not in names and f"{kept.id}.json" in names
    assert instance.terminate() == 0
    assert f"{kept.id}.json" in {p.name for p in responses_dir.iterdir()}  # kept across a restart


# --- two instances on one PostgreSQL --------------------------------------------------------------

def db_yaml(fake, dsn: str) -> str:
    return f"""
model_list:
  - model_name: compat
    litellm_params: {{model: hosted_vllm/llama-3-8b, api_base: "{fake.base}", api_key: {INPROC_PROVIDER_KEY}}}
general_settings:
  store_model_in_db: true
  database_url: "{dsn}"
"""


class HeldInserts:
    """A transaction holding ``proxy_responses`` in SHARE mode: reads go on, inserts wait (the
    row of a response stays "on its way" from the instance that made it) until ``release``."""

    def __init__(self, dsn: str):
        self.conn = psycopg2.connect(dsn)
        self.conn.cursor().execute("LOCK TABLE proxy_responses IN SHARE MODE")

    def release(self) -> None:
        if not self.conn.closed:
            self.conn.rollback()
            self.conn.close()


def rows(dsn: str, response_id: str) -> int:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM proxy_responses WHERE id = %s", (response_id,))
        return cur.fetchone()[0]


@pytest.mark.parametrize("stream", [False, True])
async def test_follow_up_on_another_instance_right_away(gateway, fetch, fake_openai_b, pg_dsn, stream):
    one = await gateway(db_yaml(fake_openai_b, pg_dsn))
    two = await gateway(db_yaml(fake_openai_b, pg_dsn))
    held = HeldInserts(pg_dsn)
    try:
        r = await fetch(one, "/v1/responses", {"model": "compat", "input": "My name is Ann.", "stream": stream})
        assert r.code == 200
        made_id = orjson.loads(r.body)["id"] if not stream else \
            orjson.loads(r.body.rsplit(b"data: ", 1)[1])["response"]["id"]
        assert rows(pg_dsn, made_id) == 0  # the answer is out, the row is not written yet
        # the row arrives while the other instance is looking for it
        asyncio.get_running_loop().call_later(0.3, held.release)
        r = await fetch(two, "/v1/responses", {"model": "compat", "input": "Who am I?",
                                               "previous_response_id": made_id})
        assert r.code == 200, r.body
        assert [m["content"] for m in fake_openai_b.received[-1].body["messages"]] == [
            "My name is Ann.", "echo: My name is Ann.", "Who am I?"]
    finally:
        held.release()
    r = await fetch(two, f"/v1/responses/{made_id}", method="DELETE")
    assert r.code == 200
    assert (await fetch(two, f"/v1/responses/{made_id}")).code == 404
    assert rows(pg_dsn, made_id) == 0
    r = await fetch(one, "/v1/responses/resp_00000000" + "0" * 40)  # an old id: a 404 at once
    assert r.code == 404


async def test_a_delete_on_one_instance_reaches_the_copies_of_another(gateway, fetch, fake_openai_b, pg_dsn):
    """Instance two read (and so holds) the response; a DELETE on instance one reaches it through
    PostgreSQL's NOTIFY, so it stops serving its copy."""
    one = await gateway(db_yaml(fake_openai_b, pg_dsn))
    two = await gateway(db_yaml(fake_openai_b, pg_dsn))
    r = await fetch(one, "/v1/responses", {"model": "compat", "input": "Shared, then deleted."})
    made = orjson.loads(r.body)
    r = await fetch(two, f"/v1/responses/{made['id']}")
    assert r.code == 200 and orjson.loads(r.body) == made
    assert (await fetch(one, f"/v1/responses/{made['id']}", method="DELETE")).code == 200

    async def gone_on_two() -> None:
        while (await fetch(two, f"/v1/responses/{made['id']}")).code != 404:
            await asyncio.sleep(0.05)

    await asyncio.wait_for(gone_on_two(), 10)
    r = await fetch(two, "/v1/responses", {"model": "compat", "input": "x", "previous_response_id": made["id"]})
    assert r.code == 404
