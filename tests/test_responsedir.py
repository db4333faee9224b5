"""The per-instance responses directory (``responsedir.py``) and the store's levels over it: files
written whole, ids refused before they become names, the bounds (count, bytes, one response)
pruned oldest first through the shared index, and worker memory that never outlives a DELETE."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tornado_proxy.providers.responses_format import new_response_id, response_id_time
from tornado_proxy.responsedir import ResponseDirectory, responses_path, safe_id
from tornado_proxy.responsestore import ResponseStore, StoredResponse, decode, encode, recently_made


def opened(path: Path, **bounds) -> ResponseDirectory:
    d = ResponseDirectory(path, **bounds)
    d.open()
    return d


def files(path: Path) -> set[str]:
    return {p.name for p in path.iterdir() if p.is_file() and p.name != "index"}


@pytest.fixture
def where(tmp_path) -> Path:
    return tmp_path / "proxyctl-4000.responses"


def test_beside_the_supervisor_state_file():
    assert responses_path(Path("var/proxyctl-4000.state")) == Path("var/proxyctl-4000.responses")


def test_put_read_remove(where):
    d = opened(where)
    assert d.put("resp_a", b'{"x": 1}') and d.read("resp_a") == b'{"x": 1}' and d.exists("resp_a")
    assert d.put("resp_a", b"other")  # an id kept already stays as it is
    assert d.read("resp_a") == b'{"x": 1}'
    assert files(where) == {"resp_a.json"} and os.listdir(where / "tmp") == []
    assert d.remove("resp_a") and not d.exists("resp_a") and d.deleted("resp_a") and d.read("resp_a") is None
    assert files(where) == {"resp_a.deleted"}
    assert not d.remove("resp_a")  # nothing left to remove
    assert d.read("resp_never") is None and not d.deleted("resp_never")


def test_a_write_that_fails_leaves_no_file(where, monkeypatch, caplog):
    d = opened(where)

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    assert not d.put("resp_full", b"data")
    assert files(where) == set() and os.listdir(where / "tmp") == [] and d.usage() == (0, 0)
    assert "No space left on device" in caplog.text


def test_the_name_appears_only_when_the_file_is_whole(where, monkeypatch):
    """The data goes to a temporary name first; the id's name appears in one rename."""
    d = opened(where)
    seen = []
    real_replace = os.replace

    def watch(src, dst):
        seen.append((Path(src).parent.name, Path(src).read_bytes(), (where / "resp_w.json").exists()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", watch)
    assert d.put("resp_w", b"whole")
    assert seen == [("tmp", b"whole", False)] and d.read("resp_w") == b"whole"


def test_stale_temporary_files_go_at_open(where):
    (where / "tmp").mkdir(parents=True)
    stale, fresh = where / "tmp" / "resp_x.1.aa", where / "tmp" / "resp_y.2.bb"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"being written")
    os.utime(stale, (time.time() - 3600,) * 2)
    opened(where)
    assert not stale.exists() and fresh.exists()


@pytest.mark.parametrize("bad", ["", "../index", "a/b", "..", "resp_a.json", "x" * 101, "résumé", "a b",
                                 "resp\x00", "/etc/passwd", "C:\\x", "resp_a\n"])
def test_unsafe_ids_never_become_names(where, bad):
    d = opened(where)
    assert not safe_id(bad)
    assert not d.put(bad, b"data")
    assert d.read(bad) is None and not d.exists(bad) and not d.deleted(bad) and not d.remove(bad)
    assert files(where) == set() and d.usage() == (0, 0)


def test_count_bound_prunes_oldest_first(where):
    d = opened(where, max_responses=5)
    for i in range(8):
        assert d.put(f"resp_{i}", b"12345")
    assert files(where) == {f"resp_{i}.json" for i in range(3, 8)}
    assert d.usage() == (5, 25)
    d.remove("resp_3")  # a deletion marker counts too: the oldest response goes
    assert files(where) == {"resp_4.json", "resp_5.json", "resp_6.json", "resp_7.json", "resp_3.deleted"}
    assert d.usage() == (5, 20)


def test_byte_bound_prunes_oldest_first(where):
    d = opened(where, max_responses=100, max_bytes=100, max_response_bytes=60)
    for i in range(5):
        assert d.put(f"resp_{i}", b"x" * 30)
    assert files(where) == {"resp_2.json", "resp_3.json", "resp_4.json"} and d.usage() == (3, 90)
    assert d.put("resp_big", b"y" * 60)  # makes room for itself
    assert files(where) == {"resp_4.json", "resp_big.json"} and d.usage() == (2, 90)
    assert not d.put("resp_huge", b"z" * 61)  # over the bound for one response: not kept at all
    assert files(where) == {"resp_4.json", "resp_big.json"} and d.usage() == (2, 90)


def test_workers_share_one_index(where):
    """Two processes' views (here two objects) count in the same ring: either prunes the other's."""
    one, two = opened(where, max_responses=4), opened(where, max_responses=4)
    one.put("resp_1", b"a")
    two.put("resp_2", b"bb")
    one.put("resp_3", b"ccc")
    assert two.read("resp_1") == b"a" and one.read("resp_2") == b"bb"
    two.put("resp_4", b"d")
    two.put("resp_5", b"e")
    assert files(where) == {"resp_2.json", "resp_3.json", "resp_4.json", "resp_5.json"}
    assert one.usage() == two.usage() == (4, 7)


def test_index_is_rebuilt_from_the_files(where):
    d = opened(where, max_responses=10)
    for i in range(6):
        d.put(f"resp_{i}", b"xy")
        os.utime(where / f"resp_{i}.json", (1000 + i,) * 2)
    d.remove("resp_0")
    d.close()
    (where / "index").unlink()
    (where / "notes.txt").write_text("not ours")
    d = opened(where, max_responses=4)  # fewer slots now: the oldest files go
    assert files(where) == {"resp_3.json", "resp_4.json", "resp_5.json", "resp_0.deleted", "notes.txt"}
    assert d.usage() == (4, 6)
    d.put("resp_6", b"z")
    assert "resp_3.json" not in files(where)


def test_response_ids_carry_their_time():
    now = time.time()
    rid = new_response_id(now)
    assert rid.startswith("resp_") and len(rid) == 53 and safe_id(rid)
    assert response_id_time(rid) == int(now) and new_response_id(now) != rid
    assert recently_made(rid, now + 1) and not recently_made(rid, now + 3600)
    assert not recently_made(new_response_id(now - 3600), now)
    for other in ("resp_1", "resp_" + "g" * 32, "msg_" + "0" * 40, "resp_0x123456abcdef00"):
        assert response_id_time(other) is None and not recently_made(other, now)


def record(rid: str, text: str = "hi") -> StoredResponse:
    return StoredResponse(id=rid, owner="h", model="demo", response={"id": rid, "output": [{"text": text}]},
                          input_items=[{"type": "message", "role": "user", "content": text}], created_at=5.0)


def test_encode_decode_and_bad_files():
    r = record("resp_e")
    assert decode(encode(r), "resp_e") == r
    for data in (b"{", b"[]", b'{"id": "resp_other", "owner": ""}', b'{"id": "resp_e", "owner": 1}',
                 b'{"id": "resp_e", "owner": "", "created_at": "soon"}',
                 b'{"id": "resp_e", "owner": "", "input_items": 3}'):
        assert decode(data, "resp_e") is None


async def test_memory_copies_follow_the_directory(where):
    """Two workers' stores on one directory: what one keeps the other reads; a DELETE on one is a
    miss on the other although it held a copy in memory; so is a response pruned away."""
    one = ResponseStore(None, ResponseDirectory(where, max_responses=3))
    two = ResponseStore(None, ResponseDirectory(where, max_responses=3))
    one.open()
    two.open()
    one.save(record("resp_1"))
    got = await two.get("resp_1")
    assert got == record("resp_1") and "resp_1" in two.memory
    assert await two.delete("resp_1")
    assert await one.get("resp_1") is None and "resp_1" not in one.memory

    one.save(record("resp_2"))
    assert await two.get("resp_2") is not None
    for i in range(3, 6):  # resp_2 (and the marker) pruned by the bound
        one.save(record(f"resp_{i}"))
    assert await two.get("resp_2") is None and await one.get("resp_2") is None


async def test_a_response_too_large_to_share_stays_in_its_worker_until_deleted(where):
    one = ResponseStore(None, ResponseDirectory(where, max_response_bytes=100))
    two = ResponseStore(None, ResponseDirectory(where, max_response_bytes=100))
    one.open()
    two.open()
    big = record("resp_big", "x" * 200)
    one.save(big)
    assert await one.get("resp_big") is big and await two.get("resp_big") is None
    one.remember(record("resp_big", "x" * 200))  # a copy no file backs, deleted by another worker:
    two.forget("resp_big")
    assert await one.get("resp_big") is None


async def test_without_a_directory_memory_only(where):
    store = ResponseStore(None)
    store.open()
    store.save(record("resp_m"))
    assert await store.get("resp_m") == record("resp_m")
    assert await store.delete("resp_m") and await store.get("resp_m") is None


async def test_an_unusable_directory_falls_back_to_memory(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the directory should be")
    store = ResponseStore(None, ResponseDirectory(blocker / "responses"))
    store.open()
    assert store.directory is None and "cannot be used" in caplog.text
    store.save(record("resp_x"))
    assert await store.get("resp_x") is not None
