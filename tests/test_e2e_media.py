"""End to end, the images, audio and moderations endpoints: the official openai SDK (and raw
HTTP where the SDK would hide what is tested) through the gateway to the fake OpenAI / Azure /
OpenAI-compatible server, which parses what it gets (JSON, or a real multipart body) and echoes
it back. Spend rows, key model access and rate limits are checked against the real PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import tracemalloc
import warnings

import openai
import orjson
import pytest
from tornado.iostream import IOStream

from contrib.fake_providers.openai_compat import speech_audio

from .conftest import MASTER_KEY, PROVIDER_KEY, error_of, wait_for
from .test_spend import query, rows_present

MB = 1024 * 1024
AUDIO = b"RIFF" + bytes(range(256)) * 64  # 16 KB standing for a wav file


def config_yaml(fake, dsn: str | None = None, limit_mb: float = 8, extra: str = "") -> str:
    azure = f"api_base: http://127.0.0.1:{fake.port}, api_key: {PROVIDER_KEY}, api_version: '2024-10-21'"
    openai_ = f'api_base: "{fake.base}", api_key: {PROVIDER_KEY}'
    database = f'  store_model_in_db: true\n  database_url: "{dsn}"\n' if dsn else ""
    return f"""
model_list:
  - model_name: chat
    litellm_params: {{model: openai/gpt-4o-mini, {openai_}}}
  - model_name: mod
    litellm_params: {{model: openai/omni-moderation-latest, {openai_}}}
    model_info: {{mode: moderation}}
  - model_name: dalle
    litellm_params: {{model: openai/dall-e-3, {openai_}}}
    model_info: {{mode: image_generation, output_cost_per_image: 0.04}}
  - model_name: gpt-image
    litellm_params: {{model: openai/gpt-image-1, {openai_}}}
    model_info: {{mode: image_generation, input_cost_per_token: 0.000005, output_cost_per_token: 0.00004}}
  - model_name: tts
    litellm_params: {{model: openai/tts-1, {openai_}}}
    model_info: {{mode: audio_speech, input_cost_per_character: 0.000015}}
  - model_name: whisper
    litellm_params: {{model: openai/whisper-1, {openai_}}}
    model_info: {{mode: audio_transcription, input_cost_per_second: 0.0001}}
  - model_name: vllm-whisper
    litellm_params: {{model: hosted_vllm/whisper-large-v3, {openai_}}}
  - model_name: azure-dalle
    litellm_params: {{model: azure/my-dalle, {azure}}}
  - model_name: azure-whisper
    litellm_params: {{model: azure/my-whisper, {azure}}}
  - model_name: azure-tts
    litellm_params: {{model: azure/my-tts, {azure}}}
  - model_name: claude
    litellm_params: {{model: anthropic/claude-3-5-haiku-latest, api_key: sk-ant-unused}}
  - model_name: ollama-x
    litellm_params: {{model: ollama/llama3, api_base: "http://127.0.0.1:9"}}
general_settings:
  max_request_size_mb: {limit_mb}
{database}
router_settings:
  num_retries: 0
{extra}
"""


@pytest.fixture
async def gw(gateway, fake_openai):
    return await gateway(config_yaml(fake_openai))


# -- moderations ----------------------------------------------------------------------------------

async def test_moderations_through_the_sdk(client, fake_openai):
    reply = await client.moderations.create(model="mod", input=["I will kill the process", "hello"])
    assert [r.flagged for r in reply.results] == [True, False]
    assert reply.results[0].categories.violence is True
    sent = fake_openai.received[-1]
    assert sent.path == "/v1/moderations" and sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert sent.body == {"model": "omni-moderation-latest", "input": ["I will kill the process", "hello"]}


async def test_moderations_without_a_model_use_the_moderation_group(gw, fetch, fake_openai):
    r = await fetch(gw, "/moderations", {"input": "hello"})
    assert r.code == 200, r.body
    assert orjson.loads(r.body)["results"][0]["flagged"] is False
    assert r.headers["x-litellm-model-group"] == "mod"
    assert fake_openai.received[-1].body["model"] == "omni-moderation-latest"


async def test_moderations_without_a_model_or_a_moderation_group(gateway, fetch, fake_openai):
    gw = await gateway(f"""
    model_list:
      - model_name: chat
        litellm_params: {{model: openai/gpt-4o-mini, api_base: "{fake_openai.base}", api_key: {PROVIDER_KEY}}}
    """)
    r = await fetch(gw, "/v1/moderations", {"input": "hello"})
    assert r.code == 400
    error = error_of(r)
    assert error["param"] == "model" and "mode: moderation" in error["message"]
    assert fake_openai.received == []


async def test_moderations_schema_type_checks_input(gw, fetch, fake_openai):
    r = await fetch(gw, "/v1/moderations", {"model": "mod", "input": 42})
    assert r.code == 400 and error_of(r)["param"] == "input"
    ok = await fetch(gw, "/v1/moderations", {"model": "mod", "input": "x", "some_new_openai_field": {"a": 1}})
    assert ok.code == 200, ok.body  # extra fields pass, and are forwarded
    assert fake_openai.received[-1].body["some_new_openai_field"] == {"a": 1}


# -- images ----------------------------------------------------------------------------------------

async def test_images_url_and_b64(client, fake_openai):
    reply = await client.images.generate(model="dalle", prompt="a red fox", n=2, size="1024x1024")
    assert len(reply.data) == 2 and all(d.url.startswith("https://images.fake/") for d in reply.data)
    assert reply.data[0].revised_prompt == "A picture of a red fox"
    assert fake_openai.received[-1].body == {"model": "dall-e-3", "prompt": "a red fox", "n": 2, "size": "1024x1024"}
    b64 = await client.images.generate(model="dalle", prompt="a red fox", response_format="b64_json")
    assert b64.data[0].b64_json and b64.data[0].url is None


async def test_images_with_usage(client, fake_openai):
    reply = await client.images.generate(model="gpt-image", prompt="two cats")
    assert reply.usage.input_tokens == 2 and reply.data[0].b64_json


async def test_images_schema(gw, fetch):
    r = await fetch(gw, "/v1/images/generations", {"model": "dalle", "prompt": "x", "n": "two"})
    assert r.code == 400 and error_of(r)["param"] == "n"
    r = await fetch(gw, "/v1/images/generations", {"model": "dalle"})
    assert r.code == 400 and "prompt" in error_of(r)["message"]


async def test_azure_images_both_ways(gw, fake_openai):
    async with openai.AsyncAzureOpenAI(azure_endpoint=gw.url, api_key=MASTER_KEY, api_version="2024-10-21",
                                       max_retries=0) as azure_client:
        reply = await azure_client.images.generate(model="azure-dalle", prompt="a boat")
    assert reply.data[0].url
    sent = fake_openai.received[-1]
    assert sent.path == "/openai/deployments/my-dalle/images/generations"
    assert sent.query == "api-version=2024-10-21" and sent.headers["api-key"] == PROVIDER_KEY


# -- speech ----------------------------------------------------------------------------------------

async def test_speech_streams_as_it_arrives(client, fake_openai):
    """The fake holds back everything after its first piece until the test has received bytes
    through the gateway: a buffering gateway would never deliver them (the wait would time out)."""
    fake_openai.speech_gate = asyncio.Event()
    text = "Hello from the speech endpoint"
    got = []
    async with client.audio.speech.with_streaming_response.create(model="tts", voice="alloy", input=text) as resp:
        assert resp.headers["content-type"] == "audio/mpeg"
        async for chunk in resp.iter_bytes():
            if not got:
                assert fake_openai.speech_bytes_sent < fake_openai.speech_bytes  # the rest is not sent yet
                fake_openai.speech_gate.set()
            got.append(chunk)
    assert b"".join(got) == speech_audio(text, fake_openai.speech_bytes)
    assert fake_openai.received[-1].body == {"model": "tts-1", "voice": "alloy", "input": text}


async def test_speech_content_type_and_azure(gw, fetch, fake_openai):
    r = await fetch(gw, "/openai/deployments/azure-tts/audio/speech?api-version=2024-10-21",
                    {"input": "hi", "voice": "nova", "response_format": "wav"})
    assert r.code == 200 and r.headers["Content-Type"] == "audio/wav"
    assert r.body == speech_audio("hi", fake_openai.speech_bytes)
    assert fake_openai.received[-1].path == "/openai/deployments/my-tts/audio/speech"


async def test_speech_errors_are_the_providers_and_retried(gateway, fetch, fake_openai):
    gw = await gateway(config_yaml(fake_openai, extra="  num_retries: 1\n  retry_after: 0"))
    fake_openai.fail_times, fake_openai.fail_status = 1, 503
    r = await fetch(gw, "/v1/audio/speech", {"model": "tts", "input": "again", "voice": "alloy"})
    assert r.code == 200 and r.body == speech_audio("again", fake_openai.speech_bytes)
    assert r.headers["x-litellm-attempted-retries"] == "1"
    fake_openai.fail_times, fake_openai.fail_status = 2, 400
    r = await fetch(gw, "/v1/audio/speech", {"model": "tts", "input": "again", "voice": "alloy"})
    assert r.code == 400
    assert "Invalid request." in error_of(r)["message"]
    assert PROVIDER_KEY not in r.body.decode()


# -- transcriptions and translations -----------------------------------------------------------------

def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_transcription_json_through_the_sdk(client, fake_openai):
    reply = await client.audio.transcriptions.create(file=("hello.wav", AUDIO, "audio/wav"), model="whisper",
                                                     language="en", temperature=0.2)
    assert f"hello.wav (audio/wav, {len(AUDIO)} bytes, sha256 {sha(AUDIO)})" in reply.text
    assert "language=en" in reply.text and "model=whisper-1" in reply.text and "temperature=0.2" in reply.text
    sent = fake_openai.received[-1]
    assert sent.path == "/v1/audio/transcriptions" and sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert sent.body["model"] == "whisper-1" and sent.body["file"]["sha256"] == sha(AUDIO)
    assert sent.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert int(sent.headers["content-length"]) > len(AUDIO)  # a known length, not chunked


@pytest.mark.parametrize("fmt,prefix", [("text", "transcribe of "), ("srt", "1\n00:00:00,000 --> "),
                                        ("vtt", "WEBVTT\n\n")])
async def test_transcription_text_formats(client, fake_openai, fmt, prefix):
    raw = await client.audio.transcriptions.with_raw_response.create(
        file=("a.mp3", AUDIO, "audio/mpeg"), model="whisper", response_format=fmt)
    assert raw.headers["content-type"] == "text/plain; charset=utf-8"
    text = raw.parse()
    assert isinstance(text, str) and text.startswith(prefix) and sha(AUDIO) in text


async def test_transcription_verbose_json_and_granularities(client, fake_openai):
    reply = await client.audio.transcriptions.create(file=("a.wav", AUDIO, "audio/wav"), model="whisper",
                                                     response_format="verbose_json",
                                                     timestamp_granularities=["segment"])
    assert reply.duration == 1.0 and reply.segments[0].text == reply.text
    assert "timestamp_granularities[]=segment" in reply.text


async def test_translation_and_a_compatible_server(client, fake_openai):
    with warnings.catch_warnings():  # newer SDKs mark translations deprecated; the API still has it
        warnings.simplefilter("ignore", DeprecationWarning)
        reply = await client.audio.translations.create(file=("fr.wav", AUDIO, "audio/wav"), model="vllm-whisper")
    assert reply.text.startswith("translate of fr.wav") and "model=whisper-large-v3" in reply.text
    assert fake_openai.received[-1].path == "/v1/audio/translations"


async def test_azure_transcription_both_ways(gw, fake_openai):
    async with openai.AsyncAzureOpenAI(azure_endpoint=gw.url, api_key=MASTER_KEY, api_version="2024-10-21",
                                       max_retries=0) as azure_client:
        reply = await azure_client.audio.transcriptions.create(file=("a.wav", AUDIO, "audio/wav"),
                                                               model="azure-whisper")
    assert sha(AUDIO) in reply.text
    sent = fake_openai.received[-1]
    assert sent.path == "/openai/deployments/my-whisper/audio/transcriptions"
    assert sent.query == "api-version=2024-10-21" and sent.headers["api-key"] == PROVIDER_KEY
    assert sent.body["model"] == "my-whisper"


async def test_upload_errors(gw, fetch, fake_openai):
    r = await fetch(gw, "/v1/audio/transcriptions", {"model": "whisper"})
    assert r.code == 400 and "multipart/form-data" in error_of(r)["message"]
    head = {"Content-Type": "multipart/form-data; boundary=xyz"}
    no_file = b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n--xyz--\r\n'
    r = await fetch(gw, "/v1/audio/transcriptions", raw=no_file, headers=head)
    assert r.code == 400 and error_of(r)["param"] == "file"
    cut = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc'
    r = await fetch(gw, "/v1/audio/transcriptions", raw=cut, headers=head)
    assert r.code == 400 and error_of(r)["param"] == "request_body"
    assert fake_openai.received == []


async def test_upload_over_the_limit_is_a_413(gateway, fake_openai):
    """Refused from the head alone (Content-Length over max_request_size_mb), in OpenAI's shape;
    none of the body is read, so the connection is closed after the answer."""
    gw = await gateway(config_yaml(fake_openai, limit_mb=1))
    stream = IOStream(socket.socket())
    await stream.connect(("127.0.0.1", gw.port))
    await stream.write((f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {MASTER_KEY}\r\n"
                        "Content-Type: multipart/form-data; boundary=b\r\n"
                        f"Content-Length: {2 * MB}\r\n\r\n").encode())
    status, headers, body = await read_response(stream)
    stream.close()
    assert status == 413 and headers["connection"] == "close"
    error = orjson.loads(body)["error"]
    assert error["code"] == "413" and error["type"] == "invalid_request_error"
    assert error["param"] == "request_body" and "max_request_size_mb" in error["message"]
    assert fake_openai.received == []


# -- providers without these endpoints -------------------------------------------------------------

@pytest.mark.parametrize("path,body,provider", [
    ("/v1/audio/speech", {"model": "claude", "input": "hi", "voice": "alloy"}, "anthropic"),
    ("/v1/images/generations", {"model": "ollama-x", "prompt": "a cat"}, "ollama"),
    ("/v1/moderations", {"model": "claude", "input": "hi"}, "anthropic"),
])
async def test_providers_without_the_endpoint(gw, fetch, path, body, provider):
    r = await fetch(gw, path, body)
    assert r.code == 400
    error = error_of(r)
    assert f"'{provider}'" in error["message"] and path in error["message"] and error["param"] == "model"


async def test_transcription_on_anthropic_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        await client.audio.transcriptions.create(file=("a.wav", AUDIO, "audio/wav"), model="claude")
    assert "'anthropic'" in caught.value.message and "/audio/transcriptions" in caught.value.message


async def test_model_info_shows_the_modes(gw, fetch):
    r = await fetch(gw, "/model/info")
    modes = {m["model_name"]: m["model_info"].get("mode") for m in orjson.loads(r.body)["data"]}
    assert modes["mod"] == "moderation" and modes["dalle"] == "image_generation"
    assert modes["tts"] == "audio_speech" and modes["whisper"] == "audio_transcription"


# -- spend, keys, rate limits (PostgreSQL) -----------------------------------------------------------

async def test_spend_keys_and_limits(gateway, fetch, fake_openai, pg_dsn):
    gw = await gateway(config_yaml(fake_openai, pg_dsn))
    r = await fetch(gw, "/key/generate", {"models": ["whisper", "dalle"], "rpm_limit": 3})
    key = orjson.loads(r.body)["key"]
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0) as c:
        images = await c.images.generate(model="dalle", prompt="a fox", n=2)
        heard = await c.audio.transcriptions.create(file=("a.wav", AUDIO * 4, "audio/wav"), model="whisper",
                                                    response_format="verbose_json")
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await c.audio.speech.create(model="tts", input="hi", voice="alloy")
        assert "key not allowed to access model" in denied.value.message
        with pytest.raises(openai.PermissionDeniedError):
            await c.moderations.create(input="the default group is checked too")
        await c.images.generate(model="dalle", prompt="the third")  # the 403 was not counted
        with pytest.raises(openai.RateLimitError):
            await c.images.generate(model="dalle", prompt="one too many")
    assert len(images.data) == 2 and heard.duration == 4.0
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=MASTER_KEY, max_retries=0) as c:
        await c.audio.speech.create(model="tts", input="twenty characters!!!", voice="alloy")
        await c.moderations.create(model="mod", input="hello")
        await c.images.generate(model="gpt-image", prompt="two cats")
    await rows_present(pg_dsn, 6, where="status = 'success'")
    rows = query(pg_dsn, "SELECT call_type, model, spend, total_tokens FROM proxy_spend_logs WHERE status = 'success' "
                         "ORDER BY start_time")
    assert rows == [("aimage_generation", "dall-e-3", pytest.approx(2 * 0.04), 0),
                    ("atranscription", "whisper-1", pytest.approx(4 * 0.0001), 0),  # 4 s at input_cost_per_second
                    ("aimage_generation", "dall-e-3", pytest.approx(0.04), 0),
                    ("aspeech", "tts-1", pytest.approx(20 * 0.000015), 0),  # 20 characters
                    ("amoderation", "omni-moderation-latest", 0.0, 0),
                    ("aimage_generation", "gpt-image-1", pytest.approx(2 * 0.000005 + 1056 * 0.00004), 1058)]


# -- a large upload: streamed to disk, not memory; byte-identical at the provider --------------------

async def read_response(stream: IOStream) -> tuple[int, dict[str, str], bytes]:
    head = (await stream.read_until(b"\r\n\r\n")).decode("latin1").split("\r\n")
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in head[1:] if line)}
    return int(head[0].split()[1]), headers, await stream.read_bytes(int(headers["content-length"]))


async def send_multipart(port: int, path: str, fields: dict, filename: str, size: int) -> tuple[int, bytes, str]:
    """POST a multipart body whose file part (``size`` pseudo-random bytes) is generated while it
    is sent, so the sender holds one piece at a time. -> (status, body, sha256 of the file)."""
    boundary = "media-test-boundary-7f3a"
    head = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                    for k, v in fields.items())
    head += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
             f"Content-Type: audio/wav\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    stream = IOStream(socket.socket())
    await stream.connect(("127.0.0.1", port))
    await stream.write((f"POST {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {MASTER_KEY}\r\n"
                        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                        f"Content-Length: {len(head) + size + len(tail)}\r\n\r\n").encode() + head)
    digest, block, sent = hashlib.sha256(), hashlib.sha512(b"seed").digest() * 4096, 0  # 256 KB pieces
    while sent < size:
        piece = block[:size - sent]
        piece = bytes([sent // len(block) % 256]) + piece[1:]  # every piece differs
        digest.update(piece)
        await stream.write(piece)
        sent += len(piece)
    await stream.write(tail)
    status, _, body = await read_response(stream)
    stream.close()
    return status, body, digest.hexdigest()


async def test_a_large_upload_is_not_held_in_memory(gateway, fake_openai):
    """20 MB through gateway (limit 32 MB) to the fake, which hashes it as it arrives: the
    file arrives byte-identical, and the process' Python heap (sender, gateway and fake share
    it) never grows by anything like the upload's size."""
    gw = await gateway(config_yaml(fake_openai, limit_mb=32))
    size = 20 * MB
    rss_before = status_kb("VmRSS") * 1024
    peak_rss_reset = reset_peak_rss()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        status, body, digest = await send_multipart(gw.port, "/v1/audio/transcriptions",
                                                    {"model": "whisper", "response_format": "json"}, "big.wav", size)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    rss_growth = status_kb("VmHWM") * 1024 - rss_before
    assert status == 200, body[:300]
    sent = fake_openai.received[-1].body
    assert sent["file"] == {"field": "file", "filename": "big.wav", "content_type": "audio/wav", "size": size,
                            "sha256": digest}
    assert sent["model"] == "whisper-1" and sent["response_format"] == "json"
    assert peak < 4 * MB, f"the heap grew by {peak / MB:.1f} MB during a {size // MB} MB upload"
    if peak_rss_reset:  # the kernel's peak RSS (VmHWM) restarted at the baseline: C buffers count too
        assert rss_growth < 10 * MB, f"peak RSS grew by {rss_growth / MB:.1f} MB during a {size // MB} MB upload"


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":")))


def reset_peak_rss() -> bool:
    """Restart VmHWM at the current RSS (Linux's clear_refs "5"); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


async def test_uploads_and_json_calls_share_the_connection_pool(gw, client, fake_openai):
    """libcurl handles are reused: a JSON call after an upload (and the other way) sends its own body."""
    for _ in range(2):
        heard = await client.audio.transcriptions.create(file=("a.wav", AUDIO, "audio/wav"), model="whisper")
        assert sha(AUDIO) in heard.text
        chat = await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.content == "echo: hi"
    await wait_for(lambda: len(fake_openai.received) == 4)
