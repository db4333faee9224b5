"""The servers under test: the gateway (``proxyctl serve``), the bare forwarder and, with
``--compare litellm``, the LiteLLM proxy; all on loopback, all started from one LiteLLM-style
``config.yaml`` (the bare forwarder needs none), each with its stdout/stderr in a log file."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from netutil import LOOPBACK, free_port, wait_for_port
from upstreams import CHAT_PATH, Upstream

MASTER_KEY = "sk-bench-master-0001"
UPSTREAM_KEY = "sk-bench-upstream"
MODEL_PREFIX = "bench-"  # model group "bench-instant" -> upstream "instant"
PAIR = "pair"  # the router scenario's pseudo-upstream: a two-deployment group on "instant"
PAIR_MODEL = MODEL_PREFIX + PAIR
# the "virtual key + spend log" scenario: a gateway with database storage (a private, embedded
# PostgreSQL) on the instant upstream, called with the master key ("keys") and a virtual key ("vkey")
KEYS, VKEY = "keys", "vkey"
# the cache-hit scenario: every request the same prompt to the slow upstream, through a gateway
# with litellm_settings.cache ("cache", after the first all are hits) and through the uncached
# gateway-wN ("nocache")
CACHE, NOCACHE = "cache", "nocache"
CACHE_UPSTREAM = "slow"
HERE = Path(__file__).resolve().parent
DROPPED_ENV = ("DATABASE_URL", "STORE_MODEL_IN_DB", "CONFIG_FILE_PATH", "NUM_WORKERS",
               "LITELLM_MASTER_KEY", "OPENAI_API_KEY", "OPENAI_API_BASE", "OPENAI_BASE_URL")


@dataclass
class Server:
    """A running target. ``path_for`` gives the URL path that reaches an upstream through it."""

    name: str  # "gateway-w1", "bare", "litellm-w2", ...
    kind: str  # "gateway" | "bare" | "litellm"
    workers: int
    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def path_for(self, upstream: Upstream) -> str:
        return f"/u/{upstream.port}{CHAT_PATH}" if self.kind == "bare" else CHAT_PATH

    def key(self) -> str:
        return UPSTREAM_KEY if self.kind == "bare" else MASTER_KEY

    def model_for(self, upstream: Upstream) -> str:
        return MODEL_PREFIX + upstream.name


def config_yaml(upstreams: dict[str, Upstream]) -> str:
    """A plain LiteLLM config (JSON is valid YAML): one model group per upstream."""
    return json.dumps(config_dict(upstreams), indent=2)


def cached_config_yaml(upstreams: dict[str, Upstream], cache_params: dict) -> str:
    """The same config with the response cache on (``litellm_settings.cache``)."""
    return json.dumps({**config_dict(upstreams), "litellm_settings": {"cache": True, "cache_params": cache_params}},
                      indent=2)


def config_dict(upstreams: dict[str, Upstream]) -> dict:
    models = [{"model_name": MODEL_PREFIX + u.name,
               "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": u.base_url,
                                  "api_key": UPSTREAM_KEY}}
              for u in upstreams.values()]
    # the router scenario: one group of two deployments (both on the instant upstream, distinct
    # ids), with retries on; no failures, so it measures what choosing between them costs
    instant = upstreams["instant"]
    models += [{"model_name": PAIR_MODEL,
                "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": instant.base_url,
                                   "api_key": UPSTREAM_KEY},
                "model_info": {"id": f"pair-{n}"}} for n in (1, 2)]
    return {"model_list": models, "general_settings": {"master_key": MASTER_KEY},
            "router_settings": {"num_retries": 2}}


def keyed_config_yaml(upstreams: dict[str, Upstream], folder: Path) -> str:
    """The instant group on a gateway with database storage: an embedded PostgreSQL of its own
    (in ``folder``), so virtual keys work and every call leaves a spend-log row."""
    instant = upstreams["instant"]
    models = [{"model_name": MODEL_PREFIX + instant.name,
               "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": instant.base_url,
                                  "api_key": UPSTREAM_KEY}}]
    return json.dumps({"model_list": models, "general_settings": {
        "master_key": MASTER_KEY, "database_url": "embedded", "embedded_db_dir": str(folder / "pgdata"),
        "spend_spill_dir": str(folder / "spend")}}, indent=2)


def generate_key(server: Server, timeout: float = 10.0) -> str:
    """A virtual key made through the gateway's /key/generate (master key)."""
    conn = http.client.HTTPConnection(LOOPBACK, server.port, timeout=timeout)
    try:
        conn.request("POST", "/key/generate", json.dumps({"key_alias": "bench"}),
                     {"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"{server.name}: /key/generate answered {response.status}: {body[:300]!r}")
        return json.loads(body)["key"]
    finally:
        conn.close()


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    env.update(extra)
    return env


def launch(cmd: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)


def start_gateway(proxyctl: Path, config: Path, workers: int, log_level: str, logdir: Path,
                  name: str | None = None) -> Server:
    port = free_port()
    name = name or f"gateway-w{workers}"
    cmd = [str(proxyctl), "serve", "--config", str(config), "--host", LOOPBACK, "--port", str(port),
           "--num-workers", str(workers), "--log-level", log_level]
    process = launch(cmd, logdir / f"{name}.log", clean_env({"LITELLM_LOG": log_level}))
    return Server(name, "gateway", workers, port, process, logdir / f"{name}.log")


def start_bare(logdir: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, str(HERE / "bare_forwarder.py"), "--port", str(port), "--upstream-key", UPSTREAM_KEY]
    process = launch(cmd, logdir / "bare.log", clean_env({}))
    return Server("bare", "bare", 1, port, process, logdir / "bare.log")


def start_litellm(litellm_bin: Path, config: Path, workers: int, logdir: Path) -> Server:
    """LiteLLM as its docs run it. Its cost map is read from the package, not fetched, and
    telemetry is off, so nothing leaves loopback."""
    port = free_port()
    name = f"litellm-w{workers}"
    cmd = [str(litellm_bin), "--config", str(config), "--host", LOOPBACK, "--port", str(port),
           "--num_workers", str(workers)]
    env = clean_env({"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
                     "DISABLE_SCHEMA_UPDATE": "True", "NO_DOCS": "True"})
    env.pop("LITELLM_LOG", None)  # LiteLLM's own default logging
    process = launch(cmd, logdir / f"{name}.log", env)
    return Server(name, "litellm", workers, port, process, logdir / f"{name}.log")


def post_chat(server: Server, upstream: Upstream, timeout: float = 10.0) -> int:
    """One non-streamed chat completion through ``server``; returns the HTTP status."""
    body = json.dumps({"model": server.model_for(upstream),
                       "messages": [{"role": "user", "content": "ready?"}]})
    conn = http.client.HTTPConnection(LOOPBACK, server.port, timeout=timeout)
    try:
        conn.request("POST", server.path_for(upstream), body,
                     {"Authorization": f"Bearer {server.key()}", "Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def wait_ready(server: Server, upstream: Upstream, timeout: float) -> None:
    """Until a chat completion through ``server`` answers 200 (proves config and upstream)."""
    wait_for_port(server.port, server.process, timeout)
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        try:
            status = post_chat(server, upstream)
            if status == 200:
                return
        except OSError as exc:
            status = type(exc).__name__
        if server.process.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"{server.name} is not serving (last answer: {status}); see {server.log_path}:\n"
                       + tail(server.log_path))


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def stop(server: Server, grace: float = 10.0) -> None:
    """SIGTERM the server's process group (workers included), SIGKILL after ``grace``."""
    if server.process.poll() is not None:
        return
    try:
        os.killpg(server.process.pid, signal.SIGTERM)
        server.process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
    except ProcessLookupError:
        pass
