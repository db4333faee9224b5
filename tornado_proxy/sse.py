"""Server-Sent Events: an incremental parser (bytes in, events out) and the formatter.

Follows the WHATWG event-stream rules that matter for LLM APIs: lines end in LF, CRLF or CR;
a blank line dispatches the event; ``:`` lines are comments (OpenRouter's keep-alives);
several ``data:`` lines join with LF; one optional space after the colon is dropped.

The parser is incremental: each byte is searched for a line end once, however the upstream
splits its lines into chunks, and an event may not grow past ``MAX_EVENT_BYTES`` (a provider
that sends one endless line would otherwise hold a worker's CPU and memory).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LINE_END = re.compile(rb"\r\n|\r|\n")
DONE = b"[DONE]"
MAX_EVENT_BYTES = 8 * 1024 * 1024  # one event: its unfinished line plus the data lines so far


@dataclass(frozen=True)
class SseEvent:
    data: bytes
    event: str | None = None


class EventTooLargeError(Exception):
    """The upstream sent an event (or line) longer than the parser's bound."""

    def __init__(self, limit: int):
        super().__init__(f"a stream event is larger than {limit // (1024 * 1024)} MB")
        self.limit = limit


class SseParser:
    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self._partial = bytearray()  # the unfinished last line (no line end seen in it yet)
        self._skip_lf = False        # the last chunk ended in CR: an LF opening the next ends nothing
        self._data: list[bytes] = []
        self._data_size = 0
        self._event: str | None = None
        self.comments = 0

    def feed(self, chunk: bytes) -> list[SseEvent]:
        events: list[SseEvent] = []
        start = 0
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                start = 1
        if self._partial:
            match = LINE_END.search(chunk, start)
            if match is None:
                self._partial += chunk[start:] if start else chunk
                self._check_size()
                return events
            self._partial += chunk[start:match.start()]
            line = bytes(self._partial)
            self._partial.clear()
            self._line(line, events)
            start = self._after(match, chunk)
        for match in LINE_END.finditer(chunk, start):
            self._line(chunk[start:match.start()], events)
            start = self._after(match, chunk)
        if start < len(chunk):
            self._partial += chunk[start:]
            self._check_size()
        return events

    def _after(self, match: re.Match, chunk: bytes) -> int:
        """Where the next line starts; a CR that ends the chunk may be the first half of CRLF."""
        end = match.end()
        if end == len(chunk) and match.group() == b"\r":
            self._skip_lf = True
        return end

    def _check_size(self) -> None:
        if len(self._partial) + self._data_size > self.max_event_bytes:
            self._partial.clear()
            self._data, self._data_size = [], 0
            raise EventTooLargeError(self.max_event_bytes)

    def close(self) -> list[SseEvent]:
        """End of stream: an unterminated final event is dispatched, as browsers do not."""
        events: list[SseEvent] = []
        if self._partial:
            line = bytes(self._partial)
            self._partial.clear()
            self._line(line, events)
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[SseEvent]) -> None:
        if not line:
            if self._data:
                events.append(SseEvent(b"\n".join(self._data), self._event))
            self._data = []
            self._data_size = 0
            self._event = None
            return
        if line[:1] == b":":
            self.comments += 1
            return
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
            self._data_size += len(value) + 1
            if self._data_size > self.max_event_bytes:
                self._check_size()
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")


def format_event(data: bytes, event: str | None = None) -> bytes:
    head = b"event: " + event.encode() + b"\n" if event else b""
    if b"\n" in data:
        return head + b"".join(b"data: " + line + b"\n" for line in data.split(b"\n")) + b"\n"
    return head + b"data: " + data + b"\n\n"
