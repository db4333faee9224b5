"""OpenAI's images, audio and moderations endpoints, as LiteLLM's proxy serves them, for OpenAI,
Azure and OpenAI-compatible deployments (``Provider.media_endpoints``); any other provider is a
400 naming it and the endpoint. They share ``LLMHandler``'s policy (model groups, retries,
fallbacks, key model access, budgets, rate limits, spend), not its relays:

- moderations and image generations: a JSON body relayed with ``model`` rewritten, the JSON
  reply back as it came;
- speech: a JSON body in, the provider's audio body streamed back as it arrives, with its
  Content-Type;
- transcriptions and translations: a multipart/form-data upload, parsed as it arrives and
  spooled to disk (``upload.py``), sent to the provider from there; the reply (JSON, or text
  for response_format text / srt / vtt) back with its Content-Type.
"""

from __future__ import annotations

import logging
import time
from typing import Mapping

from .budget import check_budgets
from .errors import InvalidRequestError, ProxyError
from .llm import LLMHandler, media_type
from .providers.base import Deployment, Provider, UpstreamReply, event_object, reply_object
from .spend import cost_of, media_cost
from .upload import SpooledForm
from .upstream import Transfer

log = logging.getLogger(__name__)


def usage_of(reply: Mapping | None) -> dict | None:
    """A reply's ``usage`` in chat's terms (prompt / completion / total tokens), for spend and
    the tpm limits. Images and gpt-4o transcriptions report ``input_tokens`` / ``output_tokens``;
    a ``{"type": "duration"}`` usage has no tokens."""
    usage = reply.get("usage") if isinstance(reply, Mapping) else None
    if not isinstance(usage, dict):
        return None
    if "prompt_tokens" in usage:
        return usage
    prompt, completion = usage.get("input_tokens"), usage.get("output_tokens")
    if not isinstance(prompt, int) and not isinstance(completion, int):
        return None
    prompt, completion = prompt if isinstance(prompt, int) else 0, completion if isinstance(completion, int) else 0
    total = usage.get("total_tokens")
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": total if isinstance(total, int) else prompt + completion}


def public_path(path: str) -> str:
    """A route's path as OpenAI documents it (``/v1/...``)."""
    return path if path.startswith("/v1/") else "/v1" + path


class MediaHandler(LLMHandler):
    """A JSON body relayed as it is (``model`` rewritten to the deployment's), the JSON reply
    back as it is. Subclasses say what a call is priced by (``units``)."""

    streams = False
    units = 0.0  # images, characters or seconds: what model_info's per-unit price multiplies

    async def post(self, **_path) -> None:
        body = self.request_body()
        self.note_caller_fields(body)
        self.check_model(body["model"])
        check_budgets(self.principal, body["model"], self.gw.settings.budget_exceeded_status_code)
        await self.admit_rate()
        await self.call_with_fallbacks(body)

    def request_body(self) -> dict:
        return self.json_body()

    def translate(self, provider: Provider, body: dict) -> tuple[str, dict]:
        if self.endpoint not in provider.media_endpoints:
            raise InvalidRequestError(
                f"The provider '{provider.name}' does not serve {public_path(self.route.path)} "
                f"(model={self.ctx.requested_model}). "
                "Images, audio and moderations are served for openai/, azure/ and OpenAI-compatible deployments.",
                param="model")
        return self.endpoint, body

    def call_cost(self, d: Deployment, usage: dict | None) -> float:
        # the shipped price table is for chat tokens: only the deployment's own prices count here
        return media_cost(d, self.endpoint, self.units) + cost_of(d, usage, {})

    async def relay(self, provider: Provider, d: Deployment, endpoint: str, body: dict, deadline: float) -> None:
        reply = await self.fetch_reply(provider, d, self.upstream_request(provider, d, endpoint, body, stream=False),
                                       deadline)
        response = provider.parse_response(endpoint, reply)
        self.account(event_object(response.body) or {})
        self.set_duration_headers()
        self.set_header("Content-Type", "application/json")
        self.finish(response.body)

    async def fetch_reply(self, provider: Provider, d: Deployment, request, deadline: float,
                          upload=None) -> UpstreamReply:
        """One buffered call; a non-2xx reply raises the provider's error (retried as chat's)."""
        timeout = self.timeouts(d, deadline)[0]
        started = time.perf_counter()
        self.transfer = Transfer()  # what on_connection_close aborts
        reply = await self.gw.upstream.fetch(request, timeout, self.transfer, ssl_verify=d.ssl_verify, upload=upload)
        self.ctx.upstream_s = time.perf_counter() - started
        if not 200 <= reply.status < 300:
            raise d.scrubber.error(provider.parse_error(reply, d))
        return reply

    def account(self, reply: dict) -> None:
        """What the reply tells about the call's cost and usage."""
        self.ctx.usage = usage_of(reply)


class ModerationsHandler(MediaHandler):
    """``POST /v1/moderations``. ``model`` is optional, as in OpenAI's API: without one, the
    first model group whose ``model_info.mode`` is ``moderation`` answers."""

    endpoint = "moderation"

    def request_body(self) -> dict:
        body = self.json_body()
        if body.get("model") is None:
            group = self.gw.registry.group_for_mode("moderation")
            if group is None:
                raise InvalidRequestError(
                    "No model given, and no model group has model_info.mode: moderation to answer moderations "
                    "by default. Pass `model`, or set mode: moderation in a deployment's model_info.",
                    param="model")
            body["model"] = group
        return body


class ImageGenerationsHandler(MediaHandler):
    endpoint = "image_generation"

    def account(self, reply: dict) -> None:
        super().account(reply)
        data = reply.get("data")
        self.units = float(len(data)) if isinstance(data, list) else 0.0


class SpeechHandler(MediaHandler):
    """``POST /v1/audio/speech``: the audio is streamed to the client as the provider sends it,
    with the provider's Content-Type (audio/mpeg, ...). A failure before the first byte is
    retried as chat's; after it, the client's connection is cut (no complete-looking audio)."""

    endpoint = "audio_speech"

    async def relay(self, provider: Provider, d: Deployment, endpoint: str, body: dict, deadline: float) -> None:
        request = self.upstream_request(provider, d, endpoint, body, stream=False)
        timeout, first_byte_timeout = self.timeouts(d, deadline)
        transfer = self.transfer = Transfer()
        self.units = float(len(body.get("input") or ""))

        def on_chunk(chunk: bytes) -> None:  # curl's streaming callback: must not raise
            if not self._headers_written:
                self.start_audio(transfer)
            self.send(chunk)

        try:
            await self.gw.upstream.stream(request, timeout, first_byte_timeout, lambda t: None, on_chunk, transfer,
                                          ssl_verify=d.ssl_verify)
        except ProxyError as exc:
            if not self._headers_written:
                raise
            log.warning("call %s: upstream failed mid-audio: %s", self.ctx.call_id, d.scrubber.error(exc).message)
            self.request.connection.stream.close()
            return
        finally:
            self.ctx.upstream_s = time.monotonic() - transfer.started
        if transfer.abort_reason == "client":
            return
        if not transfer.ok:
            raise d.scrubber.error(provider.parse_error(
                UpstreamReply(transfer.status or 502, transfer.headers, bytes(transfer.error_body)), d))
        if not self._headers_written:
            self.start_audio(transfer)  # an empty body
        self.finish()

    def start_audio(self, transfer: Transfer) -> None:
        self.ctx.first_token_s = time.monotonic() - transfer.started
        self.set_header("Content-Type", transfer.headers.first("Content-Type") or "application/octet-stream")
        self.set_duration_headers()


class TranscriptionsHandler(MediaHandler):
    """``POST /v1/audio/transcriptions``: a multipart upload up to ``max_request_size_mb``,
    parsed as it arrives and spooled to disk (``upload.SpooledForm``); each attempt sends the
    parts with ``model`` rewritten. The reply goes back with its Content-Type."""

    endpoint = "audio_transcription"
    body_limit = None  # general_settings.max_request_size_mb
    form: SpooledForm | None = None

    async def admit(self) -> None:
        await super().admit()
        self.form = SpooledForm(self.request.headers.get("Content-Type"))

    def data_received(self, chunk: bytes) -> None:
        if self.refused is None and self.form is not None:
            self.form.feed(chunk)

    def request_body(self) -> dict:
        form = self.form
        form.close()
        body = dict(form.fields)
        if self.path_kwargs.get("model"):
            body["model"] = self.path_kwargs["model"]
        if not body.get("model"):
            raise InvalidRequestError("Missing required parameter: 'model'.", param="model")
        if not any(f.name == "file" for f in form.files):
            raise InvalidRequestError("Missing required parameter: 'file' (the audio file, as a form file part).",
                                      param="file")
        return body

    async def relay(self, provider: Provider, d: Deployment, endpoint: str, body: dict, deadline: float) -> None:
        request = provider.build_upload_request(d, endpoint, self.form.content_type)
        reply = await self.fetch_reply(provider, d, request, deadline, upload=self.form.body_for(d.model))
        kind = media_type(reply.headers) or "application/json"
        if kind == "application/json":
            self.account(reply_object(reply.body, "The provider"))
        self.set_duration_headers()
        self.set_header("Content-Type", reply.headers.first("Content-Type") or kind)
        self.finish(reply.body)

    def account(self, reply: dict) -> None:
        super().account(reply)
        usage, duration = reply.get("usage"), reply.get("duration")
        if isinstance(usage, dict) and usage.get("type") == "duration":
            duration = usage.get("seconds")
        if isinstance(duration, (int, float)) and not isinstance(duration, bool) and duration > 0:
            self.units = float(duration)

    def on_finish(self) -> None:
        super().on_finish()
        self.discard_form()

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self.discard_form()

    def discard_form(self) -> None:
        if self.form is not None:
            self.form.discard()


class TranslationsHandler(TranscriptionsHandler):
    endpoint = "audio_translation"


HANDLERS = {
    "moderations": ModerationsHandler,
    "image_generations": ImageGenerationsHandler,
    "audio_speech": SpeechHandler,
    "audio_transcriptions": TranscriptionsHandler,
    "audio_translations": TranslationsHandler,
}
