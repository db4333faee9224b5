"""Response caching, the pure part: the cache settings (LiteLLM's ``litellm_settings.cache`` and
``cache_params``), a request's ``cache`` controls, the cache key, and the shape of entries (what
is stored, how a streamed answer is assembled into one, how a hit is replayed). No I/O."""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

import orjson

from .config import ConfigError

CACHE_TYPES = ("local", "redis")
OTHER_TYPES = ("redis-semantic", "qdrant-semantic", "s3", "gcs", "azure-blob", "disk")
MODES = ("default_on", "default_off")
# LiteLLM's call type names: /chat/completions, /completions, /embeddings, /v1/messages
CALL_TYPES = ("acompletion", "atext_completion", "aembedding", "anthropic_messages")
CALL_TYPE_ALIASES = {"aanthropic_messages": "anthropic_messages"}  # LiteLLM accepts both for /v1/messages
DEFAULT_TTL = 600.0
DEFAULT_LOCAL_SIZE = 1000
MAX_ENTRY_BYTES = 1024 * 1024  # an answer larger than this is not stored
# Fields that do not change the answer: who asks, how it is delivered, the cache controls.
UNKEYED = frozenset({"user", "metadata", "stream", "stream_options", "cache", "num_retries", "fallbacks",
                     "api_key", "litellm_metadata", "request_timeout", "timeout"})
STORABLE_FINISH = frozenset({"stop", "length"})


@dataclass(frozen=True)
class CacheSettings:
    type: str = "local"
    host: str | None = None
    port: int | None = None
    password: str | None = None
    url: str | None = None
    ttl: float = DEFAULT_TTL
    namespace: str | None = None
    mode: str = "default_on"
    call_types: frozenset = frozenset(CALL_TYPES)
    max_size: int = DEFAULT_LOCAL_SIZE

    @classmethod
    def parse(cls, litellm_settings: Mapping[str, Any]) -> tuple[CacheSettings | None, list[str]]:
        """The cache settings (None: no cache) and start-up warnings. Raises ConfigError for a
        value that cannot be used."""
        if not litellm_settings.get("cache"):
            extra = ["litellm_settings.cache_params is set but litellm_settings.cache is not true: responses "
                     "are not cached"] if litellm_settings.get("cache_params") else []
            return None, extra
        params = litellm_settings.get("cache_params") or {}
        where = "litellm_settings.cache_params"
        if not isinstance(params, Mapping):
            raise ConfigError(f"{where}: expected a mapping")
        kind = str(params.get("type") or "local")
        if kind not in CACHE_TYPES:
            return None, [f"{where}.type: {kind!r} is not implemented by this gateway (only local and redis): "
                          "responses are NOT cached"]
        mode = str(params.get("mode") or "default_on")
        if mode not in MODES:
            raise ConfigError(f"{where}.mode: must be one of {', '.join(MODES)}, got {mode!r}")
        types = params.get("supported_call_types")
        warnings = []
        if types is None:
            call_types = frozenset(CALL_TYPES)
        elif isinstance(types, list) and all(isinstance(t, str) for t in types):
            named = [CALL_TYPE_ALIASES.get(t, t) for t in types]
            call_types = frozenset(t for t in named if t in CALL_TYPES)
            warnings += [f"{where}.supported_call_types: {t!r} is not cached by this gateway (it caches "
                         f"{', '.join(CALL_TYPES)})" for t in named if t not in CALL_TYPES]
        else:
            raise ConfigError(f"{where}.supported_call_types: expected a list of call type names")
        return cls(type=kind, host=optional_str(params.get("host")), port=number(params, "port", int),
                   password=optional_str(params.get("password")), url=optional_str(params.get("url")),
                   ttl=number(params, "ttl", float) or DEFAULT_TTL, namespace=optional_str(params.get("namespace")),
                   mode=mode, call_types=call_types,
                   max_size=number(params, "max_size_in_memory", int) or DEFAULT_LOCAL_SIZE), warnings


def optional_str(value) -> str | None:
    return str(value) if value not in (None, "") else None


def number(params: Mapping[str, Any], name: str, kind: type):
    value = params.get(name)
    if value in (None, ""):
        return None
    try:
        converted = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"litellm_settings.cache_params.{name}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or converted <= 0:
        raise ConfigError(f"litellm_settings.cache_params.{name}: must be greater than 0, got {value!r}")
    return converted


@dataclass(frozen=True)
class Controls:
    """A request's ``cache`` object (as LiteLLM reads it)."""

    use: bool              # this request takes part in caching at all
    read: bool             # no-cache: false
    write: bool            # no-store: false
    ttl: float | None
    max_age: float | None  # s-maxage: only entries younger than this
    namespace: str | None


class ControlError(ValueError):
    pass


def controls(body: Mapping[str, Any], settings: CacheSettings) -> Controls:
    """The request's cache controls; raises ControlError for a malformed ``cache`` object."""
    raw = body.get("cache")
    if raw is not None and not isinstance(raw, Mapping):
        raise ControlError("cache must be an object, e.g. {\"no-cache\": true}.")
    raw = raw or {}
    for name in ("ttl", "s-maxage"):
        value = raw.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ControlError(f"cache.{name} must be a positive number of seconds.")
    namespace = raw.get("namespace")
    if namespace is not None and (not isinstance(namespace, str) or not namespace):
        raise ControlError("cache.namespace must be a non-empty string.")
    opted_in = "cache" in body and raw.get("use-cache") is not False
    use = opted_in if settings.mode == "default_off" else raw.get("use-cache") is not False
    return Controls(use=use, read=not raw.get("no-cache"), write=not raw.get("no-store"),
                    ttl=raw.get("ttl"), max_age=raw.get("s-maxage"), namespace=namespace or settings.namespace)


def cache_key(call_type: str, group: str, body: Mapping[str, Any]) -> str:
    """SHA-256 hex of the call type, the model group and every field that changes the answer."""
    fields = {k: v for k, v in body.items() if k not in UNKEYED}
    material = orjson.dumps([call_type, group, fields], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(material).hexdigest()


def storable(answer: Mapping[str, Any]) -> bool:
    """A complete answer: embeddings with data, or choices that all ended normally."""
    if answer.get("object") == "list":
        return isinstance(answer.get("data"), list) and bool(answer["data"])
    choices = answer.get("choices")
    return (isinstance(choices, list) and bool(choices)
            and all(isinstance(c, Mapping) and c.get("finish_reason") in STORABLE_FINISH for c in choices))


def encode_entry(answer: Mapping[str, Any], now: float | None = None) -> bytes | None:
    """The stored bytes, or None when the answer is too large to keep."""
    data = orjson.dumps({"stored_at": time.time() if now is None else now, "answer": answer})
    return data if len(data) <= MAX_ENTRY_BYTES else None


def decode_entry(data: bytes | None, max_age: float | None, now: float | None = None) -> dict | None:
    """The stored answer, or None when absent, unreadable or older than ``max_age`` seconds."""
    if not data:
        return None
    try:
        entry = orjson.loads(data)
        answer, stored_at = entry["answer"], float(entry["stored_at"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    if not isinstance(answer, dict):
        return None
    if max_age is not None and (time.time() if now is None else now) - stored_at > max_age:
        return None
    return answer


class BoundedAssembler:
    """Puts a streamed answer back together from its events' JSON payloads, up to
    ``MAX_ENTRY_BYTES`` (past that it is ``too_large`` and never stored); ``take`` reads one."""

    size = 0
    too_large = False

    def add(self, payload: bytes) -> None:
        self.size += len(payload)
        if self.too_large or self.size > MAX_ENTRY_BYTES:
            self.too_large = True
            return
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if isinstance(event, dict):
            self.take(event)

    def take(self, event: dict) -> None:
        raise NotImplementedError


class StreamAssembler(BoundedAssembler):
    """Builds one ``chat.completion`` (or ``text_completion``) from the chunks of a stream."""

    def __init__(self) -> None:
        self.head: dict = {}
        self.choices: dict[int, dict] = {}
        self.usage: dict | None = None

    def take(self, chunk: dict) -> None:
        if not self.head:
            self.head = {k: chunk.get(k) for k in ("id", "model", "system_fingerprint") if k in chunk}
            self.head["object"] = "text_completion" if chunk.get("object") == "text_completion" else "chat.completion"
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for c in chunk.get("choices") or ():
            if isinstance(c, dict):
                self.add_choice(c)

    def add_choice(self, c: dict) -> None:
        index = c.get("index", 0)
        text = self.head.get("object") == "text_completion"
        choice = self.choices.setdefault(index, {"index": index, "text": ""} if text else
                                         {"index": index, "message": {"role": "assistant", "content": None}})
        if c.get("finish_reason") is not None:
            choice["finish_reason"] = c["finish_reason"]
        if text:
            choice["text"] += c.get("text") or ""
            return
        delta, message = c.get("delta") or {}, choice["message"]
        if delta.get("role"):
            message["role"] = delta["role"]
        if delta.get("content"):
            message["content"] = (message["content"] or "") + delta["content"]
        for call in delta.get("tool_calls") or ():
            calls = message.setdefault("tool_calls", [])
            i = call.get("index", 0)
            while len(calls) <= i:
                calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
            target, function = calls[i], call.get("function") or {}
            if call.get("id"):
                target["id"] = call["id"]
            target["function"]["name"] += function.get("name") or ""
            target["function"]["arguments"] += function.get("arguments") or ""

    def answer(self) -> dict | None:
        """The assembled answer, or None when nothing usable arrived."""
        if self.too_large or not self.choices:
            return None
        answer = {**self.head, "created": int(time.time()),
                  "choices": [{"logprobs": None, "finish_reason": None, **self.choices[i]}
                              for i in sorted(self.choices)]}
        if self.usage is not None:
            answer["usage"] = self.usage
        return answer


def fresh(answer: Mapping[str, Any]) -> dict:
    """A stored answer with a new ``id``/``created`` (an embeddings list has neither)."""
    if answer.get("object") == "list":
        return dict(answer)
    prefix = "cmpl-" if answer.get("object") == "text_completion" else "chatcmpl-"
    return {**answer, "id": prefix + uuid.uuid4().hex, "created": int(time.time())}


def replay_chunks(answer: Mapping[str, Any], include_usage: bool) -> list[bytes]:
    """A (fresh) stored answer as the event payloads of a well-formed stream, ``[DONE]`` excluded:
    the content of each choice, its finish reason, and the usage chunk when asked for."""
    text = answer.get("object") == "text_completion"
    base = {"id": answer.get("id"), "object": "text_completion" if text else "chat.completion.chunk",
            "created": answer.get("created"), "model": answer.get("model")}
    if answer.get("system_fingerprint") is not None:
        base["system_fingerprint"] = answer["system_fingerprint"]
    out = []
    for c in answer.get("choices") or ():
        index, finish = c.get("index", 0), c.get("finish_reason")
        if text:
            out.append({**base, "choices": [{"text": c.get("text") or "", "index": index, "logprobs": None,
                                             "finish_reason": None}]})
            out.append({**base, "choices": [{"text": "", "index": index, "logprobs": None, "finish_reason": finish}]})
            continue
        message = c.get("message") or {}
        delta = {"role": message.get("role") or "assistant", "content": message.get("content")}
        if message.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
        out.append({**base, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]})
        out.append({**base, "choices": [{"index": index, "delta": {}, "logprobs": None, "finish_reason": finish}]})
    if include_usage and answer.get("usage") is not None:
        out.append({**base, "choices": [], "usage": answer["usage"]})
    return [orjson.dumps(chunk) for chunk in out]
