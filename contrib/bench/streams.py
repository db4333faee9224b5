"""A small asyncio SSE client: time to first ``data:`` event, and whether every chunk of the
benchmark stream came through, in order, without a stall.

The HTTP/1.1 client is written out (status line, headers, chunked or plain body) so that the
only work between the socket and the timestamp is a few ``bytes`` operations, the same for
every target.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

from upstreams import expected_piece

CONNECT_PARALLELISM = 50  # connections opened at once before a burst (stays under accept backlogs)


@dataclass(frozen=True)
class StreamTarget:
    """Where to send the streaming request, and with which key and model."""

    port: int
    path: str
    key: str
    model: str

    def request(self, keep_alive: bool) -> bytes:
        body = json.dumps({"model": self.model, "stream": True,
                           "messages": [{"role": "user", "content": "Count to twenty."}]}).encode()
        head = (f"POST {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Authorization: Bearer {self.key}\r\nContent-Type: application/json\r\n"
                f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n"
                f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
        return head.encode() + body


@dataclass
class StreamResult:
    """One stream. Times are seconds after the request was written."""

    status: int = 0
    first_event_s: float | None = None
    event_times: list[float] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    done: bool = False
    error: str | None = None

    @property
    def max_gap_s(self) -> float:
        times = self.event_times
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)

    def complete(self, chunks: int) -> bool:
        """Every content chunk, in order, then ``[DONE]``."""
        return (self.status == 200 and self.done and self.error is None
                and self.pieces == [expected_piece(i) for i in range(chunks)])


def content_of(data: bytes) -> str | None:
    """The delta content of one chat.completion.chunk event (None when it has none)."""
    try:
        choices = json.loads(data).get("choices") or []
    except ValueError:
        return None
    delta = (choices[0].get("delta") or {}) if choices else {}
    return delta.get("content") or None


class EventSplitter:
    """Bytes in, SSE ``data:`` payloads out (events end with a blank line)."""

    def __init__(self):
        self.buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer += data.replace(b"\r\n", b"\n")
        *events, self.buffer = self.buffer.split(b"\n\n")
        return [line[5:].strip() for event in events for line in event.split(b"\n")
                if line.startswith(b"data:")]


def record_events(result: StreamResult, payloads: list[bytes], started: float) -> None:
    now = time.perf_counter() - started
    for payload in payloads:
        if result.first_event_s is None:
            result.first_event_s = now
        result.event_times.append(now)
        if payload == b"[DONE]":
            result.done = True
        elif (piece := content_of(payload)) is not None:
            result.pieces.append(piece)


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    parts = status_line.split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def body_pieces(reader: asyncio.StreamReader, headers: dict[str, str]):
    """The response body as it arrives, de-chunked."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while (size := int((await reader.readline()).split(b";")[0].strip() or b"0", 16)) > 0:
            yield await reader.readexactly(size)
            await reader.readexactly(2)
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):  # trailers, then the end
            pass
        return
    remaining = int(headers.get("content-length", "-1"))
    while remaining != 0 and (data := await reader.read(65536 if remaining < 0 else min(remaining, 65536))):
        remaining -= len(data) if remaining > 0 else 0
        yield data


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)


def reusable(headers: dict[str, str]) -> bool:
    """The server keeps the connection open after this (framed) response."""
    framed = "chunked" in headers.get("transfer-encoding", "").lower() or "content-length" in headers
    return framed and headers.get("connection", "").lower() != "close"


async def exchange(target: StreamTarget, conn, timeout_s: float, keep_alive: bool) -> tuple[StreamResult, bool]:
    """Send one streaming request on an open connection and read the whole answer.
    Returns the result and whether the connection can carry another request."""
    reader, writer = conn
    result = StreamResult()
    headers: dict[str, str] = {}
    started = time.perf_counter()

    async def read_all() -> None:
        nonlocal headers
        result.status, headers = await read_head(reader)
        splitter = EventSplitter()
        async for data in body_pieces(reader, headers):
            record_events(result, splitter.feed(data), started)

    try:
        writer.write(target.request(keep_alive))
        await asyncio.wait_for(read_all(), timeout_s)
    except (OSError, asyncio.IncompleteReadError, ValueError, asyncio.TimeoutError) as exc:
        result.error = type(exc).__name__
    return result, keep_alive and result.error is None and reusable(headers)


async def run_stream(target: StreamTarget, conn, timeout_s: float) -> StreamResult:
    """One stream on its own connection, closed afterwards."""
    try:
        result, _ = await exchange(target, conn, timeout_s, keep_alive=False)
    finally:
        conn[1].close()
    return result


async def burst(target: StreamTarget, streams: int, timeout_s: float) -> list[StreamResult]:
    """Open ``streams`` connections (a few at a time), then send every request at once."""
    gate = asyncio.Semaphore(CONNECT_PARALLELISM)

    async def opened():
        async with gate:
            return await connect(target.port)

    conns = await asyncio.gather(*(opened() for _ in range(streams)))
    return await asyncio.gather(*(run_stream(target, conn, timeout_s) for conn in conns))


@dataclass(frozen=True)
class BurstSummary:
    streams: int
    complete: int
    errors: int
    stalled: int  # incomplete, or a gap between events longer than the stall threshold
    ttft_p50_ms: float
    ttft_p99_ms: float
    max_gap_ms: float
    wall_s: float


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def summarise_burst(results: list[StreamResult], chunks: int, stall_s: float, wall_s: float) -> BurstSummary:
    ttfts = [r.first_event_s * 1000 for r in results if r.first_event_s is not None]
    complete = [r.complete(chunks) for r in results]
    return BurstSummary(
        streams=len(results), complete=sum(complete),
        errors=sum(1 for r in results if r.error or r.status != 200),
        stalled=sum(1 for r, ok in zip(results, complete) if not ok or r.max_gap_s > stall_s),
        ttft_p50_ms=percentile(ttfts, 50), ttft_p99_ms=percentile(ttfts, 99),
        max_gap_ms=max((r.max_gap_s for r in results), default=0.0) * 1000, wall_s=wall_s)


async def measure_burst(target: StreamTarget, streams: int, chunks: int, stall_s: float,
                        timeout_s: float) -> BurstSummary:
    started = time.perf_counter()
    results = await burst(target, streams, timeout_s)
    return summarise_burst(results, chunks, stall_s, time.perf_counter() - started)


async def measure_ttft(targets: dict[str, StreamTarget], samples: int, chunks: int,
                       timeout_s: float) -> dict[str, dict]:
    """One stream at a time on a kept-alive connection per target (as SDK clients do), the
    targets interleaved so they share the machine's noise; a first, untimed stream warms up."""
    results: dict[str, list[StreamResult]] = {name: [] for name in targets}
    conns: dict[str, tuple] = {}
    try:
        for sample in range(samples + 1):
            for name, target in targets.items():
                conn = conns.pop(name, None) or await connect(target.port)
                result, keep = await exchange(target, conn, timeout_s, keep_alive=True)
                if keep:
                    conns[name] = conn
                else:
                    conn[1].close()
                if sample:
                    results[name].append(result)
    finally:
        for _, writer in conns.values():
            writer.close()
    return {name: ttft_summary(rs, chunks) for name, rs in results.items()}


def ttft_summary(results: list[StreamResult], chunks: int) -> dict:
    ttfts = [r.first_event_s * 1000 for r in results if r.first_event_s is not None]
    return {"samples": len(results), "complete": sum(r.complete(chunks) for r in results),
            "ttft_p50_ms": statistics.median(ttfts) if ttfts else float("nan"),
            "ttft_p99_ms": percentile(ttfts, 99), "ttft_min_ms": min(ttfts, default=float("nan"))}
