"""The response-cache part of ``LLMHandler``: look a request up, answer a hit (as JSON or a
replayed event stream), note a complete answer and store it once it has been sent. Entries are
OpenAI-shaped here; a handler for another wire format overrides the hooks under "How entries
look" (see ``messages.MessagesHandler``)."""

from __future__ import annotations

import orjson

from .cache import CacheUnavailable
from .cachekey import (ControlError, Controls, StreamAssembler, cache_key, controls, decode_entry, encode_entry,
                       fresh, replay_chunks, storable)
from .errors import InvalidRequestError
from .providers.base import event_object


class CachedAnswers:
    """Mixed into ``LLMHandler`` (which provides ``gw``, ``ctx``, ``output``, ``call_type``,
    ``trace`` and the response-writing methods)."""

    cache_plan: tuple[str, Controls] | None = None  # (key, controls) of a request that takes part in caching
    assembling = False                              # a streamed answer is to be assembled and stored
    assembler: StreamAssembler | None = None        # this attempt's assembler (see new_assembler)
    cache_answer: dict | None = None                 # the complete answer, once there is one to store

    async def answer_from_cache(self, body: dict, cache_body) -> bool:
        """Look the request up (when it takes part in caching); True once a hit was answered.
        A miss, or a cache that does not answer, sets up storing the answer instead."""
        call_type = self.call_type
        if call_type not in self.gw.cache_settings.call_types:
            return False
        try:
            c = controls({} if cache_body is None else {"cache": cache_body}, self.gw.cache_settings)
        except ControlError as exc:
            raise InvalidRequestError(str(exc), param="cache") from None
        if not c.use:
            return False
        group = self.gw.registry.resolve(body["model"])[0].model_name
        self.ctx.model_group = group
        key = cache_key(call_type, group, body)
        self.set_header("x-litellm-cache-key", key)
        self.cache_plan = (key, c)
        self.assembling = c.write and self.ctx.stream
        if not c.read:
            return False
        metrics = self.gw.metrics
        try:
            answer = decode_entry(await self.gw.cache.get(key, c.namespace), c.max_age)
        except CacheUnavailable:
            metrics.child(metrics.cache_errors, group).inc()
            return False
        if answer is None:
            metrics.child(metrics.cache_misses, group).inc()
            return False
        metrics.child(metrics.cache_hits, group).inc()
        self.answer_cached(self.fresh_answer(answer), body)
        return True

    def answer_cached(self, answer: dict, body: dict) -> None:
        """A hit: the stored answer as JSON, or replayed as an event stream; no provider call."""
        self.ctx.cache_hit = True
        self.ctx.usage = self.cached_usage(answer)
        if self.trace is not None:
            self.trace.response_answer(answer)
        self.set_header("x-litellm-cache-hit", "True")
        self.set_header("x-litellm-model-group", self.ctx.requested_model)
        if self.ctx.stream and answer.get("object") != "list":
            self.start_event_stream()
            self.write(self.replay(answer, body))
            self.finish()
            return
        self.set_duration_headers()
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps(answer))

    # How entries look: OpenAI-shaped here; MessagesHandler keeps Anthropic messages instead.

    @staticmethod
    def fresh_answer(answer: dict) -> dict:
        return fresh(answer)

    @staticmethod
    def cached_usage(answer: dict) -> dict | None:
        return answer.get("usage") if isinstance(answer.get("usage"), dict) else None

    def replay(self, answer: dict, body: dict) -> bytes:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return b"".join(self.output.event(p) for p in replay_chunks(answer, include_usage)) + self.output.end()

    def new_assembler(self):
        """What assembles this attempt's stream into one answer (fed the provider's payloads)."""
        return StreamAssembler()

    def cache_entry(self, answer: dict) -> dict | None:
        """What is stored for a complete answer (None: it is not kept)."""
        return answer if storable(answer) else None

    def keep_answer(self, data: bytes | None) -> None:
        """Note a complete answer (plain, or the assembled stream) to store once it has been sent."""
        if self.cache_plan is None or not self.cache_plan[1].write:
            return
        if data is not None:
            answer = event_object(data)
        else:
            answer = self.assembler.answer() if self.assembler is not None else None
            if answer is not None and "usage" not in answer and self.ctx.usage:
                answer["usage"] = self.ctx.usage
        if answer is not None:
            self.cache_answer = self.cache_entry(answer)

    async def store_in_cache(self, answer: dict) -> None:
        key, c = self.cache_plan
        data = encode_entry(answer)
        if data is None:
            return  # larger than cachekey.MAX_ENTRY_BYTES
        try:
            await self.gw.cache.set(key, c.namespace, data, c.ttl or self.gw.cache_settings.ttl)
        except CacheUnavailable:
            self.gw.metrics.child(self.gw.metrics.cache_errors, self.ctx.model_group).inc()
