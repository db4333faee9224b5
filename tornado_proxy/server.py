"""Serving: bind, pre-fork N workers (replacing any that die), run one gateway per worker,
and stop gracefully on SIGTERM/SIGINT: stop accepting, let in-flight requests and streams
finish within the grace period, then exit 0.

Tornado's ``fork_processes`` restarts children but cannot stop them gracefully, so the small
supervisor below owns the children instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import tempfile
import time

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from . import metrics
from .app import Gateway, log_startup_warnings, make_application
from .config import Config

log = logging.getLogger(__name__)

RESTART_WINDOW = 10.0  # seconds; too many deaths in this window means a crash loop


async def run_worker(config: Config, sockets: list[socket.socket], stop: asyncio.Event | None = None,
                     ready: asyncio.Event | None = None, announce: bool = True,
                     handle_signals: bool = True) -> None:
    """One worker: build the gateway, serve on ``sockets`` until ``stop`` (or a signal), drain."""
    stop = stop or asyncio.Event()
    if handle_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    gw = Gateway(config)
    if announce:
        log_startup_warnings(config, gw.registry)
    await gw.start()
    server = HTTPServer(make_application(gw), xheaders=True, max_body_size=max_body_size(config),
                        idle_connection_timeout=3600, body_timeout=300)
    server.add_sockets(sockets)
    if ready is not None:
        ready.set()
    await stop.wait()
    server.stop()
    await drain(gw, config.settings.graceful_shutdown_timeout)
    try:
        await asyncio.wait_for(server.close_all_connections(), 5)
    except asyncio.TimeoutError:
        log.warning("connections still open after the grace period; closing the worker anyway")
    await gw.stop()


def max_body_size(config: Config) -> int:
    """Tornado's hard cap sits well above the configured limit: handlers answer 413 themselves."""
    return int(config.settings.max_request_size_mb * 1024 * 1024 * 4) + 65536


async def drain(gw: Gateway, grace: float) -> None:
    deadline = time.monotonic() + grace
    while gw.in_flight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def serve(config: Config, host: str, port: int, workers: int) -> int:
    """Bind, fork and supervise. Returns the exit status."""
    sockets = bind_sockets(port, host or None, reuse_port=False)
    log.info("listening on %s:%d with %d worker(s)", host or "*", port, workers)
    multiproc_dir = tempfile.mkdtemp(prefix="tornado-proxy-metrics-")
    metrics.enable_multiprocess(multiproc_dir)
    try:
        if workers <= 1:
            asyncio.run(run_worker(config, sockets))
            return 0
        return Supervisor(config, sockets, workers).run()
    finally:
        shutil.rmtree(multiproc_dir, ignore_errors=True)


class Supervisor:
    def __init__(self, config: Config, sockets: list[socket.socket], workers: int):
        self.config, self.sockets, self.workers = config, sockets, workers
        self.children: dict[int, int] = {}  # pid -> worker index
        self.stopping = False
        self.deaths: list[float] = []

    def spawn(self, index: int) -> None:
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                asyncio.run(run_worker(self.config, self.sockets, announce=index == 0))
                status = 0
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(status)
        self.children[pid] = index

    def forward(self, signum, _frame) -> None:
        self.stopping = True
        # The parent's copies of the listening sockets would keep the port open (connections
        # queue and hang) while the workers drain: close them so new connections are refused.
        for sock in self.sockets:
            sock.close()
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.forward)
        signal.signal(signal.SIGINT, self.forward)
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
