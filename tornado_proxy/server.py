"""Serving: bind, pre-fork N workers (replacing any that die), run one gateway per worker
(HTTP, or HTTPS with the context ``cli`` built), and stop gracefully on SIGTERM/SIGINT: readiness
answers 503, the port closes (what the kernel had already accepted is still served), idle
keep-alive connections close, in-flight requests and streams finish within the grace period
(what is left then is cut), the spend queue is flushed, and the process exits 0.

Tornado's ``fork_processes`` restarts children but cannot stop them gracefully, so the small
supervisor below owns the children instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tornado.netutil import bind_sockets

from . import metrics
from .app import Gateway, keep_restart_only, log_startup_warnings, make_application, validate
from .catalog import make_database, storage_problem
from .config import Config, ConfigError, Secret, Settings, load
from .errors import DatabaseUnavailable
from .embedded import EmbeddedPostgres
from .health import HealthMonitor, MemoryReports, ReportFile, reports_path
from .httpserver import HEADER_READ_CAP, GatewayHTTPServer
from .ratelimit import LimitTable
from .responsedir import responses_path

log = logging.getLogger(__name__)

RESTART_WINDOW = 10.0  # seconds; too many deaths in this window means a crash loop


async def run_worker(config: Config, sockets: list[socket.socket], stop: asyncio.Event | None = None,
                     ready: asyncio.Event | None = None, announce: bool = True,
                     handle_signals: bool = True, generation: int = 1,
                     state_path: Path | None = None, index: int = 0,
                     limits_table: LimitTable | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
    """One worker: build the gateway, serve on ``sockets`` until ``stop`` (or a signal), drain.

    SIGHUP re-reads the config the supervisor has just validated (see ``StateFile``). Worker 0
    runs the background health checks for every worker of the instance. ``limits_table``: the
    rate-limit counts shared by all workers (made by ``serve`` before forking); ``ssl_context``:
    serve HTTPS with it."""
    stop = stop or asyncio.Event()
    gw = Gateway(config, generation=generation, health=health_monitor(state_path, index),
                 limits=limits_table, worker=index,
                 responses_dir=responses_path(state_path) if state_path is not None else None)
    if handle_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if state_path is not None:
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload_worker(gw, state_path)))
            await reload_worker(gw, state_path)  # a reload that happened while this worker was forking
    if announce:
        log_startup_warnings(config, gw.registry)
    await gw.start()
    server = make_http_server(make_application(gw), config.settings, ssl_context)
    server.add_sockets(sockets)
    if ready is not None:
        ready.set()
    await stop.wait()
    await shut_down(gw, server)


async def shut_down(gw: Gateway, server: GatewayHTTPServer) -> None:
    """Drain: readiness says 503, the port closes, idle connections close; requests and streams
    in flight get ``graceful_shutdown_timeout`` seconds; then what is left is cut, and the
    gateway stops (its spend queue flushed)."""
    gw.draining = True
    server.stop()
    grace = gw.settings.graceful_shutdown_timeout
    await drain(gw, server, grace)
    if server.open_connections:
        log.warning("%d connection(s) still open after the %gs grace period: closing them",
                    server.open_connections, grace)
    try:
        await asyncio.wait_for(server.close_all_connections(), 5)
    except asyncio.TimeoutError:
        log.warning("connections still open after the grace period; closing the worker anyway")
    await gw.stop()


def health_monitor(state_path: Path | None, index: int) -> HealthMonitor:
    """Under the supervisor, reports go through a file beside its state file and only worker 0
    checks; a worker on its own keeps them in memory."""
    reports = ReportFile(reports_path(state_path)) if state_path is not None else MemoryReports()
    return HealthMonitor(reports, runs_checks=index == 0)


async def reload_worker(gw: Gateway, state_path: Path) -> None:
    state = StateFile(state_path).read()
    if state.get("status") != "ok" or state.get("generation", 0) <= gw.catalog.generation:
        return
    try:
        config = load(state["config"])
        await gw.reload(config, state["generation"])
    except ConfigError as exc:  # the file changed again since the supervisor checked it
        log.error("reload failed in this worker, keeping generation %d: %s", gw.catalog.generation, exc)


def make_http_server(app, settings: Settings, ssl_context: ssl.SSLContext | None = None) -> GatewayHTTPServer:
    """Tornado's limits are the configured ones: no body over ``max_request_size_mb`` is read
    (each route narrows it further in ``BaseHandler.prepare``), no head over 1 MB is buffered,
    and idle keep-alive connections close after ``keepalive_timeout``. X-Forwarded-For is not
    Tornado's business here: handlers believe it only from ``trusted_proxies``."""
    body_limit = int(settings.max_request_size_mb * 1024 * 1024)
    return GatewayHTTPServer(app, ssl_options=ssl_context, xheaders=False, max_body_size=body_limit,
                             max_header_size=HEADER_READ_CAP,
                             max_buffer_size=max(body_limit, HEADER_READ_CAP) + 65536,
                             idle_connection_timeout=settings.keepalive_timeout, body_timeout=300)


async def drain(gw: Gateway, server: GatewayHTTPServer, grace: float) -> None:
    """Wait until no request is in flight and every connection has closed (each closes after
    its response), or ``grace`` seconds."""
    deadline = time.monotonic() + grace
    while (gw.in_flight > 0 or server.open_connections) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


@dataclass(frozen=True)
class ServeOptions:
    host: str = "0.0.0.0"
    port: int = 4000
    workers: int = 8
    pid_file: Path | None = None
    require_db: bool = False
    ssl_context: ssl.SSLContext | None = None  # serve HTTPS


def default_pid_file(port: int) -> Path:
    return Path("var") / f"proxyctl-{port}.pid"


class StateFile:
    """What the supervisor tells workers and ``proxyctl reload``: the accepted generation and
    the outcome of the last reload request. Written atomically (temp file + rename)."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def write(self, **state) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.path)


def serve(config: Config, options: ServeOptions) -> int:
    """Start the private database if asked, bind, fork and supervise. Returns the exit status."""
    for sig in (signal.SIGTERM, signal.SIGINT):  # until the supervisor takes over: exit cleanly,
        signal.signal(sig, stop_starting)        # through the finally blocks below
    embedded = None
    try:
        if is_embedded(config):
            embedded = EmbeddedPostgres(config.settings.embedded_db_dir)
            config = with_database_url(config, embedded.start())
            log.info("embedded PostgreSQL running in %s", embedded.data_dir)
        if options.require_db and not database_reachable(config):
            return 1
        sockets = bind(options)
        log.info("listening on %s:%d (%s) with %d worker(s)", options.host or "*", options.port,
                 "HTTPS" if options.ssl_context else "HTTP", options.workers)
        multiproc_dir = tempfile.mkdtemp(prefix="tornado-proxy-metrics-")
        metrics.enable_multiprocess(multiproc_dir)
        pid_file = options.pid_file or default_pid_file(options.port)
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{os.getpid()}\n")
        state_path = pid_file.with_suffix(".state")
        health_reports = ReportFile(reports_path(state_path))
        health_reports.remove()  # a previous run's results are not this one's
        limits = LimitTable(workers=options.workers)  # before forking: every worker counts in it
        try:
            return Supervisor(config, sockets, options.workers, StateFile(state_path), limits,
                              options.ssl_context).run()
        finally:
            shutil.rmtree(multiproc_dir, ignore_errors=True)
            pid_file.unlink(missing_ok=True)
            state_path.unlink(missing_ok=True)
            health_reports.remove()
    finally:
        if embedded is not None:
            embedded.stop()


class BindError(Exception):
    """The listening port cannot be had; the message is the one line to print."""


def bind(options: ServeOptions) -> list[socket.socket]:
    try:
        return bind_sockets(options.port, options.host or None, reuse_port=False)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise BindError(f"port {options.port} is in use (another gateway?)") from None
        if exc.errno == errno.EACCES:
            raise BindError(f"port {options.port}: permission denied (ports below 1024 need privileges)") from None
        raise BindError(f"cannot listen on {options.host or '*'}:{options.port}: {exc.strerror}") from None


def stop_starting(signum, _frame) -> None:
    log.info("signal %d during start-up: stopping", signum)
    raise SystemExit(0)


def is_embedded(config: Config) -> bool:
    url = config.settings.database_url
    return url is not None and url.reveal() == "embedded"


def with_database_url(config: Config, dsn: str) -> Config:
    return dataclasses.replace(config, settings=dataclasses.replace(config.settings, database_url=Secret(dsn)))


def database_reachable(config: Config) -> bool:
    """For ``--require-db``: fail fast, once, in the parent, if the database is down."""
    problem = storage_problem(config)
    if problem or not config.settings.store_model_in_db:
        log.error("--require-db: %s", problem or "database storage is not enabled (store_model_in_db)")
        return False

    async def ping() -> None:
        db = make_database(config)
        try:
            await db.ping()
        finally:
            await db.close()

    try:
        asyncio.run(ping())
        return True
    except DatabaseUnavailable as exc:
        log.error("--require-db: the database is unavailable: %s", exc)
        return False


class Supervisor:
    def __init__(self, config: Config, sockets: list[socket.socket], workers: int, state: StateFile,
                 limits: LimitTable | None = None, ssl_context: ssl.SSLContext | None = None):
        self.config, self.sockets, self.workers, self.state = config, sockets, workers, state
        self.limits = limits
        self.ssl_context = ssl_context
        self.children: dict[int, int] = {}  # pid -> worker index
        self.stopping = False
        self.deaths: list[float] = []
        self.generation = 1
        self.seq = 0
        self.state.write(generation=1, seq=0, status="ok", message="started", config=config.path, pid=os.getpid())

    def spawn(self, index: int) -> None:
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the worker's own handler is in
                asyncio.run(run_worker(self.config, self.sockets, announce=index == 0,
                                       generation=self.generation, state_path=self.state.path, index=index,
                                       limits_table=self.limits, ssl_context=self.ssl_context))
                status = 0
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(status)
        self.children[pid] = index

    def signal_children(self, signum: int) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def forward(self, signum, _frame) -> None:
        self.stopping = True
        # The parent's copies of the listening sockets would keep the port open (connections
        # queue and hang) while the workers drain: close them so new connections are refused.
        for sock in self.sockets:
            sock.close()
        self.signal_children(signal.SIGTERM)

    def reload(self, _signum, _frame) -> None:
        """SIGHUP: validate the config file again; if good, bump the generation and tell workers."""
        self.seq += 1
        try:
            config = load(self.config.path)
            validate(config)
        except ConfigError as exc:
            log.error("reload refused, generation %d keeps serving: %s", self.generation, exc)
            self.state.write(generation=self.generation, seq=self.seq, status="refused", message=str(exc),
                             config=self.config.path, pid=os.getpid())
            return
        # workers started from now on get the new config, but the same restart-only settings
        # (pools, database, ...) as the running ones: the rule Gateway.reload applies
        config = keep_restart_only(config, self.config.settings)
        self.config, self.generation = config, self.generation + 1
        self.state.write(generation=self.generation, seq=self.seq, status="ok",
                         message=f"config generation {self.generation}", config=config.path, pid=os.getpid())
        self.signal_children(signal.SIGHUP)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.forward)
        signal.signal(signal.SIGINT, self.forward)
        signal.signal(signal.SIGHUP, self.reload)
        for index in range(self.workers):
            self.spawn(index)
        status = 0
        while self.children:
            try:
                pid, code = os.wait()
            except ChildProcessError:
                break
            index = self.children.pop(pid, None)
            metrics.mark_process_dead(pid)
            if index is not None and self.limits is not None:
                self.limits.release_worker(index)  # its running requests will never finish
            if index is None or self.stopping:
                continue
            log.warning("worker %d (pid %d) exited with status %d; starting a new one", index, pid, code)
            now = time.monotonic()
            self.deaths = [t for t in self.deaths if now - t < RESTART_WINDOW] + [now]
            if len(self.deaths) > 5 * self.workers:
                log.error("workers keep dying; stopping")
                self.forward(signal.SIGTERM, None)
                status = 1
                continue
            self.spawn(index)
        for sock in self.sockets:
            sock.close()
        return status
