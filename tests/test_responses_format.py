"""The Responses API translation (``providers/responses_format.py``) and the pass-through pieces
of the OpenAI / Azure adapters: pure functions, no servers."""

from __future__ import annotations

import orjson
import pytest

from tornado_proxy.config import Secret
from tornado_proxy.errors import InvalidRequestError, UpstreamError
from tornado_proxy.providers import PROVIDERS
from tornado_proxy.providers.base import Deployment, StreamState
from tornado_proxy.providers.responses_format import (ChunksToEvents, PassThroughOutput, ResponseDraft,
                                                      TranslatedOutput, chat_usage, check_tools, input_items,
                                                      to_chat_request, to_response)
from tornado_proxy.sse import SseParser

USER_ITEM = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}
TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}


def chat(body: dict, history: list | None = None) -> dict:
    check_tools(body)
    return to_chat_request(body, (history or []) + input_items(body.get("input")))


def events(data: bytes) -> list[tuple[str, dict]]:
    parser = SseParser()
    return [(e.event, orjson.loads(e.data)) for e in parser.feed(data) + parser.close()]


def chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None) -> bytes:
    out = {"id": "c", "model": "m-1", "choices": [] if delta is None else
           [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage is not None:
        out["usage"] = usage
    return orjson.dumps(out)


# --- request ---------------------------------------------------------------------------------

def test_string_input_and_parameters():
    assert input_items("hi") == [USER_ITEM]
    out = chat({"model": "m", "input": "hi", "instructions": "be brief", "max_output_tokens": 7, "temperature": 0,
                "top_p": 0.5, "user": "u", "metadata": {"a": "b"}, "store": False, "truncation": "auto",
                "reasoning": {"effort": "high", "summary": "auto"}, "stream": True})
    assert out == {"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                              {"role": "user", "content": "hi"}],
                   "max_tokens": 7, "temperature": 0, "top_p": 0.5, "user": "u", "reasoning_effort": "high",
                   "stream": True, "stream_options": {"include_usage": True}}


def test_items_become_chat_messages():
    items = [
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": [{"type": "input_text", "text": "see"},
                                     {"type": "input_image", "image_url": "data:image/png;base64,AA", "detail": "low"},
                                     {"type": "input_file", "file_data": "data:application/pdf;base64,AA",
                                      "filename": "a.pdf"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me check."}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"x":1}'},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
    ]
    assert chat({"model": "m", "input": items})["messages"] == [
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": [
            {"type": "text", "text": "see"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA", "detail": "low"}},
            {"type": "file", "file": {"file_data": "data:application/pdf;base64,AA", "filename": "a.pdf"}}]},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"}]


def test_function_call_alone_opens_an_assistant_message_and_history_comes_first():
    history = [USER_ITEM, {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}]
    out = chat({"model": "m", "input": [{"type": "function_call_output", "call_id": "c1", "output": "ok"}]}, history)
    assert out["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]


def test_tools_choice_and_text_format():
    out = chat({"model": "m", "input": "hi", "parallel_tool_calls": False, "tool_choice": "required",
                "tools": [{**TOOL, "description": "d", "strict": True}],
                "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}})
    assert out["tools"] == [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"},
                                                              "description": "d", "strict": True}}]
    assert out["tool_choice"] == "required" and out["parallel_tool_calls"] is False
    assert out["response_format"] == {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    named = chat({"model": "m", "input": "hi", "tools": [TOOL], "tool_choice": {"type": "function", "name": "f"}})
    assert named["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert chat({"model": "m", "input": "hi", "text": {"format": {"type": "json_object"}}})["response_format"] == {
        "type": "json_object"}
    plain = chat({"model": "m", "input": "hi", "text": {"format": {"type": "text"}}, "tool_choice": "auto"})
    assert "response_format" not in plain and "tool_choice" not in plain  # no tools: no tool_choice


@pytest.mark.parametrize("tool", ["web_search", "web_search_preview", "file_search", "computer_use_preview",
                                  "code_interpreter", "image_generation", "mcp", "local_shell", "custom"])
def test_built_in_tools_are_refused_by_name(tool):
    with pytest.raises(InvalidRequestError) as info:
        chat({"model": "m", "input": "hi", "tools": [TOOL, {"type": tool}]})
    assert f"'{tool}'" in info.value.message and info.value.param == "tools[1].type"


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function"}]}, "tools[0].name"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice.type"),
    ({"background": True}, "background"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
     "input[0].content[0].image_url"),
    ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input[0].content[0].type"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"text": {"format": {"type": "grammar"}}}, "text.format.type"),
])
def test_what_chat_cannot_express_is_a_400(body, param):
    with pytest.raises(InvalidRequestError) as info:
        chat({"model": "m", "input": "hi", **body})
    assert info.value.param == param


# --- answer ----------------------------------------------------------------------------------

def test_chat_answer_becomes_a_response():
    draft = ResponseDraft.of({"model": "grp", "instructions": "i", "metadata": {"a": "b"}, "store": False,
                              "tools": [TOOL], "previous_response_id": "resp_0"})
    answer = {"model": "m-1", "choices": [{"finish_reason": "tool_calls", "message": {
        "content": "Checking.", "tool_calls": [{"id": "call_1", "function": {"name": "get_weather",
                                                                               "arguments": '{"a":1}'}}]}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                  "prompt_tokens_details": {"cached_tokens": 2}, "completion_tokens_details": {"reasoning_tokens": 1}}}
    r = to_response(answer, draft)
    assert r["id"] == draft.id and r["id"].startswith("resp_") and r["object"] == "response"
    assert (r["status"], r["model"], r["instructions"], r["metadata"], r["store"]) == (
        "completed", "m-1", "i", {"a": "b"}, False)
    assert r["previous_response_id"] == "resp_0" and r["tools"] == [TOOL] and r["error"] is None
    message, call = r["output"]
    assert message["type"] == "message" and message["id"].startswith("msg_") and message["role"] == "assistant"
    assert message["content"] == [{"type": "output_text", "text": "Checking.", "annotations": [], "logprobs": []}]
    assert {k: call[k] for k in ("type", "call_id", "name", "arguments", "status")} == {
        "type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"a":1}',
        "status": "completed"}
    assert r["usage"] == {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 2}, "output_tokens": 3,
                          "output_tokens_details": {"reasoning_tokens": 1}, "total_tokens": 8}
    cut = to_response({"choices": [{"finish_reason": "length", "message": {"content": "a"}}]}, draft)
    assert cut["status"] == "incomplete" and cut["incomplete_details"] == {"reason": "max_output_tokens"}
    assert cut["model"] == "grp" and cut["output"][0]["status"] == "incomplete"


def test_usage_conversions():
    assert chat_usage({"input_tokens": 4, "output_tokens": 6, "total_tokens": 10,
                       "input_tokens_details": {"cached_tokens": 1}}) == {
        "prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10, "prompt_tokens_details": {"cached_tokens": 1}}
    assert chat_usage(None) is None


# --- stream ----------------------------------------------------------------------------------

def test_text_stream_events_in_order():
    out = TranslatedOutput(ResponseDraft.of({"model": "grp"}))
    data = out.event(chunk({"role": "assistant", "content": ""})) + out.event(chunk({"content": "Hel"}))
    data += out.event(chunk({"content": "lo"})) + out.event(chunk({}, "stop"))
    data += out.event(chunk(usage={"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4})) + out.end()
    got = events(data)
    assert [n for n, _ in got] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [d["sequence_number"] for _, d in got] == list(range(10))
    assert all(d["type"] == n for n, d in got)
    assert got[0][1]["response"]["status"] == "in_progress" and got[0][1]["response"]["output"] == []
    item_id = got[2][1]["item"]["id"]
    assert {d["item_id"] for _, d in got[3:8]} == {item_id} == {got[8][1]["item"]["id"]}
    assert [d["delta"] for n, d in got if n.endswith(".delta")] == ["Hel", "lo"]
    assert got[6][1]["text"] == "Hello"
    final = got[-1][1]["response"]
    assert final == out.final
    assert final["status"] == "completed" and final["model"] == "m-1" and final["usage"]["total_tokens"] == 4
    assert final["output"] == [got[8][1]["item"]]
    assert final["output"][0]["content"][0]["text"] == "Hello"


def test_tool_call_stream_opens_one_item_per_call():
    stream = ChunksToEvents(ResponseDraft.of({"model": "grp"}))
    data = stream.feed(chunk({"content": "Sure."}))
    for index, call_id, name in ((0, "call_a", "f"), (1, "call_b", "g")):
        data += stream.feed(chunk({"tool_calls": [{"index": index, "id": call_id, "function": {
            "name": name, "arguments": ""}}]}))
        data += stream.feed(chunk({"tool_calls": [{"index": index, "function": {"arguments": '{"x"'}}]}))
        data += stream.feed(chunk({"tool_calls": [{"index": index, "function": {"arguments": ":1}"}}]}))
    data += stream.feed(chunk({}, "tool_calls")) + stream.end()
    got = events(data)
    added = [d for n, d in got if n == "response.output_item.added"]
    assert [(d["output_index"], d["item"]["type"]) for d in added] == [(0, "message"), (1, "function_call"),
                                                                        (2, "function_call")]
    dones = [d for n, d in got if n == "response.function_call_arguments.done"]
    assert [(d["output_index"], d["name"], d["arguments"]) for d in dones] == [(1, "f", '{"x":1}'),
                                                                                (2, "g", '{"x":1}')]
    final = got[-1][1]["response"]
    assert [(o["type"], o.get("call_id")) for o in final["output"]] == [("message", None), ("function_call", "call_a"),
                                                                        ("function_call", "call_b")]


def test_length_stream_ends_incomplete_and_failure_ends_failed():
    stream = ChunksToEvents(ResponseDraft.of({"model": "grp"}))
    got = events(stream.feed(chunk({"content": "a"}, "length")) + stream.end())
    assert got[-1][0] == "response.incomplete"
    assert got[-1][1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert got[-2][0] == "response.output_item.done" and got[-2][1]["item"]["status"] == "incomplete"

    stream = ChunksToEvents(ResponseDraft.of({"model": "grp"}))
    got = events(stream.feed(chunk({"content": "a"})) + stream.failed(UpstreamError("boom", status=502)))
    assert [n for n, _ in got[-2:]] == ["error", "response.failed"]
    assert got[-2][1] == {"type": "error", "code": "server_error", "message": "boom", "param": None,
                          "sequence_number": len(got) - 2}
    assert got[-1][1]["response"]["status"] == "failed"
    assert got[-1][1]["response"]["error"] == {"code": "server_error", "message": "boom"}


def test_pass_through_output_names_events_and_keeps_the_response():
    out = PassThroughOutput()
    created = orjson.dumps({"type": "response.created", "sequence_number": 0, "response": {"id": "resp_x"}})
    assert out.event(created) == b"event: response.created\ndata: " + created + b"\n\n"
    done = {"type": "response.completed", "sequence_number": 1, "response": {"id": "resp_x", "status": "completed"}}
    out.event(orjson.dumps(done))
    assert out.final == done["response"]
    name, error = events(out.error_event(UpstreamError("cut", status=502)))[0]
    assert name == "error" and error["sequence_number"] == 2 and error["message"] == "cut"
    assert out.body(b'{"id":"resp_y"}') == b'{"id":"resp_y"}' and out.final == {"id": "resp_y"}


# --- the OpenAI and Azure adapters -------------------------------------------------------------

def deployment(provider: str, model: str = "gpt-4o", api_base: str = "https://api.example.com/v1",
               api_version: str | None = None) -> Deployment:
    return Deployment(id="d1", model_name="g", provider=provider, model=model, api_base=api_base,
                      api_key=Secret("sk-x"), api_version=api_version)


def test_which_providers_pass_through():
    assert {name for name, p in PROVIDERS.items() if "responses" in p.passthrough_endpoints} == {"openai", "azure"}


def test_openai_request_and_stored_response_urls():
    openai = PROVIDERS["openai"]
    d = deployment("openai")
    request = openai.build_request(d, "responses", {"model": "g", "input": "hi", "stream": True,
                                                    "num_retries": 2, "store": False}, stream=True)
    assert request.url == "https://api.example.com/v1/responses"
    assert orjson.loads(request.body) == {"model": "gpt-4o", "input": "hi", "stream": True, "store": False}
    get = openai.stored_response_request(d, "GET", "resp_1")
    assert (get.method, get.url, get.body) == ("GET", "https://api.example.com/v1/responses/resp_1", None)
    assert get.headers["Authorization"] == "Bearer sk-x"
    with pytest.raises(InvalidRequestError):
        openai.stored_response_request(d, "GET", "../chat")


@pytest.mark.parametrize("version, url", [
    ("2025-04-01-preview", "https://r.openai.azure.com/openai/responses?api-version=2025-04-01-preview"),
    ("2024-10-21", "https://r.openai.azure.com/openai/v1/responses"),
    ("preview", "https://r.openai.azure.com/openai/v1/responses?api-version=preview"),
    ("v1", "https://r.openai.azure.com/openai/v1/responses"),
])
def test_azure_responses_url(version, url):
    azure = PROVIDERS["azure"]
    d = deployment("azure", "my-deploy", "https://r.openai.azure.com", version)
    request = azure.build_request(d, "responses", {"model": "g", "input": "hi"}, stream=False)
    assert request.url == url and orjson.loads(request.body)["model"] == "my-deploy"
    assert request.headers["api-key"] == "sk-x"
    base, _, query = url.partition("?")
    assert azure.stored_response_request(d, "DELETE", "resp_9").url == base + "/resp_9" + ("?" + query if query
                                                                                             else "")


def test_openai_relays_response_events_and_notes_usage():
    openai, state = PROVIDERS["openai"], StreamState()
    delta = b'{"type":"response.output_text.delta","delta":"hi","sequence_number":3}'
    assert openai.parse_event("responses", delta, state) == [delta]
    done = orjson.dumps({"type": "response.completed", "sequence_number": 4, "response": {
        "id": "r", "error": None, "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}}})
    assert openai.parse_event("responses", done, state) == [done]
    assert state.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5} and state.done
    error = b'{"type":"error","code":"rate_limit_exceeded","message":"slow down","param":null,"sequence_number":5}'
    assert openai.parse_event("responses", error, StreamState()) == []
    state = StreamState()
    openai.parse_event("responses", error, state)
    assert state.error.status == 429 and "slow down" in state.error.message
    state = StreamState()
    openai.parse_event("responses", b"not json", state)
    assert state.error is not None


@pytest.mark.parametrize("body, param", [
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call_output", "call_id": "c1"}]}, "input[0].output"),
    ({"input": [{"type": "function_call", "call_id": "c1", "arguments": "{}"}]}, "input[0].name"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}, "text.format.schema"),
])
def test_missing_required_item_fields_are_400s_naming_them(body, param):
    with pytest.raises(InvalidRequestError) as info:
        chat({"model": "m", **body})
    assert info.value.param == param
