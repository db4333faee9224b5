"""``/v1/completions`` end to end through the openai SDK: on a chat-only model (``gpt-4o-mini``,
``model_info.mode: chat``) the fake OpenAI provider is called at ``/chat/completions`` and the
answer comes back as a ``text_completion``, plain and streamed; ``*-instruct`` and ``mode:
completion`` models keep the native ``/completions``."""

import openai
import pytest

from .conftest import MASTER_KEY, PROVIDER_KEY, error_of


def entry(name: str, model: str, fake, info: str = "") -> str:
    out = f"""
  - model_name: {name}
    litellm_params:
      model: {model}
      api_base: {fake.base}
      api_key: {PROVIDER_KEY}"""
    return out + (f"\n    model_info: {info}" if info else "")


@pytest.fixture
async def gw(gateway, fake_openai):
    return await gateway("model_list:" + "".join([
        entry("gpt-fake", "openai/gpt-4o-mini", fake_openai),
        entry("instruct-fake", "openai/gpt-3.5-turbo-instruct", fake_openai),
        entry("llama-chat", "hosted_vllm/meta-llama/Llama-3-8B", fake_openai, "{mode: chat}"),
        entry("forced-native", "openai/gpt-4o-mini", fake_openai, "{mode: completion}"),
        entry("or-gpt", "openrouter/openai/gpt-4o", fake_openai),
    ]) + "\n")


async def test_a_chat_model_answers_a_text_completion_through_chat(client, fake_openai):
    reply = await client.completions.create(model="gpt-fake", prompt="say this", max_tokens=5, temperature=0,
                                            stop=["\n"], user="u1", seed=7)
    assert reply.object == "text_completion"
    [choice] = reply.choices
    assert (choice.text, choice.index, choice.finish_reason) == ("echo: say this", 0, "stop")
    assert reply.usage.prompt_tokens == 2 and reply.usage.completion_tokens == 3
    [sent] = fake_openai.received
    assert sent.path == "/v1/chat/completions"
    assert sent.body == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "say this"}],
                         "max_tokens": 5, "temperature": 0, "stop": ["\n"], "user": "u1", "seed": 7}


async def test_a_chat_model_streams_text_completion_chunks(client, fake_openai):
    stream = await client.completions.create(model="gpt-fake", prompt="say this", stream=True,
                                             stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert {c.object for c in chunks} == {"text_completion"}
    assert "".join(ch.text for c in chunks for ch in c.choices) == "echo: say this"
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 5
    [sent] = fake_openai.received
    assert sent.path == "/v1/chat/completions" and sent.body["stream"] is True
    assert sent.body["stream_options"] == {"include_usage": True}


async def test_n_choices_and_other_compatible_providers(client, fake_openai):
    reply = await client.completions.create(model="gpt-fake", prompt=["one prompt"], n=2)
    assert [c.text for c in reply.choices] == ["echo: one prompt"] * 2
    for model, upstream in (("llama-chat", "meta-llama/Llama-3-8B"), ("or-gpt", "openai/gpt-4o")):
        reply = await client.completions.create(model=model, prompt="hi")
        assert reply.object == "text_completion" and reply.choices[0].text == "echo: hi"
        assert fake_openai.received[-1].path == "/v1/chat/completions"
        assert fake_openai.received[-1].body["model"] == upstream


@pytest.mark.parametrize("model, upstream", [("instruct-fake", "gpt-3.5-turbo-instruct"),
                                             ("forced-native", "gpt-4o-mini")])
async def test_instruct_and_mode_completion_keep_the_native_endpoint(client, fake_openai, model, upstream):
    reply = await client.completions.create(model=model, prompt="say this", max_tokens=5, echo=False)
    assert reply.choices[0].text == "echo: say this"
    stream = await client.completions.create(model=model, prompt="say this", stream=True)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == "echo: say this"
    assert [r.path for r in fake_openai.received] == ["/v1/completions"] * 2
    assert fake_openai.received[0].body == {"model": upstream, "prompt": "say this", "max_tokens": 5, "echo": False}


async def test_what_chat_cannot_do_is_a_clear_400_without_a_call(gw, fetch, fake_openai):
    for body, param in (({"prompt": ["one", "two"]}, "prompt"), ({"prompt": [1, 2, 3]}, "prompt"),
                        ({"prompt": "x", "echo": True}, "echo"), ({"prompt": "x", "suffix": "end"}, "suffix"),
                        ({"prompt": "x", "best_of": 2}, "best_of")):
        r = await fetch(gw, "/v1/completions", {"model": "gpt-fake", **body})
        assert r.code == 400, r.body
        assert error_of(r)["param"] == param
    assert fake_openai.received == []
    r = await fetch(gw, "/v1/completions", {"model": "gpt-fake", "prompt": "x", "echo": True, "drop_params": True})
    assert r.code == 200
    assert fake_openai.received[-1].body == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}


async def test_litellm_settings_drop_params_drops_them_too(gateway, fake_openai):
    gw = await gateway("model_list:" + entry("gpt-fake", "openai/gpt-4o-mini", fake_openai) +
                       "\nlitellm_settings: {drop_params: true}\n")
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=MASTER_KEY, max_retries=0) as c:
        reply = await c.completions.create(model="gpt-fake", prompt="x", suffix="!", best_of=2, logprobs=2)
    assert reply.choices[0].text == "echo: x"
    assert fake_openai.received[-1].body == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}],
                                             "logprobs": True, "top_logprobs": 2}
