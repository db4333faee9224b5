"""``upload.py``: the multipart upload parsed as it arrives, spooled, and re-emitted with the
deployment's ``model``; tested without servers (the re-emitted body is parsed back with the
same library a provider's framework would use)."""

from __future__ import annotations

import os

import multipart
import pytest

from tornado_proxy.errors import InvalidRequestError
from tornado_proxy.upload import MAX_FIELD_BYTES, SpooledForm, UploadBody, boundary_of

CT = "multipart/form-data; boundary=XbounDary"
FILE = bytes(range(256)) * 40 + b"\r\n--Xboun"  # binary, with a near-miss of the delimiter in it


def part(name: str, value: bytes, filename: str | None = None, content_type: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    head = f"--XbounDary\r\nContent-Disposition: {disposition}\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    return head.encode() + b"\r\n" + value + b"\r\n"


def body(*parts: bytes) -> bytes:
    return b"".join(parts) + b"--XbounDary--\r\n"


UPLOAD = body(part("file", FILE, "a b.wav", "audio/wav"), part("language", b"en"), part("model", b"whisper"),
              part("timestamp_granularities[]", b"word"), part("timestamp_granularities[]", b"segment"))


def received(form: SpooledForm, model: str) -> list[tuple[str, str | None, str | None, bytes]]:
    """The re-emitted body as a provider parses it: (name, filename, content type, value)."""
    reader = form.body_for(model)
    data = b"".join(iter(lambda: reader.read(1000), b""))
    assert len(data) == reader.size
    parser = multipart.MultipartParser(__import__("io").BytesIO(data), form.boundary.decode())
    return [(p.name, p.filename, p.content_type if p.filename else None, p.raw) for p in parser]


def spooled(data: bytes, piece: int) -> SpooledForm:
    form = SpooledForm(CT)
    for i in range(0, len(data), piece):
        form.feed(data[i:i + piece])
    form.close()
    return form


@pytest.mark.parametrize("piece", [1, 7, 64, 4096, len(UPLOAD)])
def test_reemitted_parts_are_the_same_whatever_the_chunking(piece):
    form = spooled(UPLOAD, piece)
    assert form.fields == {"language": "en", "model": "whisper", "timestamp_granularities[]": "word"}
    assert [(f.name, f.filename, f.content_type, f.size) for f in form.files] == [("file", "a b.wav", "audio/wav",
                                                                                     len(FILE))]
    assert received(form, "whisper-1") == [
        ("model", None, None, b"whisper-1"),  # the deployment's model, first; the client's is gone
        ("file", "a b.wav", "audio/wav", FILE), ("language", None, None, b"en"),
        ("timestamp_granularities[]", None, None, b"word"), ("timestamp_granularities[]", None, None, b"segment")]
    assert form.content_type == CT
    form.discard()


def test_each_attempt_gets_its_own_model_and_the_same_parts():
    form = spooled(UPLOAD, 100)
    first, second = received(form, "whisper-1"), received(form, "my-azure-whisper")
    assert first[1:] == second[1:] and second[0] == ("model", None, None, b"my-azure-whisper")
    form.discard()


def test_the_spool_is_on_disk_not_in_memory():
    form = SpooledForm(CT)
    form.feed(UPLOAD)
    form.close()
    assert form.size > len(FILE)
    fd = form._spool.fileno()
    assert os.fstat(fd).st_size == form.size  # the parts are in the file
    assert os.fstat(fd).st_nlink == 0  # already unlinked: nothing is left behind
    form.discard()


@pytest.mark.parametrize("content_type", [None, "application/json", "multipart/form-data",
                                          "multipart/form-data; boundary=", "multipart/mixed; boundary=x",
                                          "multipart/form-data; boundary=" + "x" * 71])
def test_not_a_form_is_a_400(content_type):
    with pytest.raises(InvalidRequestError) as caught:
        boundary_of(content_type)
    assert caught.value.param == "request_body"


@pytest.mark.parametrize("data,param", [
    (UPLOAD[:-20], "request_body"),                                 # cut before the closing delimiter
    (b"garbage without any boundary", "request_body"),
    (body(part("", b"x")), "request_body"),                         # a part without a name
    (body(part("prompt", b"x" * (MAX_FIELD_BYTES + 1))), "prompt"),  # a text field too long
    (body(part("prompt", b"\xff\xfe")), "prompt"),                  # not UTF-8
])
def test_malformed_bodies_are_a_400(data, param):
    form = SpooledForm(CT)
    form.feed(data)  # never raises: it runs in data_received
    with pytest.raises(InvalidRequestError) as caught:
        form.close()
    assert caught.value.param == param
    form.discard()


def test_a_model_that_cannot_be_a_part_is_refused():
    form = spooled(UPLOAD, 4096)
    for bad in ("a\r\nb", "x--XbounDary"):
        with pytest.raises(InvalidRequestError):
            form.body_for(bad)
    form.discard()


def test_upload_body_reads_and_seeks(tmp_path):
    path = tmp_path / "spool"
    path.write_bytes(b"0123456789")
    with open(path, "rb") as f:
        reader = UploadBody(b"HEAD", f.fileno(), 10)
        assert reader.size == 14
        assert reader.read(3) == b"HEA" and reader.read(3) == b"D01" and reader.read(100) == b"23456789"
        assert reader.read(100) == b""
        assert reader.seek(0, os.SEEK_SET) == 0 and reader.read(6) == b"HEAD01"  # libcurl rewinds to resend
        reader.seek(-2, os.SEEK_END)
        assert reader.read(5) == b"89"
