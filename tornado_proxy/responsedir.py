"""The stored responses of one instance, shared by all its workers: a directory beside the
supervisor's other files (``var/proxyctl-4000.state`` -> ``var/proxyctl-4000.responses/``), one
file per response id, so that a follow-up turn, ``GET`` or ``DELETE`` finds a response whichever
worker the connection reaches.

- A file appears whole or not at all: it is written under ``tmp/`` and renamed into place.
- Its name is the id itself, so an id is used only when it is made of ``[A-Za-z0-9_-]`` (at most
  ``MAX_ID`` characters); any other id is refused (not stored here, never looked up).
- A ``DELETE`` removes the file and leaves a small ``ID.deleted`` marker, which tells every worker
  that a copy it still holds in memory is gone.
- Bounded in count, in bytes and per response, oldest first, without listing the directory: the
  ``index`` file, mapped into every worker's memory and changed under an ``fcntl`` lock, is a ring
  of (id, size) slots in the order the files were written, with the total size. Writing a file
  past a bound removes the oldest ones. The directory is listed only when the index is missing or
  does not match the bounds (then it is rebuilt from the files, oldest first).

Nothing here is asynchronous: a write is one small local file (microseconds), made before the
answer that names the response goes out.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import re
import secrets
import struct
import time
from pathlib import Path

log = logging.getLogger(__name__)

MAX_RESPONSES = 10_000             # files (responses and deletion markers) per instance
MAX_BYTES = 512 * 2**20            # their total size
MAX_RESPONSE_BYTES = 16 * 2**20    # one response (with its conversation); a larger one is not shared
MAX_ID = 100
SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,%d}" % MAX_ID)
STALE_TMP = 60.0                   # seconds after which a temporary file is a leftover of a crash

MAGIC = b"RESPIDX1"
HEADER = struct.Struct("<8sIQQQ")  # magic, capacity, head (next sequence), tail (oldest live), total bytes
SLOT = struct.Struct("<IBB%ds" % MAX_ID)  # size, kind, id length, id
RESPONSE, MARKER = 1, 2
SUFFIX = {RESPONSE: ".json", MARKER: ".deleted"}


def responses_path(state_path: Path) -> Path:
    """Beside the supervisor's state file (``var/proxyctl-4000.state`` -> ``...4000.responses``)."""
    return state_path.with_suffix(".responses")


def safe_id(response_id: str) -> bool:
    return SAFE_ID.fullmatch(response_id) is not None


class ResponseDirectory:
    def __init__(self, path: Path, max_responses: int = MAX_RESPONSES, max_bytes: int = MAX_BYTES,
                 max_response_bytes: int = MAX_RESPONSE_BYTES):
        self.path = Path(path)
        self.tmp = self.path / "tmp"
        self.capacity = max_responses
        self.max_bytes = max_bytes
        self.max_response_bytes = min(max_response_bytes, max_bytes)
        self.fd = -1
        self.mem: mmap.mmap | None = None

    # --- opening ---------------------------------------------------------------------------------

    def open(self) -> None:
        """Create the directory and its index if needed (any worker may be first), and map the
        index. Raises OSError when the directory cannot be used."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.remove_stale_tmp()
        size = HEADER.size + SLOT.size * self.capacity
        self.fd = os.open(self.path / "index", os.O_RDWR | os.O_CREAT, 0o600)
        with self.locked():
            fresh = os.fstat(self.fd).st_size != size
            if fresh:
                os.ftruncate(self.fd, 0)
                os.ftruncate(self.fd, size)
            self.mem = mmap.mmap(self.fd, size)
            magic, capacity, *_ = HEADER.unpack_from(self.mem, 0)
            if fresh or magic != MAGIC or capacity != self.capacity:
                self.rebuild()

    def close(self) -> None:
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def remove_stale_tmp(self) -> None:
        cutoff = time.time() - STALE_TMP
        with os.scandir(self.tmp) as entries:
            for entry in entries:
                try:
                    if entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                except FileNotFoundError:
                    pass

    def rebuild(self) -> None:
        """The index from the files there are, oldest first (the lock is held)."""
        HEADER.pack_into(self.mem, 0, MAGIC, self.capacity, 0, 0, 0)
        found = []
        with os.scandir(self.path) as entries:
            for entry in entries:
                stem, dot, suffix = entry.name.rpartition(".")
                kind = RESPONSE if suffix == "json" else MARKER if suffix == "deleted" else None
                if kind is None or not dot or not safe_id(stem):
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                found.append((st.st_mtime, stem, kind, st.st_size))
        found.sort()
        evicted = [path for _, stem, kind, size in found for path in self.register(kind, stem, size)]
        for path in evicted:
            self.unlink(path)
        if found:
            log.info("responses directory %s: index rebuilt from %d file(s)", self.path, len(found) - len(evicted))

    # --- files -----------------------------------------------------------------------------------

    def file(self, response_id: str, kind: int = RESPONSE) -> Path:
        return self.path / (response_id + SUFFIX[kind])

    def put(self, response_id: str, data: bytes) -> bool:
        """Keep ``data`` as the response ``response_id``; False when it cannot be (an unsafe id, too
        large, a disk that refuses). An id already kept is left as it is."""
        if not safe_id(response_id) or len(data) > self.max_response_bytes or self.mem is None:
            return False
        final = self.file(response_id)
        if final.exists():
            return True
        tmp = self.tmp / f"{response_id}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        except OSError as exc:
            self.unlink(tmp)
            log.warning("response %s not shared with the other workers: %s", response_id, exc.strerror or exc)
            return False
        self.add(RESPONSE, response_id, len(data))
        return True

    def read(self, response_id: str) -> bytes | None:
        if not safe_id(response_id):
            return None
        try:
            with open(self.file(response_id), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def exists(self, response_id: str) -> bool:
        return safe_id(response_id) and os.path.exists(self.file(response_id))

    def deleted(self, response_id: str) -> bool:
        """A ``DELETE`` removed this id here (until the marker is pruned, like any file)."""
        return safe_id(response_id) and os.path.exists(self.file(response_id, MARKER))

    def remove(self, response_id: str) -> bool:
        """Remove the response and mark it deleted; True when its file was there."""
        if not safe_id(response_id) or self.mem is None:
            return False
        existed = self.unlink(self.file(response_id))
        marker = self.file(response_id, MARKER)
        try:
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            return existed
        except OSError as exc:
            log.warning("response %s: the deletion marker could not be written: %s", response_id,
                        exc.strerror or exc)
            return existed
        self.add(MARKER, response_id, 0)
        return existed

    @staticmethod
    def unlink(path: Path) -> bool:
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False

    # --- the index ---------------------------------------------------------------------------------

    def add(self, kind: int, response_id: str, size: int) -> None:
        with self.locked():
            evicted = self.register(kind, response_id, size)
        for path in evicted:
            self.unlink(path)

    def register(self, kind: int, response_id: str, size: int) -> list[Path]:
        """Append one file to the ring (the lock is held); the oldest files past the bounds
        leave it, and their paths are returned for removal."""
        mem, cap = self.mem, self.capacity
        _, _, head, tail, total = HEADER.unpack_from(mem, 0)
        evicted = []
        while head > tail and (head - tail >= cap or total + size > self.max_bytes):
            old_size, old_kind, length, name = SLOT.unpack_from(mem, HEADER.size + SLOT.size * (tail % cap))
            total, tail = max(total - old_size, 0), tail + 1
            if old_kind in SUFFIX:
                evicted.append(self.file(name[:length].decode("ascii"), old_kind))
        name = response_id.encode("ascii")
        SLOT.pack_into(mem, HEADER.size + SLOT.size * (head % cap), size, kind, len(name), name)
        HEADER.pack_into(mem, 0, MAGIC, cap, head + 1, tail, total + size)
        return evicted

    def usage(self) -> tuple[int, int]:
        """(files, bytes) as the index counts them."""
        with self.locked():
            _, _, head, tail, total = HEADER.unpack_from(self.mem, 0)
        return head - tail, total

    def locked(self):
        return IndexLock(self.fd)


class IndexLock:
    """``fcntl`` locks die with their process: a worker killed while holding one wedges nobody."""

    def __init__(self, fd: int):
        self.fd = fd

    def __enter__(self):
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        fcntl.lockf(self.fd, fcntl.LOCK_UN)
