"""The pure part of response caching (cachekey.py) and the local store."""

import orjson
import pytest

from tornado_proxy.cache import LocalCache
from tornado_proxy.cachekey import (CacheSettings, ControlError, StreamAssembler, cache_key, controls, decode_entry,
                                    encode_entry, fresh, replay_chunks, storable)
from tornado_proxy.config import ConfigError

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2}


def test_key_ignores_caller_and_delivery_fields():
    base = cache_key("acompletion", "m", BODY)
    same = {**BODY, "user": "u", "metadata": {"a": 1}, "stream": True, "stream_options": {"include_usage": True},
            "cache": {"ttl": 5}}
    assert cache_key("acompletion", "m", same) == base
    assert cache_key("acompletion", "m", dict(reversed(list(BODY.items())))) == base


@pytest.mark.parametrize("change", [{"temperature": 0.3}, {"messages": [{"role": "user", "content": "ho"}]},
                                    {"tools": [{"type": "function", "function": {"name": "f"}}]},
                                    {"response_format": {"type": "json_object"}}, {"max_tokens": 5}])
def test_key_changes_with_answer_fields(change):
    assert cache_key("acompletion", "m", {**BODY, **change}) != cache_key("acompletion", "m", BODY)


def test_key_changes_with_group_and_call_type():
    base = cache_key("acompletion", "m", BODY)
    assert cache_key("acompletion", "other", BODY) != base
    assert cache_key("atext_completion", "m", BODY) != base


def test_settings():
    assert CacheSettings.parse({}) == (None, [])
    s, warnings = CacheSettings.parse({"cache": True})
    assert s.type == "local" and s.mode == "default_on" and warnings == []
    s, _ = CacheSettings.parse({"cache": True, "cache_params": {"type": "redis", "ttl": 5, "namespace": "n",
                                                                "supported_call_types": ["acompletion"]}})
    assert (s.type, s.ttl, s.namespace, s.call_types) == ("redis", 5.0, "n", frozenset({"acompletion"}))
    s, warnings = CacheSettings.parse({"cache": True, "cache_params": {"type": "redis-semantic"}})
    assert s is None and "NOT cached" in warnings[0]
    with pytest.raises(ConfigError):
        CacheSettings.parse({"cache": True, "cache_params": {"mode": "sometimes"}})
    with pytest.raises(ConfigError):
        CacheSettings.parse({"cache": True, "cache_params": {"ttl": -1}})


def test_controls():
    on, off = CacheSettings(), CacheSettings(mode="default_off", namespace="ns")
    c = controls({}, on)
    assert c.use and c.read and c.write and c.ttl is None and c.max_age is None
    c = controls({"cache": {"no-cache": True, "no-store": True, "ttl": 9, "s-maxage": 3, "namespace": "x"}}, on)
    assert (c.read, c.write, c.ttl, c.max_age, c.namespace) == (False, False, 9, 3, "x")
    assert not controls({}, off).use
    assert controls({"cache": {}}, off).use and controls({"cache": {}}, off).namespace == "ns"
    assert not controls({"cache": {"use-cache": False}}, on).use
    for bad in ("yes", {"ttl": "5"}, {"s-maxage": -1}, {"namespace": ""}):
        with pytest.raises(ControlError):
            controls({"cache": bad}, on)


def test_storable():
    assert storable({"choices": [{"finish_reason": "stop"}, {"finish_reason": "length"}]})
    assert not storable({"choices": [{"finish_reason": "tool_calls"}]})
    assert not storable({"choices": [{"finish_reason": None}]})
    assert not storable({"error": {}})
    assert storable({"object": "list", "data": [{"embedding": [0.1]}]})


def test_entry_age():
    data = encode_entry({"choices": []}, now=100.0)
    assert decode_entry(data, None, now=1000.0) == {"choices": []}
    assert decode_entry(data, 30, now=120.0) == {"choices": []}
    assert decode_entry(data, 30, now=131.0) is None
    assert decode_entry(b"junk", None) is None
    assert encode_entry({"x": "y" * (2 * 1024 * 1024)}) is None


def chunk(delta, finish=None, **extra):
    return orjson.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gm",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})


def test_assemble_and_replay_roundtrip():
    a = StreamAssembler()
    for payload in (chunk({"role": "assistant", "content": ""}), chunk({"content": "hel"}), chunk({"content": "lo"}),
                    chunk({}, "stop"), orjson.dumps({"id": "c1", "choices": [], "usage": {"total_tokens": 3}})):
        a.add(payload)
    answer = a.answer()
    assert answer["object"] == "chat.completion" and answer["usage"] == {"total_tokens": 3}
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert answer["choices"][0]["finish_reason"] == "stop" and storable(answer)
    new = fresh(answer)
    assert new["id"] != "c1" and new["id"].startswith("chatcmpl-")
    events = [orjson.loads(p) for p in replay_chunks(new, include_usage=True)]
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == new["id"] for e in events)
    assert "".join(c["delta"].get("content") or "" for e in events for c in e["choices"]) == "hello"
    assert events[-2]["choices"][0]["finish_reason"] == "stop" and events[-1]["usage"] == {"total_tokens": 3}
    assert all("usage" not in e for e in (orjson.loads(p) for p in replay_chunks(new, include_usage=False)))


def test_assemble_tool_calls_and_text():
    a = StreamAssembler()
    a.add(chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "t", "type": "function",
                                                       "function": {"name": "get", "arguments": ""}}]}))
    a.add(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\":1}"}}]}, "tool_calls"))
    call = a.answer()["choices"][0]["message"]["tool_calls"][0]
    assert call == {"id": "t", "type": "function", "function": {"name": "get", "arguments": "{\"a\":1}"}}
    t = StreamAssembler()
    for text, finish in (("a", None), ("b", "length")):
        t.add(orjson.dumps({"id": "x", "object": "text_completion", "model": "m",
                            "choices": [{"index": 0, "text": text, "finish_reason": finish}]}))
    answer = t.answer()
    assert answer["object"] == "text_completion" and answer["choices"][0]["text"] == "ab" and storable(answer)
    replayed = [orjson.loads(p) for p in replay_chunks(fresh(answer), False)]
    assert "".join(c["text"] for e in replayed for c in e["choices"]) == "ab"


async def test_local_cache_lru_and_ttl():
    now = [0.0]
    cache = LocalCache(2, clock=lambda: now[0])
    await cache.set("a", None, b"1", 10)
    await cache.set("b", "ns", b"2", 10)
    assert await cache.get("a", None) == b"1"  # a is now the most recently used
    await cache.set("c", None, b"3", 10)
    assert await cache.get("b", "ns") is None and await cache.get("a", None) == b"1"
    now[0] = 11.0
    assert await cache.get("a", None) is None
    await cache.set("d", "ns", b"4", 10)
    await cache.set("e", None, b"5", 10)
    assert await cache.flush("ns") == 1 and await cache.get("e", None) == b"5"
    assert await cache.flush() == 1
