"""Two instances behind nginx, started by contrib/deploy/two_instances.py as a person would run it.

Steady traffic (several clients, plain and streamed chat with a virtual key, a fake OpenAI
provider with some latency so that calls overlap) keeps flowing while instance A is killed
with SIGKILL and started again:

* every request that started after A was dead succeeded: nginx's ``proxy_next_upstream error
  timeout`` passes a request whose connection to A was refused to B, and the passive health
  check then keeps A out for ``fail_timeout``;
* a request may fail only if it was in flight on A when A was killed. nginx never replays a POST
  that reached an instance (A may already have called the provider), so such a request gets
  nginx's 502 or, for a stream that had started, a cut stream. The test identifies each failure
  through nginx's access log (joined on the X-Request-Id the client sent) and asserts it was sent
  to A alone and started before A was dead. "The kill moment" is a span: from SIGKILL until no
  process of A is left takes milliseconds, and a request nginx sent to A within it (on a kept-alive
  connection whose close nginx had not processed yet, too) meets the same fate;
* after the restart, nginx sends traffic to A again;
* a model added through A's own port is served through B's own port within 2 s (PostgreSQL
  LISTEN/NOTIFY);
* ``restart b`` (nginx marks B down and reloads, B drains and restarts, nginx takes it back)
  fails no request at all, streams in flight on B included (a second test);
* spend: after a graceful stop (which writes every queued spend row), every successful call has
  its row, except possibly calls the killed A had answered and not yet written (its in-memory
  queue, flushed every second, dies with it). Nothing else is missing, nothing is counted twice,
  and the key's spend is the sum of its rows.

Every wait is a bounded poll; nothing asserts how long anything took except the 2 s propagation
bound (the feature's promise, as in test_e2e_multi_instance.py)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass

import psycopg2
import pytest

from contrib.deploy import two_instances as deploy

from .test_e2e_serve import FakeProvider, child_env, free_port, request, wait_for

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "contrib" / "deploy" / "two_instances.py"
MASTER_KEY = "sk-master-e2e-deploy-16180"
PROVIDER_KEY = "sk-provider-e2e-serve-27182"  # what test_e2e_serve.FakeProvider requires
CLIENTS = 4
HELLO = [{"role": "user", "content": "hello through nginx"}]
EXPECTED = "echo: hello through nginx"
PROPAGATION = 2.0  # seconds: a model added on one instance is served by another


@pytest.fixture
def nginx_installed():
    try:
        deploy.find_nginx()
    except deploy.DeployError:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx-light); the deployment needs it")


@dataclass
class Call:
    request_id: str
    stream: bool
    started: float
    ended: float = 0.0
    ok: bool = False
    status: int | None = None
    call_id: str | None = None
    error: str = ""
    body: bytes = b""
    reconnected: bool = False


# A kept-alive connection that nginx closed while it was idle (its old workers do so on a reload, as
# on every `nginx -s reload`, and it may close a client connection after an upstream error): the
# request was sent into a closed connection and got no answer. HTTP clients send it again on a new
# connection (the openai SDK retries connection errors); nginx's access log, which has one line per
# request it read, shows it was never read twice.
STALE_CONNECTION = (BrokenPipeError, ConnectionResetError)  # http.client.RemoteDisconnected is one


class Traffic:
    """``CLIENTS`` threads, each with a keep-alive connection to nginx, calling one after another
    (plain and streamed in turn) until stopped."""

    def __init__(self, port: int, key: str):
        self.port, self.key = port, key
        self.calls: list[Call] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(CLIENTS)]
        for t in self.threads:
            t.start()

    def client(self, index: int) -> None:
        conn, used, n = None, False, 0
        while not self.stopping.is_set():
            n += 1
            call = Call(f"c{index}-{n}", stream=n % 2 == 0, started=time.monotonic())
            for attempt in (1, 2):
                if conn is None:
                    conn, used = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20), False
                try:
                    self.one(conn, call)
                    used = True
                    break
                except (OSError, http.client.HTTPException, ValueError, LookupError) as exc:
                    conn.close()
                    conn = None
                    if attempt == 1 and used and call.status is None and isinstance(exc, STALE_CONNECTION):
                        call.reconnected = True  # what HTTP clients do (the openai SDK too): see STALE_CONNECTION
                        continue
                    call.error = repr(exc)
                    break
            call.ended = time.monotonic()
            with self.lock:
                self.calls.append(call)
        if conn is not None:
            conn.close()

    def one(self, conn: http.client.HTTPConnection, call: Call) -> None:
        body = {"model": "fake-gpt", "messages": HELLO, "stream": call.stream}
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json",
                              "X-Request-Id": call.request_id})
        resp = conn.getresponse()
        call.status, call.call_id = resp.status, resp.getheader("x-litellm-call-id")
        call.body = resp.read()
        call.ok = resp.status == 200 and answer_text(call.body, call.stream) == EXPECTED

    def succeeded(self, since: float = 0.0) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.ok and c.started >= since]

    def wait_successes(self, n: int, since: float, what: str) -> None:
        def enough() -> bool:
            with self.lock:
                failures = [c for c in self.calls if not c.ok and c.started >= since]
            assert len(failures) < 10, failures[:3]  # not what this waits for: fail fast, with examples
            return len(self.succeeded(since)) >= n
        wait_for(enough, timeout=30, what=what)

    def stop(self) -> list[Call]:
        self.stopping.set()
        for t in self.threads:
            t.join(30)
        return self.calls


def answer_text(body: bytes, stream: bool) -> str | None:
    if not stream:
        return json.loads(body)["choices"][0]["message"]["content"]
    events = [e for e in body.decode().split("\n\n") if e]
    if not events or events[-1] != "data: [DONE]":
        return None
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def run_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env=env or child_env(), cwd=ROOT)


def access_log(workdir: pathlib.Path) -> list[dict]:
    """nginx's JSON lines (the deploy script's log format); a line being written is left out."""
    path = workdir / "nginx" / "access.log"
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.exists() else []


def logged_requests(workdir: pathlib.Path, calls: list[Call]) -> list[dict]:
    """nginx's log lines of the traffic's requests, once every call has one: nginx logs a request
    when it finalizes it, which can be just after the client read the last byte."""
    def complete() -> list[dict] | None:
        entries = [e for e in access_log(workdir) if e["x_request_id"]]
        return entries if {e["x_request_id"] for e in entries} >= {c.request_id for c in calls} else None
    return wait_for(complete, what="nginx's log line of every request")


def config_yaml(fake: FakeProvider) -> str:
    return f"""
model_list:
  - model_name: fake-gpt
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: {fake.base}
      api_key: {PROVIDER_KEY}
      input_cost_per_token: 0.000001
      output_cost_per_token: 0.000002
    model_info: {{id: deploy-{uuid.uuid4().hex[:12]}}}
general_settings:
  trusted_proxies: [127.0.0.1]
  graceful_shutdown_timeout: 5
"""


def query(dsn: str, sql: str, *params) -> list[tuple]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


@pytest.fixture
def deployment(nginx_installed, tmp_path, pg_dsn, redis_url):
    """The script's ``start`` on free ports (one worker per instance); ``stop`` at teardown."""
    fake = FakeProvider("--latency", "0.02", "--chunk-delay", "0.02")
    config = tmp_path / "config.yaml"
    config.write_text(config_yaml(fake))
    workdir = tmp_path / "deploy"
    port, a, b = free_port(), free_port(), free_port()
    env = child_env(DATABASE_URL=pg_dsn, LITELLM_MASTER_KEY=MASTER_KEY, REDIS_URL=redis_url)
    try:
        done = run_script("start", "--workdir", str(workdir), "--config", str(config), "--port", str(port),
                          "--instance-ports", f"{a},{b}", "--workers", "1", env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"http://127.0.0.1:{port}"
        yield workdir, env, fake
    finally:
        run_script("stop", "--workdir", str(workdir))
        fake.stop()


def kill_instance(workdir: pathlib.Path, name: str) -> None:
    """SIGKILL to the instance's whole process group (its supervisor and its workers), and wait
    until none of them is alive: from then on its sockets are closed."""
    pid = deploy.load_state(workdir).pids[name]
    os.killpg(pid, signal.SIGKILL)
    wait_for(lambda: not deploy.group_members(pid), what=f"instance {name} to die")


def forwarded_client_ip(workdir: pathlib.Path, port: int) -> None:
    """nginx appends the peer to X-Forwarded-For; the gateway trusts nginx (trusted_proxies) and
    logs the nearest untrusted address as the client."""
    status, headers, body = request(port, "POST", "/v1/chat/completions", {"model": "fake-gpt", "messages": HELLO},
                                    key=MASTER_KEY, headers={"X-Forwarded-For": "203.0.113.7"})
    assert status == 200, body
    call_id = headers["x-litellm-call-id"]

    def logged() -> dict | None:
        for name in deploy.INSTANCES:
            for line in (workdir / name / "stderr.log").read_text().splitlines():
                if line.startswith("{") and json.loads(line).get("call_id") == call_id:
                    return json.loads(line)
        return None
    assert wait_for(logged, what="the access line")["remote_ip"] == "203.0.113.7"


def model_added_on_a_served_by_b(state: deploy.Deployment, fake: FakeProvider) -> None:
    a, b = (state.instance_port(n) for n in deploy.INSTANCES)
    since = time.monotonic()
    status, _, body = request(a, "POST", "/model/new", {"model_name": "added-on-a", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": fake.base, "api_key": PROVIDER_KEY}}, key=MASTER_KEY)
    assert status == 200, body
    while True:
        asked = time.monotonic()
        status, _, body = request(b, "GET", "/v1/models", key=MASTER_KEY)
        assert status == 200, body
        if "added-on-a" in {m["id"] for m in json.loads(body)["data"]}:
            break
        assert asked <= since + PROPAGATION, "the model added on A was not served by B within 2 s"
        time.sleep(0.02)
    status, _, body = request(b, "POST", "/v1/chat/completions", {"model": "added-on-a", "messages": HELLO},
                              key=MASTER_KEY)
    assert status == 200, body
    assert json.loads(body)["choices"][0]["message"]["content"] == EXPECTED


@pytest.mark.timeout(150)
def test_traffic_through_nginx_survives_an_instance_killed_and_restarted(deployment, pg_dsn):
    workdir, env, fake = deployment
    state = deploy.load_state(workdir)
    a_addr, b_addr = (f"127.0.0.1:{state.instance_port(n)}" for n in deploy.INSTANCES)
    status, _, body = request(state.port, "POST", "/key/generate", {"key_alias": "deploy-traffic"}, key=MASTER_KEY)
    assert status == 200, body
    key = json.loads(body)["key"]
    forwarded_client_ip(workdir, state.port)

    traffic = Traffic(state.port, key)
    try:
        traffic.wait_successes(30, 0.0, "traffic before the kill")
        kill_instance(workdir, "a")
        dead = time.monotonic()
        traffic.wait_successes(30, dead, "traffic while A is down")
        # nginx meets the dead A (at once, or when fail_timeout ends if the requests cut on A
        # already made it skip A) and passes the request to B, invisibly to the client
        wait_for(lambda: any(e["upstream_addr"] == f"{a_addr}, {b_addr}" for e in access_log(workdir)),
                 timeout=30, what="a request refused by A and passed to B")

        log_mark = len(access_log(workdir))
        restarted = run_script("start", "--workdir", str(workdir), env=env)
        assert restarted.returncode == 0, restarted.stderr
        new_state = deploy.load_state(workdir)
        assert new_state.pids["a"] != state.pids["a"] and new_state.pids["b"] == state.pids["b"]
        assert new_state.pids["nginx"] == state.pids["nginx"]  # only the dead piece was started

        def a_serves_again() -> bool:
            return any(e["upstream_addr"] == a_addr and e["status"] == 200 for e in access_log(workdir)[log_mark:])
        wait_for(a_serves_again, timeout=40, what="nginx to send requests to the restarted A")  # after fail_timeout
    finally:
        calls = traffic.stop()

    entries = logged_requests(workdir, calls)
    log = {e["x_request_id"]: e for e in entries}
    assert len(log) == len(entries)  # no request was read twice
    failed = [c for c in calls if not c.ok]
    for call in failed:
        entry = log.get(call.request_id)
        assert entry is not None, f"{call}: not in nginx's log"
        # in flight on A at the kill: sent to A alone (never replayed on B), and started before A was dead
        assert entry["upstream_addr"] == a_addr, (call, entry)
        assert call.started < dead, (call, entry)
        if not call.stream and call.status is not None:
            assert call.status == 502 and json.loads(call.body)["error"]["code"] == "502", call
    assert all(c.ok for c in calls if c.started >= dead)

    model_added_on_a_served_by_b(new_state, fake)
    assert_spend(workdir, pg_dsn, key, calls, log, a_addr, dead)


def assert_spend(workdir, pg_dsn, key: str, calls: list[Call], log: dict, a_addr: str, dead: float) -> None:
    stopped = run_script("stop", "--workdir", str(workdir))  # SIGTERM: every queued spend row is written
    assert stopped.returncode == 0, stopped.stderr
    token = hashlib.sha256(key.encode()).hexdigest()
    rows = dict(query(pg_dsn, "SELECT request_id, spend FROM proxy_spend_logs WHERE api_key = %s", token))
    succeeded = {c.call_id: c for c in calls if c.ok}
    missing = set(succeeded) - set(rows)
    lost_with_a = {cid for cid, c in succeeded.items() if log[c.request_id]["upstream_addr"] == a_addr
                   and c.ended < dead}
    assert missing <= lost_with_a, [log[succeeded[cid].request_id] for cid in missing - lost_with_a]
    assert set(rows) <= set(succeeded)  # no row for a call that failed, none counted twice (request_id is unique)
    key_spend = query(pg_dsn, "SELECT spend FROM proxy_keys WHERE token = %s", token)[0][0]
    assert key_spend == pytest.approx(sum(rows.values())) and key_spend > 0


@pytest.mark.timeout(150)
def test_rolling_restart_through_nginx_fails_no_request(deployment):
    workdir, env, _ = deployment
    state = deploy.load_state(workdir)
    b_addr = f"127.0.0.1:{state.instance_port('b')}"
    traffic = Traffic(state.port, MASTER_KEY)
    try:
        traffic.wait_successes(20, 0.0, "traffic before the restart")
        done = run_script("restart", "b", "--workdir", str(workdir), env=env)
        assert done.returncode == 0, done.stderr
        restarted = time.monotonic()
        log_mark = len(access_log(workdir))
        traffic.wait_successes(20, restarted, "traffic after the restart")

        def b_serves_again() -> bool:
            return any(e["upstream_addr"] == b_addr and e["status"] == 200 for e in access_log(workdir)[log_mark:])
        wait_for(b_serves_again, timeout=20, what="nginx to send requests to the restarted B")
    finally:
        calls = traffic.stop()
    assert [(c.request_id, c.status, c.error) for c in calls if not c.ok] == []
    ids = [e["x_request_id"] for e in logged_requests(workdir, calls)]
    assert sorted(ids) == sorted(c.request_id for c in calls)  # each read by nginx exactly once
    new_state = deploy.load_state(workdir)
    assert new_state.pids["b"] != state.pids["b"] and new_state.pids["a"] == state.pids["a"]
    assert new_state.pids["nginx"] == state.pids["nginx"]
    # B drained: its old process finished what it had and exited cleanly, nothing was cut
    assert "Traceback" not in (workdir / "b" / "stderr.log").read_text()
