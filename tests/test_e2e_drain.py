"""Graceful drain on SIGTERM and zero-downtime restarts.

In-process (the worker the way ``serve`` runs it, stopped through its stop event, which is what
SIGTERM sets): readiness answers 503 while draining, a connection the kernel had accepted before
the stop is still served, idle keep-alive connections close at once, busy ones after their
response. As subprocesses (``proxyctl serve``): 50 streams in flight on 2 workers all finish
after SIGTERM while new connections are refused; a stream longer than ``--graceful-timeout`` is
cut and the process still exits 0; two instances restarted one after the other behind a
retrying client-side balancer lose no request.

Every wait is a bounded poll; nothing asserts on how long anything took.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import orjson
import pytest

from .conftest import MASTER_KEY as INPROC_KEY
from .conftest import PROVIDER_KEY as INPROC_PROVIDER_KEY
from .test_e2e_serve import HELLO, MASTER_KEY, PROVIDER_KEY, PROXYCTL, FakeProvider, child_env, free_port, wait_for
from .test_e2e_serve import fake_provider  # noqa: F401 - the fixture, shared

# --- in-process -------------------------------------------------------------------------------------


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response with a Content-Length body: (status, headers lower-cased, body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if line)
    headers = {k.lower(): v for k, v in headers.items()}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
    return int(lines[0].split()[1]), headers, body


def stream_request(model: str, key: str) -> bytes:
    body = orjson.dumps({"model": model, "messages": HELLO, "stream": True})
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def test_readiness_is_503_while_draining_and_the_backlog_is_served(gateway):
    gw = await gateway("model_list:\n  - model_name: demo\n    litellm_params: {model: mock/demo}\n")
    # the handshake completes in the kernel; the worker has not accepted the connection yet
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    try:
        sock.sendall(b"GET /health/readiness HTTP/1.1\r\nHost: x\r\n\r\n")
        gw.stop_event.set()  # what SIGTERM does: the worker drains before it takes the connection
        raw = await asyncio.to_thread(read_until_closed, sock)
    finally:
        sock.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), raw
    assert b"\r\nConnection: close" in head
    assert json.loads(body)["status"] == "draining"
    await asyncio.wait_for(gw.task, 20)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", gw.port), timeout=5).close()


def read_until_closed(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


async def test_idle_keep_alive_closes_at_once_and_a_busy_connection_after_its_response(gateway, fake_openai):
    fake_openai.stream_chunks, fake_openai.chunk_delay = 6, 0.2
    gw = await gateway(f"""
    model_list:
      - model_name: slow
        litellm_params: {{model: openai/gpt-4o-mini, api_base: "{fake_openai.base}", api_key: {INPROC_PROVIDER_KEY}}}
    general_settings:
      graceful_shutdown_timeout: 20
    """)
    idle_r, idle_w = await asyncio.open_connection("127.0.0.1", gw.port)
    idle_w.write(b"GET /health/readiness HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = await read_response(idle_r)
    assert status == 200 and json.loads(body)["status"] == "healthy" and headers.get("connection") != "close"

    busy_r, busy_w = await asyncio.open_connection("127.0.0.1", gw.port)
    busy_w.write(stream_request("slow", INPROC_KEY))
    first = await asyncio.wait_for(busy_r.readuntil(b"data: {"), 10)
    assert first.startswith(b"HTTP/1.1 200 ")

    gw.stop_event.set()
    assert await asyncio.wait_for(idle_r.read(), 10) == b""  # the idle keep-alive connection: closed
    assert fake_openai.streams_finished == 0                    # while the stream still runs
    rest = await asyncio.wait_for(busy_r.read(), 20)             # read() returns at EOF: closed after it
    assert rest.count(b'"content":"tok "') == 6 and b"data: [DONE]" in rest
    assert fake_openai.streams_finished == 1
    await asyncio.wait_for(gw.task, 20)
    for writer in (idle_w, busy_w):
        writer.close()


async def test_a_new_connection_whose_first_request_is_on_its_way_is_served(gateway):
    """Accepted just before the drain, its head not read yet: the client is sending it. Closing
    it as idle would fail a request that already went out (only kept-alive connections waiting
    for a next request are closed at once)."""
    gw = await gateway("model_list:\n  - model_name: demo\n    litellm_params: {model: mock/demo}\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    await asyncio.sleep(0.2)  # the worker (this event loop) accepts the connection
    gw.stop_event.set()
    await asyncio.sleep(0.2)  # draining has begun
    writer.write(b"GET /health/liveliness HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert status == 200 and headers.get("connection") == "close"
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    await asyncio.wait_for(gw.task, 20)


# --- subprocesses -------------------------------------------------------------------------------------

class Instance:
    """`proxyctl serve` on a given port, in its own folder (pid file, stderr)."""

    def __init__(self, folder: pathlib.Path, config: str, port: int, workers: int, *args: str):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(config)
        self.port = port
        self.stderr_path = folder / f"stderr-{time.monotonic_ns()}.log"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(PROXYCTL), "serve", "--config", str(folder / "config.yaml"), "--host", "127.0.0.1",
             "--port", str(port), "--num-workers", str(workers), *args],
            stdout=subprocess.DEVNULL, stderr=self._stderr, env=child_env(LITELLM_MASTER_KEY=MASTER_KEY),
            cwd=folder, start_new_session=True)
        wait_for(self.alive, what=f"port {port} to answer")

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"proxyctl serve exited with {self.proc.returncode}:\n{self.stderr()}")
        try:
            return probe(self.port) == "answered"
        except OSError:
            return False

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"proxyctl serve did not exit within {timeout}s of SIGTERM")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._stderr.close()


@pytest.fixture
def instances():
    started: list[Instance] = []

    def start(*args, **kwargs) -> Instance:
        instance = Instance(*args, **kwargs)
        started.append(instance)
        return instance

    yield start
    for instance in started:
        instance.close()




def probe(port: int) -> str:
    """A new connection and one request: "refused" (nothing reached a server), "answered" (a
    complete 200), or an exception for anything else (a reset, a cut answer)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        try:
            conn.connect()
        except ConnectionRefusedError:
            return "refused"
        conn.request("GET", "/health/liveliness")
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200 and body == b'"I\'m alive!"', (resp.status, body)
        return "answered"
    finally:
        conn.close()


def config_for(fake: FakeProvider) -> str:
    return ("model_list:\n  - model_name: gpt-fake\n    litellm_params:\n      model: openai/gpt-4o-mini\n"
            f"      api_base: {fake.base}\n      api_key: {PROVIDER_KEY}\n")


def open_stream(port: int) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({"model": "gpt-fake", "messages": HELLO,
                                                                  "stream": True}),
                 headers={"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    return conn, resp


@pytest.mark.timeout(120)
def test_sigterm_lets_50_streams_on_two_workers_finish(tmp_path, instances, fake_provider):
    fake = fake_provider("--chunks", "30", "--chunk-delay", "0.1")  # ~3 s per stream
    served = instances(tmp_path, config_for(fake), free_port(), 2, "--graceful-timeout", "30")
    started = threading.Barrier(51, timeout=60)
    results: list[bytes | BaseException] = [b""] * 50

    def client(i: int) -> None:
        try:
            conn, resp = open_stream(served.port)
        except BaseException as exc:
            results[i] = exc
            started.abort()
            raise
        try:
            first = resp.readline()
            started.wait()
            results[i] = first + resp.read()
        except BaseException as exc:
            results[i] = exc
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(50)]
    for t in threads:
        t.start()
    started.wait()  # every stream has its first event: all 50 are mid-stream
    served.proc.send_signal(signal.SIGTERM)
    # a new connection is refused (or, in the instant before the port closes, fully answered)
    outcomes = []
    wait_for(lambda: outcomes.append(probe(served.port)) or outcomes[-1] == "refused", timeout=10,
             what="new connections to be refused")
    assert served.proc.poll() is None  # refused while the streams are still draining
    for t in threads:
        t.join(60)
    for i, raw in enumerate(results):
        assert isinstance(raw, bytes), f"stream {i}: {raw!r}"
        events = [e for e in raw.decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]", f"stream {i} ended with {events[-1:]!r}"
        assert sum('"content":"tok "' in e for e in events) == 30, f"stream {i} is incomplete"
    assert served.proc.wait(30) == 0
    assert probe(served.port) == "refused"


@pytest.mark.timeout(90)
def test_a_stream_longer_than_the_graceful_timeout_is_cut(tmp_path, instances, fake_provider):
    fake = fake_provider("--chunks", "600", "--chunk-delay", "0.1")  # a minute of stream
    served = instances(tmp_path, config_for(fake), free_port(), 1, "--graceful-timeout", "1")
    conn, resp = open_stream(served.port)
    try:
        assert resp.readline().startswith(b"data: {")
        served.proc.send_signal(signal.SIGTERM)
        try:
            rest = resp.read()
        except http.client.IncompleteRead as exc:
            rest = exc.partial
    finally:
        conn.close()
    assert b"[DONE]" not in rest
    assert served.proc.wait(30) == 0
    assert "still open after the 1s grace period" in served.stderr()


# --- zero-downtime restart ----------------------------------------------------------------------------

class Balancer:
    """A round-robin client-side balancer that behaves like nginx with ``proxy_next_upstream
    error`` for a POST: a request goes to the next instance only when the connection was
    refused, i.e. the request never reached a server. Any other error (a reset after the
    request was sent, a cut answer, a non-200) is a failure, never retried."""

    def __init__(self, ports: list[int]):
        self.ports = ports
        self.turn = itertools.count()
        self.lock = threading.Lock()
        self.failures: list[str] = []
        self.retried = 0
        self.served: dict[int, int] = {p: 0 for p in ports}

    def call(self, stream: bool) -> None:
        with self.lock:
            start = next(self.turn)
        for attempt in range(len(self.ports)):
            port = self.ports[(start + attempt) % len(self.ports)]
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                try:
                    conn.connect()
                except ConnectionRefusedError:
                    with self.lock:
                        self.retried += 1
                    continue
                self.exchange(conn, port, stream)
                return
            except Exception as exc:  # after the connection was made: a failure
                self.fail(f"port {port}: {type(exc).__name__}: {exc}")
                return
            finally:
                conn.close()
        self.fail("every instance refused the connection")

    def exchange(self, conn: http.client.HTTPConnection, port: int, stream: bool) -> None:
        conn.request("POST", "/v1/chat/completions",
                     body=json.dumps({"model": "gpt-fake", "messages": HELLO, "stream": stream}),
                     headers={"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            return self.fail(f"port {port}: status {resp.status}: {body[:200]!r}")
        complete = body.rstrip().endswith(b"data: [DONE]") if stream else b'"finish_reason":"stop"' in body
        if not complete:
            return self.fail(f"port {port}: incomplete answer {body[-200:]!r}")
        with self.lock:
            self.served[port] += 1

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)

    def count(self, port: int) -> int:
        with self.lock:
            return self.served[port]


@pytest.mark.timeout(180)
def test_restarting_two_instances_one_by_one_loses_no_request(tmp_path, instances, fake_provider):
    fake = fake_provider("--chunks", "5", "--chunk-delay", "0.05")  # requests are in flight at any moment
    config = config_for(fake)
    ports = [free_port(), free_port()]
    running = {port: instances(tmp_path / f"i{n}", config, port, 1) for n, port in enumerate(ports)}
    balancer = Balancer(ports)
    stop = threading.Event()

    def client(n: int) -> None:
        for i in itertools.count():
            if stop.is_set():
                return
            balancer.call(stream=(i + n) % 2 == 0)
            time.sleep(0.005)

    clients = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(4)]
    for t in clients:
        t.start()
    try:
        for n, port in enumerate(ports):
            before = balancer.count(port)
            wait_for(lambda: balancer.count(port) >= before + 10, timeout=30, what="steady load")
            assert running[port].terminate() == 0
            served_before = balancer.count(port)
            running[port] = instances(tmp_path / f"i{n}", config, port, 1)  # same port (SO_REUSEADDR)
            wait_for(lambda: balancer.count(port) >= served_before + 10, timeout=30,
                     what="the restarted instance to serve")
    finally:
        stop.set()
        for t in clients:
            t.join(60)
    assert balancer.failures == [], balancer.failures[:5]
    assert all(balancer.count(p) > 20 for p in ports)
    assert balancer.retried > 0  # the load did run into the restart windows (and went to the other instance)
