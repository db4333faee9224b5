"""The built-in ``mock/`` provider and LiteLLM's ``mock_response``: answered in-process,
deterministic, nothing goes upstream. Chat echoes the last user message; streams go word
by word. A ``mock_response`` naming a LiteLLM error (``litellm.RateLimitError``) raises it."""

from __future__ import annotations

import base64
import hashlib
import struct
import time
import uuid

import orjson

from ..errors import (InvalidRequestError, RateLimitError, UpstreamConnectionError,
                      UpstreamError, UpstreamTimeoutError)
from .base import Deployment, Provider, ProviderResponse

MOCK_ERRORS = {
    "litellm.RateLimitError": lambda: RateLimitError("litellm.RateLimitError: mock rate limit",
                                                     headers={"retry-after": "1"}, retryable=True),
    "litellm.InternalServerError": lambda: UpstreamError("litellm.InternalServerError: mock error",
                                                         status=500, retryable=True),
    "litellm.ServiceUnavailableError": lambda: UpstreamConnectionError(
        "litellm.ServiceUnavailableError: mock outage", retryable=True),
    "litellm.Timeout": lambda: UpstreamTimeoutError("litellm.Timeout: mock timeout", retryable=True),
    "litellm.BadRequestError": lambda: InvalidRequestError("litellm.BadRequestError: mock bad request"),
}
EMBEDDING_DIMENSIONS = 16
MAX_DIMENSIONS = 8192
MAX_CHOICES = 128


def text_of(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def words(text: str) -> int:
    return len(text.split())


class MockProvider(Provider):
    name = "mock"
    local = True

    def reply_text(self, d: Deployment, endpoint: str, body: dict) -> str:
        mock = body.get("mock_response", d.mock_response)
        if isinstance(mock, str) and mock in MOCK_ERRORS:
            raise MOCK_ERRORS[mock]()
        if mock is not None:
            return mock if isinstance(mock, str) else orjson.dumps(mock).decode()
        if endpoint == "completions":
            prompt = body.get("prompt")
            return prompt if isinstance(prompt, str) else " ".join(map(str, prompt or ()))
        users = [m for m in body.get("messages") or () if isinstance(m, dict) and m.get("role") == "user"]
        return text_of(users[-1].get("content")) if users else ""

    def prompt_tokens(self, endpoint: str, body: dict) -> int:
        if endpoint == "completions":
            return words(str(body.get("prompt", "")))
        return sum(words(text_of(m.get("content"))) for m in body.get("messages") or () if isinstance(m, dict))

    def respond(self, d: Deployment, endpoint: str, body: dict) -> ProviderResponse:
        if endpoint == "embeddings":
            return self.embed(d, body)
        text = self.reply_text(d, endpoint, body)
        usage = self.usage(endpoint, body, text)
        n = body.get("n") or 1
        if n > MAX_CHOICES:
            raise InvalidRequestError(f"n must be at most {MAX_CHOICES} for mock responses.", param="n")
        if endpoint == "completions":
            choices = [{"text": text, "index": i, "logprobs": None, "finish_reason": "stop"} for i in range(n)]
            obj = "text_completion"
        else:
            choices = [{"index": i, "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop", "logprobs": None} for i in range(n)]
            obj = "chat.completion"
        return ProviderResponse(orjson.dumps({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()),
            "model": d.model, "choices": choices, "usage": usage, "system_fingerprint": None}), usage)

    def count_tokens(self, d: Deployment, body: dict) -> int:
        return self.prompt_tokens("chat", body)

    def usage(self, endpoint: str, body: dict, text: str) -> dict:
        prompt, completion = self.prompt_tokens(endpoint, body), words(text)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def stream(self, d: Deployment, endpoint: str, body: dict) -> tuple[list[bytes], dict]:
        """The ``data:`` payloads of a streamed reply (without ``[DONE]``) and its usage."""
        text = self.reply_text(d, endpoint, body)
        usage = self.usage(endpoint, body, text)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": d.model,
                "object": "text_completion" if endpoint == "completions" else "chat.completion.chunk"}
        if include_usage:
            base["usage"] = None
        parts = text.split(" ")
        pieces = [p + " " for p in parts[:-1]] + [parts[-1]] if text else []

        def chunk(delta: dict | str, finish: str | None) -> bytes:
            if endpoint == "completions":
                choice = {"text": delta, "index": 0, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return orjson.dumps({**base, "choices": [choice]})

        if endpoint == "completions":
            out = [chunk(p, None) for p in pieces] + [chunk("", "stop")]
        else:
            out = ([chunk({"role": "assistant", "content": ""}, None)]
                   + [chunk({"content": p}, None) for p in pieces] + [chunk({}, "stop")])
        if include_usage:
            out.append(orjson.dumps({**base, "choices": [], "usage": usage}))
        return out, usage

    def embed(self, d: Deployment, body: dict) -> ProviderResponse:
        inputs = body["input"]
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        dims = body.get("dimensions") or EMBEDDING_DIMENSIONS
        if dims > MAX_DIMENSIONS:
            raise InvalidRequestError(f"dimensions must be at most {MAX_DIMENSIONS}.", param="dimensions")
        as_base64 = body.get("encoding_format") == "base64"
        data, tokens = [], 0
        for i, item in enumerate(inputs):
            text = item if isinstance(item, str) else " ".join(map(str, item if isinstance(item, list) else [item]))
            tokens += max(1, words(text))
            vector = self.vector(text, dims)
            value = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode() if as_base64 else vector
            data.append({"object": "embedding", "index": i, "embedding": value})
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return ProviderResponse(orjson.dumps({"object": "list", "data": data, "model": d.model, "usage": usage}),
                                usage)

    @staticmethod
    def vector(text: str, dims: int) -> list[float]:
        seed = hashlib.sha256(text.encode()).digest()
        while len(seed) < dims:
            seed += hashlib.sha256(seed).digest()
        return [round((b - 127.5) / 127.5, 6) for b in seed[:dims]]
