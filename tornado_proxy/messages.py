"""``POST /v1/messages`` and ``/v1/messages/count_tokens``: the Anthropic Messages API on top of
``LLMHandler`` (pass-through to ``anthropic/`` deployments, translation for the others), with
its own output format and cache entries (Anthropic messages, see ``messagecache.py``)."""

from __future__ import annotations

import dataclasses

import orjson

from .errors import InvalidRequestError, ProxyError
from .llm import LLMHandler, naming_deployment
from .messagecache import MessageAssembler, fresh_message, message_entry, replay_events
from .providers import PROVIDERS
from .providers.anthropic import openai_usage
from .providers.anthropic_format import PassThroughOutput, TranslatedOutput, to_openai_request
from .providers.base import Deployment, Provider, UpstreamRequest


class MessagesHandler(LLMHandler):
    """``POST /v1/messages``: the Anthropic Messages API for every model. ``anthropic/`` models
    get the body as it came (model rewritten) and their reply or event stream goes back as is;
    any other model is called with the OpenAI translation of the request and its answer is
    rewritten as an Anthropic message or event stream. Errors are in Anthropic's shape."""

    endpoint = "messages"
    # What a pass-through call takes from the client: the body is in the client's API version.
    FORWARDED_HEADERS = ("anthropic-version", "anthropic-beta")

    def translate(self, provider: Provider, body: dict) -> tuple[str, dict]:
        if self.endpoint in provider.passthrough_endpoints:
            self.output = PassThroughOutput
            return self.endpoint, body
        self.output = TranslatedOutput(body["model"])
        return "chat", to_openai_request(body)

    def upstream_request(self, provider: Provider, d: Deployment, endpoint: str, body: dict,
                         stream: bool) -> UpstreamRequest:
        request = super().upstream_request(provider, d, endpoint, body, stream)
        if endpoint not in provider.passthrough_endpoints:
            return request
        headers = self.request.headers
        forwarded = {name: headers[name] for name in self.FORWARDED_HEADERS if name in headers}
        return dataclasses.replace(request, headers={**request.headers, **forwarded}) if forwarded else request

    def error_body(self, error: ProxyError) -> bytes:
        return orjson.dumps(error.to_anthropic_body())

    # The response cache: entries are Anthropic messages, keyed apart from chat ("anthropic_messages").

    @staticmethod
    def fresh_answer(answer: dict) -> dict:
        return fresh_message(answer)

    @staticmethod
    def cached_usage(answer: dict) -> dict | None:
        return openai_usage(answer.get("usage"))

    def replay(self, answer: dict, body: dict) -> bytes:
        return replay_events(answer)

    def new_assembler(self):
        # the attempt's output was chosen by translate(): Anthropic events, or OpenAI chunks
        return MessageAssembler() if self.output is PassThroughOutput else super().new_assembler()

    def cache_entry(self, answer: dict) -> dict | None:
        return message_entry(answer, self.ctx.requested_model)


class MessagesCountTokensHandler(MessagesHandler):
    """``POST /v1/messages/count_tokens``: asked of Anthropic for ``anthropic/`` models, counted
    in-process where the provider's own count is known (``mock/``), and otherwise a 400: a
    tokenizer guess for another vendor's model would be a made-up number."""

    endpoint = "count_tokens"
    streams = False
    logs_spend = False

    async def post(self, **_path) -> None:
        body = self.json_body()
        d = self.deployment_for(body)
        provider = PROVIDERS[d.provider]
        self.set_model_headers(d)
        if self.endpoint in provider.passthrough_endpoints:
            self.output = PassThroughOutput
            with naming_deployment(d, self.ctx.call_id):
                await self.relay(provider, d, self.endpoint, body, self.ctx.started + self.gw.settings.timeout)
            return
        tokens = provider.count_tokens(d, to_openai_request(body))
        if tokens is None:
            raise InvalidRequestError(
                f"count_tokens is not available for model={body['model']}: its provider '{d.provider}' has no "
                "token-counting API and the gateway does not guess. It is answered for anthropic/ and mock/ "
                "models.", param="model")
        self.set_duration_headers()
        self.write_json({"input_tokens": tokens})


HANDLERS = {
    "messages": MessagesHandler,
    "messages_count_tokens": MessagesCountTokensHandler,
}
