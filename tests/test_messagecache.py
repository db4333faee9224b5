"""The pure part of /v1/messages caching (messagecache.py): what is stored, the assembler of
pass-through streams, and the replay of a stored message as Anthropic's event stream."""

import orjson
import pytest

from tornado_proxy.cachekey import CacheSettings, cache_key
from tornado_proxy.messagecache import MessageAssembler, fresh_message, message_entry, replay_events
from tornado_proxy.sse import SseParser

MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
           "content": [{"type": "thinking", "thinking": "hmm", "signature": "sig"},
                       {"type": "text", "text": "Let me check."},
                       {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "Paris"}},
                       {"type": "redacted_thinking", "data": "opaque"}],
           "stop_reason": "tool_use", "stop_sequence": None,
           "usage": {"input_tokens": 7, "output_tokens": 12, "cache_read_input_tokens": 2}}


def payloads(stream: bytes) -> list[bytes]:
    parser = SseParser()
    return [e.data for e in parser.feed(stream) + parser.close()]


def assemble(events: list[bytes]) -> dict | None:
    assembler = MessageAssembler()
    for data in events:
        assembler.add(data)
    return assembler.answer()


def test_replay_assembles_back_to_the_message():
    stream = replay_events(MESSAGE)
    names = [orjson.loads(p)["type"] for p in payloads(stream)]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names.count("content_block_start") == names.count("content_block_stop") == 4
    assert assemble(payloads(stream)) == MESSAGE


def test_assembler_needs_a_complete_stream():
    events = payloads(replay_events(MESSAGE))
    assert assemble(events[:-1]) is None  # no message_stop
    broken = [e.replace(b'{\\"location\\"', b'{\\"loc') for e in events]
    assert assemble(broken) is None  # a tool input that does not parse
    assert assemble([b"not json", b"[]", *events]) == MESSAGE


@pytest.mark.parametrize("stop", ["refusal", "pause_turn", None])
def test_passthrough_entries_need_an_ending_stop_reason(stop):
    assert message_entry({**MESSAGE, "stop_reason": stop}, "claude") is None
    assert message_entry(MESSAGE, "claude") == MESSAGE


def test_translated_entries_are_anthropic_messages():
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-x",
              "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                  "role": "assistant", "content": "Sure.", "tool_calls": [
                      {"id": "call_1", "type": "function",
                       "function": {"name": "get_weather", "arguments": "{\"location\": \"Paris\"}"}}]}}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}
    entry = message_entry(answer, "gpt-fake")
    assert entry["type"] == "message" and entry["stop_reason"] == "tool_use"
    assert entry["content"] == [{"type": "text", "text": "Sure."}, {"type": "tool_use", "id": "call_1",
                                                                  "name": "get_weather", "input": {"location": "Paris"}}]
    assert entry["usage"] == {"input_tokens": 5, "output_tokens": 3}
    for finish in ("content_filter", None):
        assert message_entry({**answer, "choices": [{**answer["choices"][0], "finish_reason": finish}]}, "m") is None


def test_fresh_id_and_call_type_settings():
    assert fresh_message(MESSAGE)["id"] != MESSAGE["id"] and fresh_message(MESSAGE)["id"].startswith("msg_")
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    assert cache_key("anthropic_messages", "m", body) != cache_key("acompletion", "m", body)
    assert "anthropic_messages" in CacheSettings.parse({"cache": True})[0].call_types
    s, warnings = CacheSettings.parse({"cache": True, "cache_params": {"supported_call_types": ["aanthropic_messages"]}})
    assert s.call_types == frozenset({"anthropic_messages"}) and warnings == []
