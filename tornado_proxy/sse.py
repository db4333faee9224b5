"""Server-Sent Events: an incremental parser (bytes in, events out) and the formatter.

Follows the WHATWG event-stream rules that matter for LLM APIs: lines end in LF, CRLF or CR;
a blank line dispatches the event; ``:`` lines are comments (OpenRouter's keep-alives);
several ``data:`` lines join with LF; one optional space after the colon is dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LINE_END = re.compile(rb"\r\n|\r|\n")
DONE = b"[DONE]"


@dataclass(frozen=True)
class SseEvent:
    data: bytes
    event: str | None = None


class SseParser:
    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self._event: str | None = None
        self.comments = 0

    def feed(self, chunk: bytes) -> list[SseEvent]:
        buffer = self._buffer + chunk
        events: list[SseEvent] = []
        start = 0
        for match in LINE_END.finditer(buffer):
            if match.group() == b"\r" and match.end() == len(buffer):
                break  # a lone CR at the end may be the first half of CRLF
            self._line(buffer[start:match.start()], events)
            start = match.end()
        self._buffer = buffer[start:]
        return events

    def close(self) -> list[SseEvent]:
        """End of stream: an unterminated final event is dispatched, as browsers do not."""
        events: list[SseEvent] = []
        if self._buffer:
            self._line(self._buffer, events)
            self._buffer = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[SseEvent]) -> None:
        if not line:
            if self._data:
                events.append(SseEvent(b"\n".join(self._data), self._event))
            self._data = []
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
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")


def format_event(data: bytes, event: str | None = None) -> bytes:
    head = b"event: " + event.encode() + b"\n" if event else b""
    if b"\n" in data:
        return head + b"".join(b"data: " + line + b"\n" for line in data.split(b"\n")) + b"\n"
    return head + b"data: " + data + b"\n\n"
