import orjson

from .conftest import error_of, provider_yaml


async def test_chat_through_fake_provider(gateway, fetch, fake_openai):
    gw = await gateway(provider_yaml(fake_openai))
    r = await fetch(gw, "/v1/chat/completions",
                    {"model": "gpt-fake", "messages": [{"role": "user", "content": "hi there"}], "temperature": 0.3})
    assert r.code == 200, r.body
    body = orjson.loads(r.body)
    assert body["choices"][0]["message"]["content"] == "echo: hi there"
    sent = fake_openai.received[-1]
    assert sent.body["model"] == "gpt-4o-mini" and sent.body["temperature"] == 0.3
    assert sent.headers["authorization"] == "Bearer sk-provider-secret-9876543210"


async def test_unknown_model(gateway, fetch, fake_openai):
    gw = await gateway(provider_yaml(fake_openai))
    r = await fetch(gw, "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert r.code == 400
    assert "nope" in error_of(r)["message"]
