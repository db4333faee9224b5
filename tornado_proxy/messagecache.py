"""Response caching for ``POST /v1/messages``, the pure part. An entry is always an Anthropic
``message``, whether the answer came from an ``anthropic/`` deployment (its body, or its event
stream assembled by ``MessageAssembler``) or from a translated one (the OpenAI answer rewritten).
A hit is that message with a fresh ``id``, or replayed as a well-formed Anthropic event stream
(``replay_events``). Keys and the shared entry format are in ``cachekey.py``. No I/O."""

from __future__ import annotations

import uuid
from typing import Any, Mapping

import orjson

from .cachekey import BoundedAssembler
from .providers.anthropic_format import event, to_anthropic_message

# How a complete answer ends (a refusal, a pause_turn or a cut stream is not kept).
STORABLE_STOP = frozenset({"end_turn", "max_tokens", "stop_sequence", "tool_use"})
# The same for a translated (OpenAI-shaped) answer, before it is rewritten.
STORABLE_FINISH = frozenset({"stop", "length", "tool_calls"})
INPUT_BLOCKS = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})  # streamed as input_json_delta


def storable_message(message: Mapping[str, Any]) -> bool:
    """A complete Anthropic message: content blocks, usage, and a stop reason that ends a turn."""
    content = message.get("content")
    return (message.get("type") == "message" and message.get("stop_reason") in STORABLE_STOP
            and isinstance(content, list) and all(isinstance(b, Mapping) and isinstance(b.get("type"), str)
                                                  for b in content)
            and isinstance(message.get("usage"), Mapping))


def message_entry(answer: Mapping[str, Any], model: str) -> dict | None:
    """What is stored for an answer to /v1/messages (None: nothing). ``answer`` is an Anthropic
    message (pass-through) or the OpenAI chat answer of a translated call."""
    if answer.get("type") == "message":
        return dict(answer) if storable_message(answer) else None
    choices = answer.get("choices")
    if not (isinstance(choices, list) and len(choices) == 1 and isinstance(choices[0], Mapping)
            and choices[0].get("finish_reason") in STORABLE_FINISH):
        return None
    message = to_anthropic_message(dict(answer), model)
    return message if storable_message(message) else None


def fresh_message(message: Mapping[str, Any]) -> dict:
    return {**message, "id": "msg_" + uuid.uuid4().hex[:24]}


class MessageAssembler(BoundedAssembler):
    """Builds one Anthropic ``message`` from the events of a pass-through stream (their JSON
    payloads, as ``relay_event`` hands them on); no answer unless ``message_stop`` arrived."""

    def __init__(self) -> None:
        self.message: dict | None = None
        self.blocks: dict[int, dict] = {}
        self.partial_json: dict[int, str] = {}
        self.done = False

    def take(self, ev: dict) -> None:
        kind = ev.get("type")
        if kind == "message_start" and isinstance(ev.get("message"), dict):
            self.message = {**ev["message"], "content": []}
        elif kind == "content_block_start" and isinstance(ev.get("content_block"), dict):
            self.blocks[ev.get("index", 0)] = dict(ev["content_block"])
        elif kind == "content_block_delta" and isinstance(ev.get("delta"), dict):
            self.add_delta(ev.get("index", 0), ev["delta"])
        elif kind == "content_block_stop":
            self.close_block(ev.get("index", 0))
        elif kind == "message_delta" and self.message is not None:
            self.message.update({k: v for k, v in (ev.get("delta") or {}).items() if k in ("stop_reason", "stop_sequence")})
            if isinstance(ev.get("usage"), dict):
                usage = self.message.setdefault("usage", {})
                usage.update({k: v for k, v in ev["usage"].items() if v is not None})
        elif kind == "message_stop":
            self.done = True

    def add_delta(self, index: int, delta: dict) -> None:
        block = self.blocks.get(index)
        if block is None:
            return
        kind = delta.get("type")
        if kind == "text_delta":
            block["text"] = (block.get("text") or "") + (delta.get("text") or "")
        elif kind == "input_json_delta":
            self.partial_json[index] = self.partial_json.get(index, "") + (delta.get("partial_json") or "")
        elif kind == "thinking_delta":
            block["thinking"] = (block.get("thinking") or "") + (delta.get("thinking") or "")
        elif kind == "signature_delta":
            block["signature"] = delta.get("signature")
        elif kind == "citations_delta" and delta.get("citation") is not None:
            block.setdefault("citations", []).append(delta["citation"])

    def close_block(self, index: int) -> None:
        text = self.partial_json.pop(index, "")
        block = self.blocks.get(index)
        if block is None or not text:
            return
        try:
            block["input"] = orjson.loads(text)
        except orjson.JSONDecodeError:
            self.too_large = True  # a tool input that does not parse: the answer is not kept

    def answer(self) -> dict | None:
        if self.too_large or not self.done or self.message is None or self.partial_json:
            return None
        return {**self.message, "content": [self.blocks[i] for i in sorted(self.blocks)]}


def replay_events(message: Mapping[str, Any]) -> bytes:
    """A stored message as Anthropic's event stream: ``message_start``, a start/delta/stop run
    per content block, ``message_delta`` with the stop reason and usage, ``message_stop``."""
    usage = dict(message.get("usage") or {})
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {**usage, "output_tokens": 0}}
    out = [event("message_start", {"type": "message_start", "message": start})]
    for index, block in enumerate(message.get("content") or ()):
        opening, deltas = block_events(block)
        out.append(event("content_block_start", {"type": "content_block_start", "index": index,
                                                 "content_block": opening}))
        out += [event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
                for d in deltas]
        out.append(event("content_block_stop", {"type": "content_block_stop", "index": index}))
    out.append(event("message_delta", {"type": "message_delta",
                                       "delta": {"stop_reason": message.get("stop_reason"),
                                                 "stop_sequence": message.get("stop_sequence")},
                                       "usage": usage}))
    out.append(event("message_stop", {"type": "message_stop"}))
    return b"".join(out)


def block_events(block: Mapping[str, Any]) -> tuple[dict, list[dict]]:
    """A content block's ``content_block_start`` block and its deltas, as Anthropic streams it."""
    kind = block.get("type")
    if kind == "text":
        return {**block, "text": ""}, [{"type": "text_delta", "text": block.get("text") or ""}]
    if kind in INPUT_BLOCKS:
        return {**block, "input": {}}, [{"type": "input_json_delta",
                                         "partial_json": orjson.dumps(block.get("input") or {}).decode()}]
    if kind == "thinking":
        return {**block, "thinking": "", "signature": ""}, [
            {"type": "thinking_delta", "thinking": block.get("thinking") or ""},
            {"type": "signature_delta", "signature": block.get("signature") or ""}]
    return dict(block), []  # redacted_thinking, server tool results: whole in the start event
