"""The real `bin/proxyctl serve` as a subprocess (datasette style): pre-forked workers, the
openai SDK through it, /metrics across processes, worker replacement, graceful SIGTERM with a
stream in flight, and the JSON request log on stderr.

Every wait is a bounded poll; nothing asserts on how long anything took.
"""

from __future__ import annotations

import http.client
import json
import os
import pathlib
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import openai
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROXYCTL = ROOT / "bin" / "proxyctl"
MASTER_KEY = "sk-master-e2e-serve-31415"
PROVIDER_KEY = "sk-provider-e2e-serve-27182"
HELLO = [{"role": "user", "content": "hello over processes"}]
CLEARED_ENV = ("LITELLM_MASTER_KEY", "DATABASE_URL", "STORE_MODEL_IN_DB", "NUM_WORKERS", "LITELLM_LOG",
               "CONFIG_FILE_PATH", "PROMETHEUS_MULTIPROC_DIR", "OPENAI_API_KEY", "OPENROUTER_API_KEY")


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def children_of(pid: int) -> set[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(entry))
    return out


def request(port: int, method: str, path: str, body: dict | None = None, key: str | None = MASTER_KEY,
            headers: dict | None = None, timeout: float = 10.0):
    """One request on a fresh connection -> (status, headers, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        hdrs = {"Authorization": f"Bearer {key}"} if key else {}
        hdrs.update(headers or {})
        data = json.dumps(body).encode() if body is not None else None
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()  # headers: case-insensitive
    finally:
        conn.close()


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True
    except TimeoutError:  # accepted into a backlog nobody serves: not refused
        return False


class FakeProvider:
    """The fake OpenAI provider run standalone (python -m contrib.fake_providers.openai_compat)."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "contrib.fake_providers.openai_compat", "--port", "0",
                                      "--api-key", PROVIDER_KEY, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=child_env(),
                                     start_new_session=True, cwd=ROOT)
        ready, _, _ = select.select([self.proc.stdout], [], [], 15)
        line = self.proc.stdout.readline() if ready else b""
        if not line.strip().isdigit():
            self.stop()
            pytest.fail("the fake provider did not print its port")
        self.port = int(line)
        self.base = f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc.stdout.close()


class Served:
    """`python bin/proxyctl serve` on a free port with a temporary config."""

    def __init__(self, tmp_path: pathlib.Path, config: str, workers: int, *args: str, **env: str):
        self.config_path = tmp_path / "config.yaml"
        self.config_path.write_text(textwrap.dedent(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_path = tmp_path / "stderr.log"
        self._stderr = open(self.stderr_path, "wb")
        env.setdefault("LITELLM_MASTER_KEY", MASTER_KEY)
        self.proc = subprocess.Popen(
            [sys.executable, str(PROXYCTL), "serve", "--config", str(self.config_path), "--host", "127.0.0.1",
             "--port", str(self.port), "--num-workers", str(workers), *args],
            stdout=subprocess.DEVNULL, stderr=self._stderr, env=child_env(**env), cwd=tmp_path,
            start_new_session=True)

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"proxyctl serve exited with {self.proc.returncode}:\n{self.stderr()}")
        try:
            status, _, body = request(self.port, "GET", "/health/liveliness", key=None, timeout=2)
        except OSError:
            return False
        return status == 200 and json.loads(body) == "I'm alive!"

    def wait_alive(self) -> None:
        wait_for(self.alive, what="/health/liveliness")

    def workers(self) -> set[int]:
        return children_of(self.proc.pid)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            pytest.fail("proxyctl serve did not exit after SIGTERM")

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def access_lines(self) -> list[dict]:
        """The JSON request-log lines on stderr; every line that looks like JSON must be one object."""
        out = []
        for line in self.stderr().splitlines():
            if line.startswith("{"):
                obj = json.loads(line)
                assert isinstance(obj, dict), line
                out.append(obj)
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own session: the server and its workers
            self.proc.wait(10)
        self._stderr.close()


@pytest.fixture
def serve(tmp_path):
    started: list[Served] = []

    def start(config: str, workers: int = 1, *args: str, **env: str) -> Served:
        served = Served(tmp_path, config, workers, *args, **env)
        started.append(served)
        served.wait_alive()
        return served

    yield start
    for served in started:
        served.close()


@pytest.fixture
def fake_provider():
    started: list[FakeProvider] = []

    def start(*args: str) -> FakeProvider:
        fake = FakeProvider(*args)
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop()


def config_yaml(fake: FakeProvider | None = None, grace: float = 5) -> str:
    models = [
        "  - model_name: demo\n    litellm_params: {model: mock/demo}",
        "  - model_name: counted\n    litellm_params: {model: mock/counted}",
    ]
    if fake is not None:
        for name, model in (("gpt-fake", "gpt-4o-mini"), ("embed-fake", "text-embedding-3-small")):
            models.append(f"  - model_name: {name}\n    litellm_params:\n      model: openai/{model}\n"
                          f"      api_base: {fake.base}\n      api_key: os.environ/FAKE_KEY")
    return ("model_list:\n" + "\n".join(models) +
            f"\ngeneral_settings:\n  graceful_shutdown_timeout: {grace}\n")


METRIC = re.compile(r'^litellm_proxy_total_requests_metric_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$', re.M)


def request_count(port: int, route: str, model: str, status: str = "200") -> float:
    code, _, body = request(port, "GET", "/metrics", key=None)
    assert code == 200
    total = 0.0
    for m in METRIC.finditer(body.decode()):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels")))
        if labels == {"route": route, "model": model, "status": status}:
            total += float(m.group("value"))
    return total


def settled(port: int, model: str, expected: int) -> None:
    """The chat count reaches ``expected`` (bounded wait), then every scrape, on any worker, says so."""
    def count() -> float:
        value = request_count(port, "/chat/completions", model)
        assert value <= expected
        return value

    wait_for(lambda: count() == expected, what=f"{expected} requests in /metrics")
    for _ in range(6):
        assert count() == expected


def worker_pid(port: int) -> int:
    code, _, body = request(port, "GET", "/health/readiness", key=None)
    assert code == 200
    return json.loads(body)["worker_pid"]


def chat_counted(port: int) -> None:
    code, _, body = request(port, "POST", "/v1/chat/completions", {"model": "counted", "messages": HELLO})
    assert code == 200, body


def two_workers(served: Served, without: int | None = None) -> set[int] | None:
    workers = served.workers()
    return workers if len(workers) == 2 and without not in workers else None


# --- (a) several workers ------------------------------------------------------------------------

def test_two_workers_sdk_metrics_replacement_and_sigterm(serve, fake_provider):
    fake = fake_provider()
    served = serve(config_yaml(fake), 2, FAKE_KEY=PROVIDER_KEY)
    original = wait_for(lambda: two_workers(served), what="two workers")

    client = openai.OpenAI(base_url=served.url + "/v1", api_key=MASTER_KEY, max_retries=0, timeout=15)
    try:
        # the built-in mock model and an OpenAI-compatible upstream, plain and streaming
        reply = client.chat.completions.create(model="demo", messages=HELLO)
        assert reply.choices[0].message.content == "hello over processes"
        reply = client.chat.completions.create(model="gpt-fake", messages=HELLO, temperature=0.1)
        assert reply.choices[0].message.content == "echo: hello over processes"
        assert reply.model == "gpt-4o-mini" and reply.usage.total_tokens > 0
        for model, expected in (("demo", "hello over processes"), ("gpt-fake", "echo: hello over processes")):
            stream = client.chat.completions.create(model=model, messages=HELLO, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
        emb = client.embeddings.create(model="embed-fake", input=["a", "b"])
        assert [e.index for e in emb.data] == [0, 1] and len(emb.data[0].embedding) == 8
        assert {m.id for m in client.models.list()} >= {"demo", "counted", "gpt-fake"}
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        client.close()

    # /metrics sums every worker's counts, whichever worker answers the scrape. A worker counts a
    # request just after sending its response, so the last one may show up a moment late.
    n = 12
    for _ in range(n):
        chat_counted(served.port)  # a new connection each time, so any worker may serve it
    settled(served.port, "counted", n)

    # a worker killed with SIGKILL is replaced, and serving goes on
    victim = sorted(original)[0]
    os.kill(victim, signal.SIGKILL)
    replaced = wait_for(lambda: two_workers(served, without=victim), what="a replacement worker")
    assert replaced != original and original - replaced == {victim}
    served.wait_alive()
    seen = {worker_pid(served.port) for _ in range(20)}
    assert seen <= replaced and victim not in seen
    for _ in range(3):
        chat_counted(served.port)
    # what the dead worker counted is still counted
    settled(served.port, "counted", n + 3)

    assert served.terminate() == 0
    assert served.workers() == set()
    assert refused(served.port)


# --- (b) graceful shutdown with a stream in flight --------------------------------------------------

def open_stream(port: int, model: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.request("POST", "/v1/chat/completions",
                 body=json.dumps({"model": model, "messages": HELLO, "stream": True}),
                 headers={"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    return conn, resp


def sse_events(raw: bytes) -> list[str]:
    return [e for e in raw.decode().split("\n\n") if e]


def test_sigterm_lets_a_slow_stream_finish(serve, fake_provider):
    fake = fake_provider("--chunks", "8", "--chunk-delay", "0.1")
    served = serve(config_yaml(fake), 2, FAKE_KEY=PROVIDER_KEY)
    conn, resp = open_stream(served.port, "gpt-fake")
    try:
        first = resp.readline()
        assert first.startswith(b"data: {")
        served.proc.send_signal(signal.SIGTERM)
        rest = resp.read()
    finally:
        conn.close()
    events = sse_events(first + rest)
    assert events[-1] == "data: [DONE]"
    assert sum('"content":"tok "' in e for e in events) == 8
    assert served.proc.wait(20) == 0
    assert refused(served.port)


class GatedUpstream:
    """An OpenAI-compatible upstream for one streamed call: it sends the first chunk, then holds
    the stream open until ``release`` is set. The test decides when the stream may end."""

    def __init__(self):
        self.release, self.finished = threading.Event(), threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.thread = threading.Thread(target=self.serve_one, daemon=True)
        self.thread.start()

    @staticmethod
    def chunk(i: int, content: str) -> bytes:
        event = b"data: " + json.dumps({"id": "chatcmpl-gated", "object": "chat.completion.chunk", "created": 1,
                                        "model": "gated", "choices": [{"index": 0, "delta": {"content": content},
                                                                       "finish_reason": None}]}).encode() + b"\n\n"
        return b"%x\r\n%s\r\n" % (len(event), event)

    def serve_one(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(30)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" + self.chunk(0, "first "))
            self.release.wait(30)
            done = b"data: [DONE]\n\n"
            conn.sendall(self.chunk(1, "second ") + self.chunk(2, "third") +
                         b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            self.finished.set()

    def close(self) -> None:
        self.release.set()
        self.sock.close()
        self.thread.join(10)


@pytest.fixture
def gated():
    upstream = GatedUpstream()
    yield upstream
    upstream.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_new_connections_are_refused_while_a_stream_drains(serve, gated, workers):
    config = (f"model_list:\n  - model_name: gated\n    litellm_params:\n      model: openai/gated\n"
              f"      api_base: {gated.base}\n      api_key: sk-gated\n"
              "general_settings:\n  graceful_shutdown_timeout: 10\n")
    served = serve(config, workers)
    conn, resp = open_stream(served.port, "gated")
    try:
        first = resp.readline()
        assert b'"first "' in first
        served.proc.send_signal(signal.SIGTERM)
        # the upstream is still holding the stream open, so this is strictly during the drain
        wait_for(lambda: refused(served.port), timeout=8, what="new connections to be refused")
        assert not gated.finished.is_set() and served.proc.poll() is None
        gated.release.set()
        rest = resp.read()
    finally:
        conn.close()
    events = sse_events(first + rest)
    assert events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[:-1]) == "first second third"
    assert served.proc.wait(20) == 0


# --- (c) the request log ---------------------------------------------------------------------------

def test_request_log_is_one_json_object_per_line(serve, fake_provider):
    fake = fake_provider()
    served = serve(config_yaml(fake), 1, FAKE_KEY=PROVIDER_KEY)
    calls = {}
    for name, (method, path, body, key) in {
        "mock": ("POST", "/v1/chat/completions", {"model": "demo", "messages": HELLO}, MASTER_KEY),
        "upstream": ("POST", "/chat/completions", {"model": "gpt-fake", "messages": HELLO}, MASTER_KEY),
        "stream": ("POST", "/v1/chat/completions", {"model": "gpt-fake", "messages": HELLO, "stream": True},
                   MASTER_KEY),
        "unknown_model": ("POST", "/v1/chat/completions", {"model": "nope", "messages": HELLO}, MASTER_KEY),
        "bad_key": ("POST", "/v1/chat/completions", {"model": "demo", "messages": HELLO}, "sk-wrong"),
        "not_found": ("GET", "/v1/nowhere?api_key=sk-query-secret", None, MASTER_KEY),
    }.items():
        status, headers, _ = request(served.port, method, path, body, key=key)
        calls[name] = (status, headers["x-litellm-call-id"])
    assert served.terminate() == 0

    lines = served.access_lines()
    by_id = {}
    for line in lines:
        assert {"call_id", "route", "status", "model_group"} <= set(line)
        by_id.setdefault(line["call_id"], []).append(line)
    expected = {
        "mock": ("/chat/completions", 200, "demo"),
        "upstream": ("/chat/completions", 200, "gpt-fake"),
        "stream": ("/chat/completions", 200, "gpt-fake"),
        "unknown_model": ("/chat/completions", 400, "nope"),
        "bad_key": ("/chat/completions", 401, None),
        "not_found": ("(unmatched)", 404, None),
    }
    for name, (route, status, group) in expected.items():
        assert calls[name][0] == status, name
        (line,) = by_id[calls[name][1]]
        assert (line["route"], line["status"], line["model_group"]) == (route, status, group), name
    upstream = by_id[calls["upstream"][1]][0]
    assert upstream["provider"] == "openai" and upstream["deployment_id"] and upstream["prompt_tokens"] == 3
    assert by_id[calls["stream"][1]][0]["stream"] is True
    assert by_id[calls["mock"][1]][0]["provider"] == "mock"
    text = served.stderr()
    for secret in (MASTER_KEY, PROVIDER_KEY, "sk-wrong", "sk-query-secret"):
        assert secret not in text


def mapped_files(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as maps:
        return maps.read()


def test_without_a_database_no_process_loads_the_driver_or_cryptography(serve, fake_provider):
    # psycopg2 + aiopg and cryptography are ~24 MB resident in every worker: loaded only when
    # database storage is on
    fake = fake_provider()
    served = serve(config_yaml(fake), 1, FAKE_KEY=PROVIDER_KEY)
    status, _, _ = request(served.port, "POST", "/v1/chat/completions", {"model": "gpt-fake", "messages": HELLO})
    assert status == 200
    assert request(served.port, "GET", "/model/info")[0] == 200
    (worker,) = served.workers()
    for pid in (served.proc.pid, worker):
        maps = mapped_files(pid)
        assert "pycurl" in maps  # the check can see extension modules
        assert "psycopg2" not in maps and "cryptography" not in maps


def raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)  # no half-close: Tornado takes an EOF as the client gone
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def test_keys_in_malformed_requests_never_reach_the_log(serve):
    """Issue 9 (5): the served process at DEBUG, attacked with keys in headers Tornado cannot
    parse and with cut uploads; its stderr never holds the key, and SIGTERM is not held up by
    requests that never finished (the in-flight leak)."""
    served = serve(config_yaml(grace=60), 1, "--log-level", "DEBUG")
    for bad in (b"\x00", b"\x0b", b"\r\nno colon here"):
        reply = raw_exchange(served.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                             + MASTER_KEY.encode() + bad + b"\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
        assert MASTER_KEY.encode() not in reply
    for cut in (b"Content-Length: 500\r\n\r\n{\"model\"", b"Transfer-Encoding: chunked\r\n\r\n5\r\nab"):
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         + MASTER_KEY.encode() + b"\r\n" + cut)
    chat_counted(served.port)  # still serving
    assert served.terminate() == 0  # within terminate()'s 20 s, though the grace period is 60 s
    log = served.stderr()
    assert "refused a request" in log
    assert MASTER_KEY not in log
