"""providers/completions_chat.py: a text completion on a chat-only model, as a chat call and back."""

import orjson
import pytest

from tornado_proxy.errors import InvalidRequestError
from tornado_proxy.providers import PROVIDERS
from tornado_proxy.providers.base import Deployment, StreamState, UpstreamReply
from tornado_proxy.providers.completions_chat import (COMPLETIONS_VIA_CHAT, chat_request, completion_logprobs,
                                                      serves_completions_as_chat, text_completion,
                                                      text_completion_chunk)


def dep(model: str, provider: str = "openai", **info) -> Deployment:
    return Deployment(id="d", model_name="g", provider=provider, model=model, api_base="http://up/v1",
                      model_info=info)


@pytest.mark.parametrize("model, info, expected", [
    ("gpt-3.5-turbo", {}, True),
    ("gpt-3.5-turbo-0125", {}, True),
    ("gpt-4", {}, True),
    ("gpt-4-turbo", {}, True),
    ("gpt-4o", {}, True),
    ("gpt-4o-mini-2024-07-18", {}, True),
    ("gpt-4.1-nano", {}, True),
    ("o1-mini", {}, True),
    ("o3", {}, True),
    ("o4-mini", {}, True),
    ("openai/gpt-4o", {}, True),                      # openrouter/openai/gpt-4o
    ("gpt-3.5-turbo-instruct", {}, False),            # the instruct models keep /completions
    ("gpt-3.5-turbo-instruct-0914", {}, False),
    ("davinci-002", {}, False),
    ("meta-llama/Llama-3-8B", {}, False),             # a vLLM model: its server has /completions
    ("meta-llama/Llama-3-8B", {"mode": "chat"}, True),
    ("gpt-4o-mini", {"mode": "completion"}, False),   # mode wins over the name
    ("text-embedding-3-small", {"mode": "embedding"}, False),
    ("my-azure-deployment", {"base_model": "azure/gpt-4o"}, True),
])
def test_which_deployments_serve_completions_through_chat(model, info, expected):
    assert serves_completions_as_chat(dep(model, **info)) is expected


def test_only_openai_compatible_providers_switch_endpoints():
    assert PROVIDERS["openai"].endpoint_for(dep("gpt-4o"), "completions") == COMPLETIONS_VIA_CHAT
    assert PROVIDERS["openai"].endpoint_for(dep("gpt-4o"), "chat") == "chat"
    assert PROVIDERS["openai"].endpoint_for(dep("gpt-3.5-turbo-instruct"), "completions") == "completions"
    for name in ("azure", "openrouter", "groq", "hosted_vllm"):
        assert PROVIDERS[name].endpoint_for(dep("gpt-4o", name), "completions") == COMPLETIONS_VIA_CHAT
    for name in ("gemini", "ollama", "anthropic", "mock"):  # they translate completions themselves
        assert PROVIDERS[name].endpoint_for(dep("gpt-4o", name), "completions") == "completions"


def test_the_prompt_becomes_one_user_message_and_parameters_pass_through():
    body = {"model": "g", "prompt": "say this", "max_tokens": 5, "temperature": 0.2, "top_p": 0.9, "stop": ["\n"],
            "n": 2, "user": "u1", "seed": 7, "stream": True, "stream_options": {"include_usage": True},
            "presence_penalty": 0.1, "logit_bias": {"50256": -100}}
    out = chat_request(body)
    assert out == {**{k: v for k, v in body.items() if k != "prompt"},
                   "messages": [{"role": "user", "content": "say this"}]}
    assert chat_request({"model": "g", "prompt": ["only one"]})["messages"] == [{"role": "user", "content": "only one"}]
    assert chat_request({"model": "g", "prompt": ""})["messages"] == [{"role": "user", "content": ""}]


@pytest.mark.parametrize("prompt, words", [
    (["one", "two"], "a list of 2 prompts"),
    ([1, 2, 3], "token ids"),
    ([[1, 2], [3]], "token ids"),
    ([], "token ids"),
])
def test_several_prompts_or_token_ids_are_a_400(prompt, words):
    with pytest.raises(InvalidRequestError) as caught:
        chat_request({"model": "g", "prompt": prompt})
    assert caught.value.param == "prompt" and words in caught.value.message


@pytest.mark.parametrize("name, value", [("echo", True), ("suffix", "end"), ("best_of", 3)])
def test_parameters_chat_has_not_are_a_400_unless_dropped(name, value):
    with pytest.raises(InvalidRequestError) as caught:
        chat_request({"model": "g", "prompt": "p", name: value})
    assert caught.value.param == name and "drop_params" in caught.value.message
    out = chat_request({"model": "g", "prompt": "p", name: value, "drop_params": True})
    assert name not in out


def test_their_default_values_are_dropped_quietly():
    out = chat_request({"model": "g", "prompt": "p", "echo": False, "suffix": None, "best_of": 1, "logprobs": None})
    assert set(out) == {"model", "messages"}


def test_integer_logprobs_become_chat_top_logprobs():
    assert chat_request({"model": "g", "prompt": "p", "logprobs": 3})["top_logprobs"] == 3
    assert chat_request({"model": "g", "prompt": "p", "logprobs": 0})["logprobs"] is True
    with pytest.raises(InvalidRequestError):
        chat_request({"model": "g", "prompt": "p", "logprobs": -1})


CHAT_REPLY = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-mini",
    "system_fingerprint": "fp_1",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hello there"}, "logprobs": None,
         "finish_reason": "stop"},
        {"index": 1, "message": {"role": "assistant", "content": None, "refusal": "no"}, "logprobs": None,
         "finish_reason": "length"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}


def test_a_chat_completion_becomes_a_text_completion():
    assert text_completion(CHAT_REPLY) == {
        "id": "chatcmpl-1", "object": "text_completion", "created": 1700000000, "model": "gpt-4o-mini",
        "system_fingerprint": "fp_1",
        "choices": [{"text": "Hello there", "index": 0, "logprobs": None, "finish_reason": "stop"},
                    {"text": "", "index": 1, "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


def test_stream_chunks_become_text_completion_chunks():
    head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    body = {**head, "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}], "usage": None}
    tail = {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    usage = {**head, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    out = [text_completion_chunk(c) for c in (head, body, tail, usage)]
    assert {c["object"] for c in out} == {"text_completion"}
    assert [[(ch["text"], ch["finish_reason"]) for ch in c["choices"]] for c in out] == [
        [("", None)], [("Hi", None)], [("", "stop")], []]
    assert "usage" not in out[0] and out[1]["usage"] is None and out[3]["usage"]["total_tokens"] == 2


def test_chat_logprobs_become_the_completions_shape():
    chat = {"content": [
        {"token": "Hel", "logprob": -0.1, "top_logprobs": [{"token": "Hel", "logprob": -0.1},
                                                           {"token": "Hi", "logprob": -2.5}]},
        {"token": "lo", "logprob": -0.2, "top_logprobs": []}]}
    assert completion_logprobs(chat) == {"tokens": ["Hel", "lo"], "token_logprobs": [-0.1, -0.2],
                                         "top_logprobs": [{"Hel": -0.1, "Hi": -2.5}, {}], "text_offset": [0, 3]}
    assert completion_logprobs(None) is None


def test_the_openai_adapter_sends_chat_and_answers_text_completion():
    provider, d = PROVIDERS["openai"], dep("gpt-4o-mini")
    request = provider.build_request(d, COMPLETIONS_VIA_CHAT, {"model": "g", "prompt": "hi", "drop_params": True,
                                                                "echo": True}, stream=False)
    assert request.url == "http://up/v1/chat/completions"
    assert orjson.loads(request.body) == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    reply = provider.parse_response(COMPLETIONS_VIA_CHAT, UpstreamReply(200, {}, orjson.dumps(CHAT_REPLY)))
    assert orjson.loads(reply.body)["choices"][0]["text"] == "Hello there" and reply.usage["total_tokens"] == 5
    state = StreamState()
    [chunk] = provider.parse_event(COMPLETIONS_VIA_CHAT, orjson.dumps(
        {"id": "c", "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}), state)
    assert orjson.loads(chunk)["choices"][0]["text"] == "Hi" and state.error is None
    assert provider.parse_event(COMPLETIONS_VIA_CHAT, b"{not json}", state) == [] and state.error.status == 502
