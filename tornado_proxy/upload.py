"""A multipart/form-data upload (``/v1/audio/transcriptions`` and ``/translations``) read as it
arrives: parsed incrementally with ``multipart.PushMultipartParser`` (a sans-I/O parser: bytes
in, part heads / body chunks / part ends out), every part but ``model`` re-emitted into an
unlinked temporary file, so an upload is never held whole in memory. The text fields (not the
files) are also kept, bounded, for routing. Each attempt then sends its deployment's ``model``
part followed by the spooled parts (``UploadBody``, which libcurl reads from the file), so
retries and fallbacks resend the same bytes, whatever the order of the client's fields."""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass

import multipart

from .errors import InvalidRequestError

MAX_FIELD_BYTES = 64 * 1024   # one text field (not a file part): longer is refused
MAX_PARTS = 128
MAX_PART_HEADER = 8 * 1024
# RFC 2046: 1-70 characters of this set (the last one not a space)
BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


def boundary_of(content_type: str | None) -> str:
    """The boundary of a ``multipart/form-data`` Content-Type; a 400 for anything else."""
    kind, options = multipart.parse_options_header(content_type or "")
    if kind != "multipart/form-data":
        raise InvalidRequestError("This endpoint takes a multipart/form-data body (a file and form fields), "
                                  f"not {kind or 'a body without a Content-Type'}.", param="request_body")
    boundary = options.get("boundary") or ""
    if not BOUNDARY.fullmatch(boundary):
        raise InvalidRequestError("The multipart/form-data Content-Type has no valid boundary.",
                                  param="request_body")
    return boundary


@dataclass(frozen=True)
class FilePart:
    name: str
    filename: str
    content_type: str | None
    size: int


class SpooledForm:
    """One upload being received. ``feed`` each body chunk, then ``close``; a malformed body
    leaves ``error`` set (nothing raises out of ``feed``, which runs in ``data_received``)."""

    def __init__(self, content_type: str | None, directory: str | None = None):
        self.boundary = boundary_of(content_type).encode("latin1")
        self._parser = multipart.PushMultipartParser(self.boundary, max_header_size=MAX_PART_HEADER,
                                                     max_header_count=16, max_segment_count=MAX_PARTS)
        self._spool = tempfile.TemporaryFile(prefix="tp-upload-", dir=directory)  # unlinked already
        self.size = 0                      # bytes spooled
        self.fields: dict[str, str] = {}   # text fields (the first of a repeated name)
        self.files: list[FilePart] = []
        self.error: InvalidRequestError | None = None
        self._part: multipart.MultipartSegment | None = None
        self._text: bytearray | None = None  # the current part's value, when it is a text field

    @property
    def content_type(self) -> str:
        return "multipart/form-data; boundary=" + self.boundary.decode("latin1")

    def feed(self, chunk: bytes) -> None:
        if self.error is not None or not chunk:
            return
        try:
            for event in self._parser.parse(chunk):
                self._on(event)
        except multipart.MultipartError as exc:
            self.error = InvalidRequestError(f"The multipart/form-data body is malformed: {exc}", param="request_body")
        except InvalidRequestError as exc:
            self.error = exc

    def close(self) -> None:
        """The body is complete: end the spool with the closing delimiter. Raises the 400 of a
        malformed or truncated body."""
        if self.error is None:
            try:
                for event in self._parser.parse(b""):
                    self._on(event)
                if not self._parser.closed:
                    raise InvalidRequestError("The multipart/form-data body ends before its closing boundary.",
                                              param="request_body")
            except multipart.MultipartError as exc:
                self.error = InvalidRequestError(f"The multipart/form-data body is malformed: {exc}",
                                                 param="request_body")
            except InvalidRequestError as exc:
                self.error = exc
        if self.error is not None:
            raise self.error
        self._write(b"--" + self.boundary + b"--\r\n")
        self._spool.flush()

    def discard(self) -> None:
        self._spool.close()

    def body_for(self, model: str) -> UploadBody:
        """What one attempt sends: the deployment's ``model`` part, then the spooled parts."""
        value = model.encode("utf-8")
        if self.boundary in value or b"\r" in value or b"\n" in value:
            raise InvalidRequestError("The model name cannot be sent in this multipart body.", param="model")
        head = (b"--" + self.boundary + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\n' + value
                + b"\r\n")
        return UploadBody(head, self._spool.fileno(), self.size)

    def _on(self, event) -> None:
        if isinstance(event, multipart.MultipartSegment):
            if not event.name:
                raise InvalidRequestError("A multipart/form-data part has no field name.", param="request_body")
            self._part = event
            self._text = bytearray() if event.filename is None or event.name == "model" else None
            if event.name != "model":
                self._write(b"--" + self.boundary + b"\r\n" + b"".join(
                    f"{name}: {value}\r\n".encode("utf-8") for name, value in event.headerlist) + b"\r\n")
        elif event is None:
            self._end_part()
        else:
            part = self._part
            if self._text is not None:
                if len(self._text) + len(event) > MAX_FIELD_BYTES:
                    raise InvalidRequestError(f"The form field '{part.name}' is longer than {MAX_FIELD_BYTES // 1024} "
                                              "KB.", param=part.name)
                self._text += event
            if part.name != "model":
                self._write(event)

    def _end_part(self) -> None:
        part = self._part
        if self._text is not None:
            try:
                self.fields.setdefault(part.name, self._text.decode(part.charset or "utf-8"))
            except (UnicodeDecodeError, LookupError):
                raise InvalidRequestError(f"The form field '{part.name}' is not valid text.", param=part.name) from None
        else:
            self.files.append(FilePart(part.name, part.filename, part.content_type, part.size))
        if part.name != "model":
            self._write(b"\r\n")
        self._part = self._text = None

    def _write(self, data: bytes) -> None:
        self._spool.write(data)
        self.size += len(data)


class UploadBody:
    """A request body libcurl reads (its READFUNCTION and SEEKFUNCTION): ``head`` from memory,
    then ``size`` bytes of the file ``fd`` (read with ``pread``: no shared file position)."""

    def __init__(self, head: bytes, fd: int, size: int):
        self.head, self.fd = head, fd
        self.size = len(head) + size
        self.position = 0

    def read(self, n: int) -> bytes:
        pos, head = self.position, self.head
        data = head[pos:pos + n] if pos < len(head) else b""
        if len(data) < n and pos + len(data) < self.size:
            data += os.pread(self.fd, min(n - len(data), self.size - pos - len(data)), pos + len(data) - len(head))
        self.position += len(data)
        return data

    def seek(self, offset: int, origin: int) -> int:
        """libcurl rewinds (to resend on a dropped keep-alive connection): 0 = SEEKFUNC_OK."""
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.position, os.SEEK_END: self.size}[origin]
        self.position = max(0, min(base + offset, self.size))
        return 0
