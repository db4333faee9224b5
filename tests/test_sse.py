"""The incremental SSE parser and formatter: pure, no servers."""

import pytest

from tornado_proxy.sse import DONE, SseEvent, SseParser, format_event

OPENAI_STREAM = (
    b'data: {"id":"1","choices":[{"delta":{"content":"Hel"}}]}\n\n'
    b'data: {"id":"1","choices":[{"delta":{"content":"lo"}}]}\n\n'
    b"data: [DONE]\n\n"
)
OPENAI_EVENTS = [
    SseEvent(b'{"id":"1","choices":[{"delta":{"content":"Hel"}}]}'),
    SseEvent(b'{"id":"1","choices":[{"delta":{"content":"lo"}}]}'),
    SseEvent(DONE),
]


def feed_all(parser: SseParser, pieces) -> list[SseEvent]:
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    return events


def split_every(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def test_whole_stream_at_once():
    assert SseParser().feed(OPENAI_STREAM) == OPENAI_EVENTS


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 13, 64])
def test_any_chunk_boundary_gives_the_same_events(size):
    assert feed_all(SseParser(), split_every(OPENAI_STREAM, size)) == OPENAI_EVENTS


def test_every_single_split_point():
    for cut in range(len(OPENAI_STREAM) + 1):
        events = feed_all(SseParser(), [OPENAI_STREAM[:cut], OPENAI_STREAM[cut:]])
        assert events == OPENAI_EVENTS, cut


def test_incomplete_event_is_held_until_the_blank_line():
    p = SseParser()
    assert p.feed(b"data: partial") == []
    assert p.feed(b" more\n") == []
    assert p.feed(b"\n") == [SseEvent(b"partial more")]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_endings(eol):
    stream = b"data: a" + eol + eol + b"data: b" + eol + eol
    whole = SseParser()
    assert whole.feed(stream) + whole.close() == [SseEvent(b"a"), SseEvent(b"b")]
    bytewise = SseParser()
    assert feed_all(bytewise, split_every(stream, 1)) + bytewise.close() == [SseEvent(b"a"), SseEvent(b"b")]


def test_trailing_lone_cr_ends_the_line_and_a_following_lf_ends_nothing():
    # A CR at the very end of a chunk ends its line at once (the event goes out without
    # waiting); if the next chunk opens with LF, that LF was the second half of a CRLF.
    p = SseParser()
    assert p.feed(b"data: a\r\r") == [SseEvent(b"a")]
    assert p.feed(b"\ndata: b\r\r") == [SseEvent(b"b")]
    assert p.feed(b"\n") == []
    assert p.close() == []


def test_crlf_split_between_cr_and_lf_is_one_line_end():
    p = SseParser()
    events = p.feed(b"data: x\r")
    events += p.feed(b"\n\r")
    events += p.feed(b"\ndata: y\r\n\r\n")
    assert events == [SseEvent(b"x"), SseEvent(b"y")]


def test_comments_are_skipped_and_counted():
    stream = (b": OPENROUTER PROCESSING\n\n"
              b'data: {"a":1}\n\n'
              b": OPENROUTER PROCESSING\n\n"
              b":no space\n"
              b"data: [DONE]\n\n")
    p = SseParser()
    assert feed_all(p, split_every(stream, 4)) == [SseEvent(b'{"a":1}'), SseEvent(DONE)]
    assert p.comments == 3


def test_comment_inside_an_event_does_not_end_it():
    assert SseParser().feed(b"data: one\n: keep-alive\ndata: two\n\n") == [SseEvent(b"one\ntwo")]


def test_multi_line_data_joins_with_newline():
    assert SseParser().feed(b"data: first\ndata: second\ndata:third\n\n") == [SseEvent(b"first\nsecond\nthird")]


def test_only_one_space_after_colon_is_dropped():
    assert SseParser().feed(b"data:  two spaces\n\n") == [SseEvent(b" two spaces")]
    assert SseParser().feed(b"data:none\n\n") == [SseEvent(b"none")]


def test_event_names_attach_to_their_event_only():
    stream = (b"event: message_start\ndata: {\"x\":1}\n\n"
              b"data: plain\n\n"
              b"event: ping\r\ndata: {}\r\n\r\n")
    assert feed_all(SseParser(), split_every(stream, 1)) == [
        SseEvent(b'{"x":1}', "message_start"), SseEvent(b"plain"), SseEvent(b"{}", "ping")]


def test_blank_lines_without_data_dispatch_nothing():
    assert SseParser().feed(b"\n\n\n\nevent: lonely\n\n") == []


def test_unknown_fields_are_ignored():
    assert SseParser().feed(b"id: 7\nretry: 100\ndata: x\n\n") == [SseEvent(b"x")]


def test_done_marker():
    events = SseParser().feed(b"data: [DONE]\n\n")
    assert events == [SseEvent(DONE)] and events[0].data == b"[DONE]"


def test_close_dispatches_an_unterminated_final_event():
    p = SseParser()
    assert p.feed(b'data: {"last":true}') == []
    assert p.close() == [SseEvent(b'{"last":true}')]
    assert p.close() == []


def test_close_after_a_complete_stream_adds_nothing():
    p = SseParser()
    p.feed(OPENAI_STREAM)
    assert p.close() == []


def test_utf8_split_inside_a_character():
    payload = '{"content":"héllo ✓"}'.encode()
    stream = b"data: " + payload + b"\n\n"
    assert feed_all(SseParser(), split_every(stream, 1)) == [SseEvent(payload)]


@pytest.mark.parametrize("data,event", [
    (b'{"a":1}', None), (b"[DONE]", None), (b"line1\nline2", None), (b"{}", "ping"), (b"x\ny", "delta")])
def test_format_round_trips_through_the_parser(data, event):
    formatted = format_event(data, event)
    assert formatted.endswith(b"\n\n")
    assert SseParser().feed(formatted) == [SseEvent(data, event)]


def test_format_single_line():
    assert format_event(b'{"a":1}') == b'data: {"a":1}\n\n'
    assert format_event(b"{}", "ping") == b"event: ping\ndata: {}\n\n"
