"""`proxyctl reload` against a real `bin/proxyctl serve --num-workers 2 --pid-file ...`: every worker
serves the edited models and routes and reports the new generation; a broken file is refused
with the reason while the old configuration keeps serving; a stream and a loop of requests in
flight during the reload all complete.

Each worker is reached through its own keep-alive connection (pinned by the ``worker_pid`` that
readiness reports), so "every worker" is checked, not hoped for. Every wait is a bounded poll.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading

import psycopg2
import pytest
import yaml

from tornado_proxy.config import DEFAULT_ROUTES_FILE

from .test_e2e_serve import (  # noqa: F401 (fixtures)
    MASTER_KEY, PROXYCTL, child_env, gated, open_stream, request, serve, sse_events, wait_for)

HELLO = [{"role": "user", "content": "hello reload"}]


def config_text(models: dict[str, str], extra_alias: str | None = None, upstream=None) -> str:
    """A full config: the default route table (plus an alias, if given) and ``models``
    (name -> litellm model; ``openai/...`` ones point at ``upstream``)."""
    routes = yaml.safe_load(DEFAULT_ROUTES_FILE.read_text())["routes"]
    if extra_alias:
        chat = next(r for r in routes if r["handler"] == "chat_completions")
        chat["aliases"] = [extra_alias, *chat["aliases"]]
    model_list = []
    for name, model in models.items():
        params = {"model": model}
        if model.startswith("openai/"):
            params.update(api_base=upstream.base, api_key="sk-gated")
        model_list.append({"model_name": name, "litellm_params": params})
    return yaml.safe_dump({
        "routes": routes,
        "model_list": model_list,
        "general_settings": {"graceful_shutdown_timeout": 5},
    }, sort_keys=False)


def terminate(served) -> int:
    """SIGTERM and wait (bounded); on a hang, fail showing what the server logged."""
    served.proc.send_signal(signal.SIGTERM)
    try:
        return served.proc.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"proxyctl serve did not exit after SIGTERM; its log ends with:\n{served.stderr()[-6000:]}")


def run_reload(pid_file) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROXYCTL), "reload", "--pid-file", str(pid_file)],
                          capture_output=True, text=True, timeout=30, env=child_env())


class Pinned:
    """One keep-alive connection, hence one worker."""

    def __init__(self, conn: http.client.HTTPConnection, pid: int):
        self.conn, self.pid = conn, pid

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {MASTER_KEY}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        self.conn.request(method, path, body=data, headers=headers)
        resp = self.conn.getresponse()
        payload = resp.read()
        return resp.status, json.loads(payload) if payload else {}

    def readiness(self) -> dict:
        status, body = self.call("GET", "/health/readiness")
        assert status == 200
        assert body["worker_pid"] == self.pid  # still the same worker: the connection was kept
        return body

    def chat(self, model: str, path: str = "/v1/chat/completions") -> int:
        status, body = self.call("POST", path, {"model": model, "messages": HELLO})
        if status == 200:
            assert body["choices"][0]["message"]["content"] == "hello reload"
        return status

    def close(self) -> None:
        self.conn.close()


def pin_workers(port: int, count: int) -> list[Pinned]:
    """Open connections until ``count`` different workers hold one each."""
    pinned: dict[int, Pinned] = {}

    def more() -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        conn.request("GET", "/health/readiness")
        pid = json.loads(conn.getresponse().read())["worker_pid"]
        if pid in pinned:
            conn.close()
        else:
            pinned[pid] = Pinned(conn, pid)
        return len(pinned) == count

    wait_for(more, timeout=20, interval=0, what=f"connections to {count} different workers")
    return list(pinned.values())


@pytest.fixture
def pinned():
    held: list[Pinned] = []

    def pin(port: int, count: int = 2) -> list[Pinned]:
        found = pin_workers(port, count)
        held.extend(found)
        return found

    yield pin
    for p in held:
        p.close()


class RequestLoop:
    """Chat requests on fresh connections (so both workers get them) until stopped."""

    def __init__(self, port: int, model: str):
        self.port, self.model = port, model
        self.results: list[object] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                status, _, _ = request(self.port, "POST", "/v1/chat/completions",
                                       {"model": self.model, "messages": HELLO})
                self.results.append(status)
            except OSError as exc:
                self.results.append(repr(exc))

    def stop(self) -> list[object]:
        self.stopped.set()
        self.thread.join(20)
        assert not self.thread.is_alive()
        return self.results


def all_at(workers: list[Pinned], generation: int) -> bool:
    return all(w.readiness()["config_generation"] == generation for w in workers)


def test_reload_reaches_every_worker_without_dropping_anything(serve, gated, pinned, tmp_path):
    pid_file = tmp_path / "run" / "gw.pid"
    v1 = {"demo": "mock/demo", "old": "mock/old", "gated": "openai/gated"}
    served = serve(config_text(v1, upstream=gated), 2, "--pid-file", str(pid_file))
    assert int(pid_file.read_text()) == served.proc.pid
    workers = pinned(served.port)
    for w in workers:
        assert w.readiness()["config_generation"] == 1
        assert w.chat("old") == 200 and w.chat("fresh") == 400
        assert w.chat("demo", "/v2/chat/completions") == 404

    # a stream from a model the new file removes (its upstream holds it open until released),
    # and a loop of requests, both in flight across the reload
    conn, resp = open_stream(served.port, "gated")
    loop = RequestLoop(served.port, "demo")
    try:
        first = resp.readline()
        assert first.startswith(b"data: {")
        wait_for(lambda: len(loop.results) >= 5, timeout=10, what="requests before the reload")

        v2 = {"demo": "mock/demo", "fresh": "mock/fresh"}  # "old" and "gated" removed, "fresh" added
        served.config_path.write_text(config_text(v2, extra_alias="/v2/chat/completions"))
        result = run_reload(pid_file)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"reloaded {served.config_path}: config generation 2"

        wait_for(lambda: all_at(workers, 2), timeout=10, what="generation 2 on every worker")
        seen = len(loop.results)
        wait_for(lambda: len(loop.results) >= seen + 5, timeout=10, what="requests after the reload")
        assert not gated.finished.is_set()  # the stream really was open across the whole reload
        gated.release.set()
        rest = resp.read()
    finally:
        results = loop.stop()
        conn.close()
    assert results and all(r == 200 for r in results), [r for r in results if r != 200]
    events = sse_events(first + rest)
    assert events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[:-1]) == "first second third"

    for w in workers:
        assert w.chat("fresh") == 200
        assert w.chat("fresh", "/v2/chat/completions") == 200  # the new alias
        assert w.chat("demo", "/v1/chat/completions") == 200  # the old paths stay
        assert w.chat("old") == 400 and w.chat("gated") == 400
        status, models = w.call("GET", "/v1/models")
        assert status == 200 and sorted(m["id"] for m in models["data"]) == ["demo", "fresh"]

    # a worker started after the reload (replacing a dead one) starts at the new generation
    victim = workers[0].pid
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(served.workers()) == 2 and victim not in served.workers(), what="a replacement worker")
    replacement = pinned(served.port)
    assert victim not in {w.pid for w in replacement}
    for w in replacement:
        assert w.readiness()["config_generation"] == 2
        assert w.chat("fresh", "/v2/chat/completions") == 200 and w.chat("old") == 400

    assert terminate(served) == 0
    assert not pid_file.exists() and not pid_file.with_suffix(".state").exists()
    log = served.stderr()
    assert log.count(f"reloaded {served.config_path} as config generation 2") == 2  # one per worker
    assert "Traceback" not in log and "reload failed" not in log


BROKEN = [
    ("invalid YAML", "model_list: [\n  - {model_name: x\n", "not valid YAML"),
    ("a model without litellm_params.model",
     "model_list:\n  - model_name: x\n    litellm_params: {api_key: sk-x}\n", "model_list[0].litellm_params.model"),
    ("a non-numeric rpm", "model_list:\n  - model_name: x\n    litellm_params: {model: mock/x, rpm: lots}\n",
     "model_list[0].litellm_params.rpm"),
    ("an unknown route handler",
     "routes:\n  - {path: /x, methods: [GET], handler: no_such_handler, auth: none}\nmodel_list: []\n",
     "no_such_handler"),
]


def test_a_broken_file_is_refused_and_the_old_config_keeps_serving(serve, pinned, tmp_path):
    pid_file = tmp_path / "gw.pid"
    served = serve(config_text({"demo": "mock/demo"}), 2, "--pid-file", str(pid_file))
    workers = pinned(served.port)
    loop = RequestLoop(served.port, "demo")
    try:
        for what, text, reason in BROKEN:
            served.config_path.write_text(text)
            result = run_reload(pid_file)
            assert result.returncode != 0, what
            assert "reload refused" in result.stderr and reason in result.stderr, (what, result.stderr)
            assert str(served.config_path) in result.stderr, what
            for w in workers:
                ready = w.readiness()
                assert ready["config_generation"] == 1 and ready["models"] == 1, what
                assert w.chat("demo") == 200, what
    finally:
        results = loop.stop()
    assert results and all(r == 200 for r in results), [r for r in results if r != 200]

    # refused files use up no generation number: the next good one is 2
    served.config_path.write_text(config_text({"demo": "mock/demo", "fresh": "mock/fresh"}))
    result = run_reload(pid_file)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("config generation 2")
    wait_for(lambda: all_at(workers, 2), timeout=10, what="generation 2 on every worker")
    assert all(w.chat("fresh") == 200 for w in workers)
    assert terminate(served) == 0


def test_reload_without_a_running_gateway_says_so(tmp_path):
    result = run_reload(tmp_path / "nothing.pid")
    assert result.returncode != 0
    assert "no running gateway" in result.stderr and "nothing.pid" in result.stderr


def test_reload_never_signals_a_stranger_behind_a_stale_pid_file(tmp_path):
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        pid_file = tmp_path / "stale.pid"
        pid_file.write_text(f"{stranger.pid}\n")
        result = run_reload(pid_file)
        assert result.returncode != 0
        assert "not a running proxyctl serve" in result.stderr
        assert stranger.poll() is None  # still alive: no SIGHUP was sent
    finally:
        stranger.kill()
        stranger.wait()


def test_reload_with_database_storage_syncs_the_new_file_and_keeps_api_models(serve, pinned, pg_dsn):
    def with_db(text: str) -> str:
        doc = yaml.safe_load(text)
        doc["general_settings"].update(store_model_in_db=True, database_url=pg_dsn, model_refresh_interval=2)
        return yaml.safe_dump(doc, sort_keys=False)

    def yaml_rows() -> set[str]:
        conn = psycopg2.connect(pg_dsn)
        try:
            cur = conn.cursor()
            cur.execute("SELECT model_name FROM proxy_models WHERE source = 'yaml'")
            return {r[0] for r in cur.fetchall()}
        finally:
            conn.close()

    served = serve(with_db(config_text({"demo": "mock/demo", "old": "mock/old"})), 2)
    workers = pinned(served.port)
    status, body = workers[0].call("POST", "/model/new", {"model_name": "api-model",
                                                         "litellm_params": {"model": "mock/api-model"}})
    assert status == 200, body
    for w in workers:
        wait_for(lambda: w.chat("api-model") == 200, timeout=10, what="the API model on every worker")
    assert yaml_rows() == {"demo", "old"}

    served.config_path.write_text(with_db(config_text({"demo": "mock/demo", "fresh": "mock/fresh"})))
    result = run_reload(served.config_path.parent / "var" / f"proxyctl-{served.port}.pid")  # the default
    assert result.returncode == 0, result.stderr
    wait_for(lambda: all_at(workers, 2), timeout=10, what="generation 2 on every worker")
    wait_for(lambda: yaml_rows() == {"demo", "fresh"}, timeout=10, what="the new file synced into the database")
    for w in workers:
        assert w.chat("fresh") == 200 and w.chat("old") == 400
        assert w.chat("api-model") == 200  # a model added through the API is not the file's to remove
        assert w.readiness()["db"] == "connected"
    assert terminate(served) == 0
