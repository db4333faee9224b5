"""The pure parts of the images, audio and moderations endpoints: which providers serve them and
at what URL, reply checks, usage, per-unit cost and the default moderation group."""

from __future__ import annotations

import orjson
import pytest

from tornado_proxy.config import ModelSpec
from tornado_proxy.errors import UpstreamError
from tornado_proxy.health import probe_request, skip_reason
from tornado_proxy.media import public_path, usage_of
from tornado_proxy.providers import PROVIDERS
from tornado_proxy.providers.base import UpstreamReply
from tornado_proxy.providers.openai import COMPATIBLE, MEDIA_ENDPOINTS
from tornado_proxy.registry import build_deployment, build_registry
from tornado_proxy.spend import media_cost

KEY = "sk-unit-media-key"


def deployment(model: str, info: dict | None = None, **params):
    return build_deployment(ModelSpec("g", {"model": model, "api_key": KEY, **params}, info or {}, "model_list[0]"),
                            {})


@pytest.mark.parametrize("name", ["openai", "azure", *COMPATIBLE])
def test_openai_azure_and_compatible_providers_serve_them(name):
    assert PROVIDERS[name].media_endpoints == MEDIA_ENDPOINTS


@pytest.mark.parametrize("name", ["anthropic", "gemini", "ollama", "ollama_chat", "mock", "openrouter"])
def test_other_providers_do_not(name):
    assert not PROVIDERS[name].media_endpoints


@pytest.mark.parametrize("endpoint,path", [("moderation", "/moderations"), ("image_generation", "/images/generations"),
                                           ("audio_speech", "/audio/speech"),
                                           ("audio_transcription", "/audio/transcriptions"),
                                           ("audio_translation", "/audio/translations")])
def test_urls(endpoint, path):
    d = deployment("openai/whisper-1", api_base="http://vllm:8000/v1/")
    assert PROVIDERS["openai"].build_request(d, endpoint, {"model": "x"}, stream=False).url == "http://vllm:8000/v1" + path
    az = deployment("azure/my-dep", api_base="https://r.openai.azure.com", api_version="2024-10-21")
    assert PROVIDERS["azure"].build_upload_request(az, endpoint, "multipart/form-data; boundary=b").url == (
        f"https://r.openai.azure.com/openai/deployments/my-dep{path}?api-version=2024-10-21")


def test_json_requests_rewrite_model_and_keep_other_fields():
    d = deployment("openai/dall-e-3")
    req = PROVIDERS["openai"].build_request(d, "image_generation", {"model": "group", "prompt": "p", "quality": "hd",
                                                                   "num_retries": 2}, stream=False)
    assert orjson.loads(req.body) == {"model": "dall-e-3", "prompt": "p", "quality": "hd"}
    assert req.url == "https://api.openai.com/v1/images/generations"


def test_upload_request_head():
    d = deployment("openai/whisper-1", extra_headers={"X-Org": "o"})
    req = PROVIDERS["openai"].build_upload_request(d, "audio_transcription", "multipart/form-data; boundary=b")
    assert req.body is None and req.method == "POST"
    assert req.headers == {"Content-Type": "multipart/form-data; boundary=b", "X-Org": "o",
                           "Authorization": f"Bearer {KEY}"}
    az = deployment("azure/w", api_base="https://r.openai.azure.com")
    assert PROVIDERS["azure"].build_upload_request(az, "audio_translation", "m").headers["api-key"] == KEY


@pytest.mark.parametrize("endpoint,reply,ok", [
    ("moderation", {"id": "m", "results": []}, True), ("moderation", {"data": []}, False),
    ("image_generation", {"created": 1, "data": [{"url": "u"}]}, True), ("image_generation", {"created": 1}, False),
])
def test_replies_must_have_their_endpoints_field(endpoint, reply, ok):
    parse = lambda: PROVIDERS["openai"].parse_response(endpoint, UpstreamReply(200, {}, orjson.dumps(reply)))
    if ok:
        assert orjson.loads(parse().body) == reply
    else:
        with pytest.raises(UpstreamError):
            parse()


@pytest.mark.parametrize("reply,usage", [
    ({}, None), ({"usage": None}, None), ({"usage": {"type": "duration", "seconds": 3}}, None),
    ({"usage": {"prompt_tokens": 1, "total_tokens": 1}}, {"prompt_tokens": 1, "total_tokens": 1}),
    ({"usage": {"input_tokens": 5, "output_tokens": 7, "total_tokens": 12}},
     {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}),
    ({"usage": {"type": "tokens", "input_tokens": 5, "output_tokens": 7}},
     {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}),
])
def test_usage_in_chat_terms(reply, usage):
    assert usage_of(reply) == usage


def test_per_unit_costs():
    d = deployment("openai/dall-e-3", {"output_cost_per_image": 0.04})
    assert media_cost(d, "image_generation", 3) == pytest.approx(0.12)
    assert media_cost(d, "audio_speech", 3) == 0.0  # not priced that way
    speech = deployment("openai/tts-1", input_cost_per_character=0.000015)  # litellm_params work too
    assert media_cost(speech, "audio_speech", 1000) == pytest.approx(0.015)
    heard = deployment("openai/whisper-1", {"input_cost_per_second": 0.0001})
    assert media_cost(heard, "audio_translation", 60) == pytest.approx(0.006)
    assert media_cost(heard, "audio_transcription", 0) == 0.0
    assert media_cost(deployment("openai/whisper-1"), "audio_transcription", 60) == 0.0


def spec(name: str, model: str, info: dict | None = None, i: int = 0) -> ModelSpec:
    return ModelSpec(name, {"model": model}, info or {}, f"model_list[{i}]")


def test_default_moderation_group():
    reg = build_registry([spec("chat", "openai/gpt-4o"), spec("mod-a", "openai/omni-moderation-latest",
                                                             {"mode": "moderation"}, 1),
                          spec("mod-b", "openai/text-moderation-latest", {"mode": "moderation"}, 2)], {})
    assert reg.group_for_mode("moderation") == "mod-a"
    assert reg.group_for_mode("audio_speech") is None


def test_public_path():
    assert public_path("/moderations") == "/v1/moderations"
    assert public_path("/v1/audio/speech") == "/v1/audio/speech"


def test_health_probes_per_mode():
    mod = deployment("openai/omni-moderation-latest", {"mode": "moderation"})
    assert probe_request(mod) == ("moderation", {"model": "g", "input": "ping"})
    assert skip_reason(mod) is None
    for mode in ("image_generation", "audio_speech", "audio_transcription"):
        assert "billed" in skip_reason(deployment("openai/x", {"mode": mode}))
