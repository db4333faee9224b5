"""The embedded PostgreSQL (embedded.py): the class on its own, and `proxyctl serve --embedded-db` /
`database_url: embedded` as a subprocess from an empty folder: initdb, models added through the
API, SIGTERM stops the gateway and its PostgreSQL, and the data survives a restart.

Every wait is a bounded poll; nothing asserts on how long anything took.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import psycopg2
import pytest

from tornado_proxy.embedded import EmbeddedError, EmbeddedPostgres, find_binary

from .test_e2e_reload import pin_workers, terminate
from .test_e2e_serve import MASTER_KEY, PROXYCTL, Served, child_env, request, wait_for

HELLO = [{"role": "user", "content": "hello embedded"}]


def postmaster_pid(data_dir) -> int | None:
    try:
        return int((data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def pg_ctl_status(cluster: EmbeddedPostgres) -> int:
    """pg_ctl's own view: 0 running, 3 not running."""
    return cluster._run(find_binary("pg_ctl"), "-D", str(cluster.data_dir), "status", check=False).returncode


def force_stop(data_dir) -> None:
    """Teardown safety net: whatever a failed test left running in ``data_dir`` is stopped."""
    cluster = EmbeddedPostgres(data_dir)
    if cluster.initialized() and cluster.running():
        cluster._run(find_binary("pg_ctl"), "-D", str(cluster.data_dir), "-m", "immediate", "-w", "stop",
                     check=False)


def query(dsn: str, sql: str, args=()):
    conn = psycopg2.connect(dsn, connect_timeout=5)
    conn.autocommit = True
    try:
        cur = conn.cursor()
        cur.execute(sql, args)
        return cur.fetchall() if cur.description else None
    finally:
        conn.close()


@contextmanager
def private_dir():
    """A folder for a cluster outside pytest's base temp: pytest resets ``/tmp/pytest-of-<user>`` to
    mode 0700 whenever a session starts (another one may start while this one runs), which locks
    the unprivileged PostgreSQL user out of anything below it. Also keeps socket paths short."""
    path = Path(tempfile.mkdtemp(prefix="tp-pg-", dir="/tmp"))
    try:
        yield path
    finally:
        for pid_file in path.glob("**/postmaster.pid"):
            force_stop(pid_file.parent)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cluster_dir():
    with private_dir() as path:
        yield path / "pg"


# --- the class ---------------------------------------------------------------------------------------

def test_start_is_idempotent_stop_and_data_survives(cluster_dir):
    cluster = EmbeddedPostgres(cluster_dir)
    assert not cluster.initialized() and not cluster.running()
    dsn = cluster.start()
    assert cluster.initialized() and cluster.running() and pg_ctl_status(cluster) == 0
    assert dsn == cluster.dsn and f"host={cluster_dir.resolve()}" in dsn
    assert (cluster_dir / ".s.PGSQL.5432").exists()  # the socket lives in the data folder
    if os.geteuid() == 0:  # PostgreSQL refuses root: the cluster belongs to an unprivileged user
        assert cluster_dir.stat().st_uid != 0
    pid = postmaster_pid(cluster_dir)
    assert pid and process_alive(pid)

    query(dsn, "CREATE TABLE kept (v text)")
    query(dsn, "INSERT INTO kept VALUES ('survives')")

    assert cluster.start() == dsn  # a second start is a no-op: same server, same process
    assert postmaster_pid(cluster_dir) == pid

    other = EmbeddedPostgres(cluster_dir)  # another owner object finds it running and leaves it be
    assert other.start() == dsn and not other.started_here
    other.stop()
    assert cluster.running() and query(dsn, "SELECT 1") == [(1,)]

    cluster.stop()
    assert not cluster.running() and pg_ctl_status(cluster) == 3
    assert not (cluster_dir / "postmaster.pid").exists()
    wait_for(lambda: not process_alive(pid), timeout=10, what="the postmaster to exit")
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(dsn, connect_timeout=2)
    cluster.stop()  # stopping a stopped cluster is harmless

    assert cluster.start() == dsn  # no second initdb: the data is still there
    assert query(dsn, "SELECT v FROM kept") == [("survives",)]
    cluster.stop()
    assert not cluster.running()


def test_unusable_data_dir_is_an_embedded_error(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(EmbeddedError) as info:
        EmbeddedPostgres(blocker / "pg").start()
    assert str(blocker / "pg") in str(info.value)


def test_a_server_that_will_not_start_says_why(cluster_dir):
    # a Unix socket path is limited to 107 bytes: pg_ctl alone only says "Examine the log output"
    data_dir = cluster_dir / ("d" * 100)
    with pytest.raises(EmbeddedError) as info:
        EmbeddedPostgres(data_dir).start()
    assert "is too long" in str(info.value) and str(data_dir / "server.log") in str(info.value)


# --- proxyctl serve with the embedded database ---------------------------------------------------------

EMBEDDED_CONFIG = """
model_list:
  - model_name: demo
    litellm_params: {model: mock/demo}
general_settings:
  graceful_shutdown_timeout: 5
  model_refresh_interval: 2
"""


def readiness(port: int) -> dict:
    status, _, body = request(port, "GET", "/health/readiness", key=None)
    assert status == 200
    return json.loads(body)


def model_info(port: int) -> dict:
    status, _, body = request(port, "GET", "/model/info")
    assert status == 200, body
    return {m["model_name"]: m for m in json.loads(body)["data"]}


def chat(port: int, model: str) -> tuple[int, dict]:
    status, _, body = request(port, "POST", "/v1/chat/completions", {"model": model, "messages": HELLO})
    return status, json.loads(body)


@pytest.fixture
def folder():
    with private_dir() as path:
        yield path


@pytest.fixture
def serve_in(folder):
    """``serve_in(config, workers, *args)``: `proxyctl serve` run from ``folder`` (stopped before
    the folder goes)."""
    started: list[Served] = []

    def start(config: str, workers: int, *args: str) -> Served:
        served = Served(folder, config, workers, *args, LITELLM_MASTER_KEY=MASTER_KEY)
        started.append(served)
        served.wait_alive()
        return served

    yield start
    for served in started:
        served.close()


def test_serve_embedded_db_from_an_empty_folder_and_restart(folder, serve_in):
    data_dir = folder / "var" / "pgdata"  # the default folder, relative to where serve runs
    assert not data_dir.exists()
    served = serve_in(EMBEDDED_CONFIG, 2, "--embedded-db")
    assert (data_dir / "PG_VERSION").exists()  # initdb ran
    pid = postmaster_pid(data_dir)
    assert pid and process_alive(pid)
    wait_for(lambda: readiness(served.port)["db"] == "connected", what="the database to be connected")

    status, _, body = request(served.port, "POST", "/model/new", {
        "model_name": "added-at-runtime", "litellm_params": {"model": "mock/added", "api_key": "sk-stored-1"}})
    assert status == 200, body
    added_id = json.loads(body)["model_id"]
    # every worker serves it (the one that did not take the write hears NOTIFY)
    for worker in pin_workers(served.port, 2):
        wait_for(lambda: worker.chat("added-at-runtime") == 200, timeout=10, what="the new model on a worker")
        worker.close()
    assert terminate(served) == 0
    assert not (data_dir / "postmaster.pid").exists()  # PostgreSQL was stopped too
    wait_for(lambda: not process_alive(pid), timeout=10, what="the postmaster to exit")
    assert pg_ctl_status(EmbeddedPostgres(data_dir)) == 3

    # second life, this time through the config file instead of the flag
    served.close()
    again = serve_in(EMBEDDED_CONFIG + "  database_url: embedded\n  store_model_in_db: true\n", 1)
    wait_for(lambda: readiness(again.port)["db"] == "connected", what="the database to be connected")
    info = model_info(again.port)
    assert info["added-at-runtime"]["model_info"]["id"] == added_id
    assert info["added-at-runtime"]["model_info"]["db_model"] is True
    assert info["added-at-runtime"]["litellm_params"].get("api_key") != "sk-stored-1"
    status, reply = chat(again.port, "added-at-runtime")
    assert status == 200 and reply["choices"][0]["message"]["content"] == "hello embedded"
    assert terminate(again) == 0
    assert not (data_dir / "postmaster.pid").exists()
    assert "sk-stored-1" not in again.stderr()
    again.close()


def test_serve_with_an_unusable_embedded_dir_fails_with_a_message(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    config = tmp_path / "config.yaml"
    config.write_text(EMBEDDED_CONFIG + f"  embedded_db_dir: {blocker / 'pgdata'}\n")
    proc = subprocess.run([sys.executable, str(PROXYCTL), "serve", "--embedded-db", "--config", str(config),
                           "--host", "127.0.0.1", "--port", "0", "--num-workers", "1"],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path,
                          env=child_env(LITELLM_MASTER_KEY=MASTER_KEY))
    assert proc.returncode != 0
    assert str(blocker / "pgdata") in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sigterm_during_start_up_exits_cleanly(tmp_path):
    """SIGTERM before the supervisor is up (here: while initdb runs) exits 0 through the
    clean-up path, not by the default action (-15)."""
    import signal as signal_module
    import time

    from .conftest import MASTER_KEY

    with private_dir() as folder:
        data = folder / "pgdata"
        config = tmp_path / "c.yaml"
        config.write_text(f"general_settings:\n  master_key: {MASTER_KEY}\n  database_url: embedded\n"
                          f"  store_model_in_db: true\n  embedded_db_dir: {data}\nmodel_list: []\n")
        proc = subprocess.Popen([sys.executable, "bin/proxyctl", "serve", "--config", str(config), "--port", "0",
                                 "--num-workers", "1", "--pid-file", str(tmp_path / "p.pid")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not data.exists() and time.monotonic() < deadline:
                time.sleep(0.02)  # initdb has begun
            proc.send_signal(signal_module.SIGTERM)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
