"""What every fake provider shares: listening on a (free) loopback port, and the standalone
command line (`python -m contrib.fake_providers.<name> --port N ...`, which prints the port)."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass

import orjson
import tornado.httpserver
import tornado.netutil
import tornado.web
from tornado.iostream import StreamClosedError


@dataclass
class RawReply:
    """A knob of every fake: the next answers are exactly these bytes (after the auth check), for
    tests of what a misbehaving or hostile provider can send: a JSON 200 to a streamed request,
    an event that is not JSON, an endless line, an error event quoting the key."""

    status: int = 200
    content_type: str | None = "text/event-stream"  # None: no Content-Type header at all
    frames: tuple[bytes, ...] = ()  # written and flushed one by one
    hold_open: float = 0.0          # then keep the connection open this long (until the client leaves)


@dataclass
class Received:
    """One request a fake got."""

    method: str
    path: str
    query: str
    headers: dict[str, str]  # names lower-cased
    body: dict | None  # parsed JSON object, or None


class FakeHandler(tornado.web.RequestHandler):
    """Base of every fake's handlers: knob-driven pauses that end early when the client goes
    away, and ``state.stream_aborted`` set when a client leaves a stream unfinished."""

    def initialize(self, state) -> None:
        self.state = state
        self.streaming = False
        self.wake: asyncio.Future | None = None

    def record(self, body: dict | None) -> None:
        if self.state.record:
            req = self.request
            self.state.received.append(Received(req.method, req.path, req.query,
                                                {k.lower(): v for k, v in req.headers.items()}, body))

    def read_json(self) -> tuple[object, bool]:
        """(decoded body or None, whether it failed to decode); records the request."""
        body, bad_json = None, False
        if self.request.body:
            try:
                body = orjson.loads(self.request.body)
            except orjson.JSONDecodeError:
                bad_json = True
        self.record(body if isinstance(body, dict) else None)
        return body, bad_json

    async def pause(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self.wake = loop.create_future()
        timer = loop.call_later(seconds, lambda: self.wake.done() or self.wake.set_result(None))
        try:
            await self.wake
        finally:
            timer.cancel()

    async def send_frame(self, frame: bytes, after_delay: bool = True) -> bool:
        """Write one stream frame, after ``state.chunk_delay`` unless told otherwise, and flush
        it. False once the client has gone: the caller stops streaming."""
        if after_delay and self.state.chunk_delay:
            await self.pause(self.state.chunk_delay)
        if not self.streaming:
            return False
        self.write(frame)
        try:
            await self.flush()
        except StreamClosedError:
            self.on_connection_close()
            return False
        return True

    async def send_raw(self, raw: RawReply) -> None:
        """Answer with ``raw``; a client that leaves before the end sets ``state.stream_aborted``."""
        self.set_status(raw.status)
        if raw.content_type is None:
            self.clear_header("Content-Type")
        else:
            self.set_header("content-type", raw.content_type)
        self.streaming = True
        for frame in raw.frames:
            if not await self.send_frame(frame, after_delay=False):
                return
        if raw.hold_open:
            await self.pause(raw.hold_open)
        if self.streaming:
            self.end_stream()

    def cut_stream(self) -> None:
        """Drop the connection mid-stream: no terminating chunk, no end event."""
        self.streaming = False
        self.detach().close()

    def end_stream(self) -> None:
        """The stream is complete: count it and finish the response."""
        self.streaming = False
        self.state.streams_finished += 1
        self.finish()

    def on_connection_close(self) -> None:
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)
        if self.streaming:
            self.state.stream_aborted = True
            self.streaming = False


def listen(app: tornado.web.Application, port: int = 0, host: str = "127.0.0.1", ssl_options=None
           ) -> tuple[tornado.httpserver.HTTPServer, int]:
    """Serve ``app`` on ``host:port`` (0 = a free port); returns (server, actual port).
    ``ssl_options``: an ``ssl.SSLContext`` to serve HTTPS with (a provider behind TLS)."""
    sockets = tornado.netutil.bind_sockets(port, host)
    server = tornado.httpserver.HTTPServer(app, ssl_options=ssl_options)
    server.add_sockets(sockets)
    return server, sockets[0].getsockname()[1]


def standalone_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency", type=float, default=0.0, help="seconds before the reply / first stream event")
    p.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between stream events")
    return p


def run_standalone(make_app, args: argparse.Namespace) -> None:
    """Serve until interrupted; prints the port first (the benchmark and tests read it)."""

    async def serve() -> None:
        _, port = listen(make_app(), args.port, args.host)
        print(port, flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
