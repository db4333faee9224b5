"""The benchmark's upstreams: one nginx process on loopback serving canned OpenAI replies.

Three servers, one per upstream kind, each logging one 2-byte line per request it really
received, so ``received()`` is the log size / 2 (a proxy that caches or short-circuits shows
fewer upstream requests than successful responses):

- ``instant``: ``return 200`` with a canned ``chat.completion`` (costs almost nothing);
- ``slow``: the same body after ``echo_sleep`` (fixed latency, 50 ms by default);
- ``sse``: a ``chat.completion.chunk`` stream, a role chunk, N content chunks ``"0 "``,
  ``"1 "``, ... (so clients can check order) ``delay`` apart, a finish chunk and ``[DONE]``.

The fixed-latency and SSE servers need the nginx echo module (Debian: nginx-light ships it).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from netutil import free_port, wait_for_port

NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
ECHO_MODULE_CANDIDATES = ("/usr/lib/nginx/modules/ngx_http_echo_module.so",
                          "/usr/local/lib/nginx/modules/ngx_http_echo_module.so")
CHAT_PATH = "/v1/chat/completions"
UPSTREAM_MODEL = "gpt-4o-mini"
CREATED = 1700000000
SSE_END = "\\n\\n"  # nginx unescapes this inside a quoted string


@dataclass(frozen=True)
class UpstreamSpec:
    """What to serve: the slow upstream's latency and the SSE stream's shape (nginx sleeps in ms)."""

    slow_latency_s: float = 0.05
    sse_chunks: int = 20
    sse_chunk_delay_s: float = 0.01


@dataclass(frozen=True)
class Upstream:
    """One running upstream server: where it listens and the log that counts its requests."""

    name: str
    port: int
    count_log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def received(self) -> int:
        """Requests this upstream has finished answering (nginx logs at the end of a request)."""
        try:
            return self.count_log.stat().st_size // 2
        except FileNotFoundError:
            return 0


def find_file(candidates: tuple[str, ...]) -> str | None:
    return next((p for p in candidates if os.path.exists(p)), None)


def nginx_literal(text: str, escapes: str = "") -> str:
    """``text`` (then nginx ``escapes`` such as ``\\n``) as a single-quoted nginx string.

    Refuses characters nginx would interpret (quotes, variables, backslashes)."""
    if any(c in text for c in "'$\\"):
        raise ValueError(f"cannot embed in nginx config: {text[:40]!r}")
    return "'" + text + escapes + "'"


def completion_body() -> str:
    """A realistic non-streamed ``chat.completion`` reply."""
    return json.dumps({
        "id": "chatcmpl-bench0000000000000000000001", "object": "chat.completion",
        "created": CREATED, "model": UPSTREAM_MODEL, "system_fingerprint": "fp_bench0001",
        "choices": [{"index": 0, "message": {"role": "assistant", "refusal": None,
                                             "content": "Hello! This is a canned benchmark reply."},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 13, "completion_tokens": 9, "total_tokens": 22},
    }, separators=(",", ":"))


def stream_events(chunks: int) -> list[str]:
    """The SSE stream's JSON events, in order (without ``[DONE]``)."""
    def chunk(delta: dict, finish: str | None = None) -> str:
        return json.dumps({
            "id": "chatcmpl-bench0000000000000000000002", "object": "chat.completion.chunk",
            "created": CREATED, "model": UPSTREAM_MODEL, "system_fingerprint": "fp_bench0001",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }, separators=(",", ":"))
    return ([chunk({"role": "assistant", "content": ""})]
            + [chunk({"content": expected_piece(i)}) for i in range(chunks)]
            + [chunk({}, "stop")])


def expected_piece(index: int) -> str:
    return f"{index} "


def sse_directives(spec: UpstreamSpec) -> str:
    events = stream_events(spec.sse_chunks)
    lines = []
    for i, event in enumerate(events):
        if 0 < i < len(events) - 1:  # the delay goes before each content chunk
            lines.append(f"echo_sleep {spec.sse_chunk_delay_s:.3f};")
        lines.append(f"echo -n {nginx_literal('data: ' + event, SSE_END)}; echo_flush;")
    lines.append(f"echo -n {nginx_literal('data: [DONE]', SSE_END)};")
    return "\n      ".join(lines)


def server_block(port: int, log: Path, body: str) -> str:
    return (f"  server {{\n    listen 127.0.0.1:{port} backlog=4096;\n"
            f"    location / {{\n      access_log {log} counted;\n      {body}\n    }}\n  }}\n")


def nginx_config(workdir: Path, echo_module: str, ports: dict[str, int], spec: UpstreamSpec) -> str:
    reply = nginx_literal(completion_body())
    bodies = {
        "instant": f"return 200 {reply};",
        "slow": f"echo_sleep {spec.slow_latency_s:.3f}; echo -n {reply};",
        "sse": "default_type text/event-stream;\n      " + sse_directives(spec),
    }
    servers = "".join(server_block(ports[name], workdir / f"{name}.count", body)
                      for name, body in bodies.items())
    return f"""load_module {echo_module};
master_process off;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  log_format counted "1";
  default_type application/json;
  client_body_temp_path {workdir}/client_body;
  keepalive_requests 100000000;
  keepalive_timeout 600s;
{servers}}}
"""


class Upstreams:
    """Start with ``start()``, stop with ``stop()``; ``by_name`` maps kind -> ``Upstream``."""

    def __init__(self, workdir: Path, spec: UpstreamSpec):
        self.workdir = workdir
        self.spec = spec
        self.process: subprocess.Popen | None = None
        self.by_name: dict[str, Upstream] = {}

    def start(self) -> None:
        nginx, echo_module = find_file(NGINX_CANDIDATES), find_file(ECHO_MODULE_CANDIDATES)
        if nginx is None or echo_module is None:
            raise RuntimeError("nginx with the echo module is needed: apt-get install -y nginx-light")
        self.workdir.mkdir(parents=True, exist_ok=True)
        ports = {name: free_port() for name in ("instant", "slow", "sse")}
        conf = self.workdir / "nginx.conf"
        conf.write_text(nginx_config(self.workdir, echo_module, ports, self.spec))
        with open(self.workdir / "nginx.out", "wb") as out:
            self.process = subprocess.Popen([nginx, "-p", str(self.workdir), "-c", str(conf)],
                                            stdout=out, stderr=subprocess.STDOUT)
        for name, port in ports.items():
            wait_for_port(port, self.process, timeout=10)
            self.by_name[name] = Upstream(name, port, self.workdir / f"{name}.count")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def quiesce(upstream: Upstream, quiet_s: float = 0.3, timeout: float = 5.0) -> int:
    """The upstream's count once nothing more has arrived for ``quiet_s``: requests a previous
    run left in flight (wrk stops mid-request) are then not counted in the next run."""
    deadline = time.monotonic() + timeout
    count, since = upstream.received(), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.02)
        now = upstream.received()
        if now != count:
            count, since = now, time.monotonic()
    return count


def settle(upstream: Upstream, at_least: int, timeout: float = 2.0) -> int:
    """The upstream's count once in-flight requests have been logged (or ``timeout`` passed)."""
    deadline = time.monotonic() + timeout
    count = upstream.received()
    while count < at_least and time.monotonic() < deadline:
        time.sleep(0.02)
        count = upstream.received()
    return count
