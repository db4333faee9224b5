"""``/v1/completions`` on a model whose upstream has only chat (OpenAI's ``gpt-4o``, a
``model_info.mode: chat`` deployment): the text completion becomes a chat call and its answer a
``text_completion`` again, plain and streamed, as LiteLLM's ``text_completion`` does for chat
models. Pure functions; ``providers/openai.py`` calls them for OpenAI-compatible providers.

Request: the prompt becomes one user message; ``max_tokens``, ``temperature``, ``top_p``,
``stop``, ``n``, ``user``, ``seed``, ``stream``, ``stream_options`` (and any other parameter) pass
through; an integer ``logprobs`` becomes chat's ``logprobs: true`` + ``top_logprobs``. ``echo``,
``suffix`` and ``best_of`` have no chat equivalent: a value other than the default is a 400 (as
LiteLLM, whose call to the chat API fails on them), or dropped with ``drop_params``. Several
prompts, or token ids, are a 400: a chat call answers one text prompt.

Reply: each choice's ``message.content`` (a stream chunk's ``delta.content``) becomes ``text``;
``finish_reason``, ``usage``, ``id``, ``created``, ``model`` are kept; chat logprobs become the
completions shape (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import orjson

from ..errors import InvalidRequestError
from .base import Deployment

# The pseudo-endpoint a provider's ``endpoint_for`` answers for such a deployment.
COMPLETIONS_VIA_CHAT = "completions_via_chat"

# OpenAI's chat-only model names (the instruct models keep the native completions endpoint).
CHAT_MODEL = re.compile(r"^(gpt-3\.5-turbo|gpt-4|gpt-5|chatgpt-|o1|o3|o4)(?!.*instruct)")
# Completions parameters with no chat equivalent, and the value that means "not used".
NO_CHAT_EQUIVALENT = {"echo": False, "suffix": None, "best_of": 1}


def serves_completions_as_chat(d: Deployment) -> bool:
    """``model_info.mode: chat`` says so; ``mode: completion`` (or any other mode) says not;
    without a mode, OpenAI's chat model names (``base_model`` when set, the last segment of the
    model id: ``openrouter/openai/gpt-4o`` is ``gpt-4o``) are chat-only, ``*-instruct`` not."""
    mode = d.model_info.get("mode")
    if mode is not None:
        return mode == "chat"
    model = str(d.model_info.get("base_model") or d.model).rsplit("/", 1)[-1].lower()
    return CHAT_MODEL.match(model) is not None


# --- request ---------------------------------------------------------------------------------

def chat_request(body: Mapping[str, Any]) -> dict:
    """A completions request body -> the chat request body for the same answer."""
    out = dict(body)
    out["messages"] = [{"role": "user", "content": one_prompt(out.pop("prompt", None))}]
    drop = out.get("drop_params") is True
    for name, default in NO_CHAT_EQUIVALENT.items():
        value = out.pop(name, None)
        if value is not None and value != default and not drop:
            raise InvalidRequestError(
                f"{name} is not supported for model={body.get('model')}: it is served through the chat API, "
                f"which has no {name}. Leave it out, or send `drop_params: true` to have it dropped.", param=name)
    logprobs = out.pop("logprobs", None)
    if logprobs is not None and logprobs is not False:
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0:
            raise InvalidRequestError("logprobs must be a non-negative integer.", param="logprobs")
        out["logprobs"] = True
        out["top_logprobs"] = logprobs
    return out


def one_prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        why = f"a list of {len(prompt)} prompts"
    else:
        why = "token ids"
    raise InvalidRequestError(f"This model is served through the chat API, which takes one text prompt per "
                              f"request, not {why}; send one string (one request per prompt).", param="prompt")


# --- reply -----------------------------------------------------------------------------------

def text_completion(reply: dict) -> dict:
    """A ``chat.completion`` object -> the ``text_completion`` object."""
    out = envelope(reply)
    out["choices"] = [text_choice(c, (c.get("message") or {}) if isinstance(c, dict) else {})
                      for c in reply.get("choices") or ()]
    out["usage"] = reply.get("usage")
    return out


def text_completion_chunk(chunk: dict) -> dict:
    """A ``chat.completion.chunk`` -> a streamed ``text_completion`` chunk (a usage-only chunk
    keeps its empty ``choices``)."""
    out = envelope(chunk)
    out["choices"] = [text_choice(c, (c.get("delta") or {}) if isinstance(c, dict) else {})
                      for c in chunk.get("choices") or ()]
    if "usage" in chunk:
        out["usage"] = chunk["usage"]
    return out


def text_completion_bytes(data: bytes) -> bytes:
    return orjson.dumps(text_completion(orjson.loads(data)))


def envelope(obj: dict) -> dict:
    return {"id": obj.get("id"), "object": "text_completion", "created": obj.get("created"),
            "model": obj.get("model"), "system_fingerprint": obj.get("system_fingerprint")}


def text_choice(choice: Any, message: dict) -> dict:
    choice = choice if isinstance(choice, dict) else {}
    content = message.get("content") if isinstance(message, dict) else None
    return {"text": content if isinstance(content, str) else "", "index": choice.get("index", 0),
            "logprobs": completion_logprobs(choice.get("logprobs")), "finish_reason": choice.get("finish_reason")}


def completion_logprobs(logprobs: Any) -> dict | None:
    """Chat's ``{"content": [{"token", "logprob", "top_logprobs": [...]}]}`` -> the completions
    shape; None when there are none."""
    items = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(items, list):
        return None
    tokens, token_logprobs, top, offsets, offset = [], [], [], [], 0
    for item in items:
        if not isinstance(item, dict):
            continue
        token = item.get("token") if isinstance(item.get("token"), str) else ""
        tokens.append(token)
        token_logprobs.append(item.get("logprob"))
        top.append({t["token"]: t.get("logprob") for t in item.get("top_logprobs") or ()
                    if isinstance(t, dict) and isinstance(t.get("token"), str)})
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}
