"""The LLM endpoints: ``LLMHandler`` (the retry/fallback policy, one attempt, the plain and
streamed relays, the response cache, spend and rate-limit accounting) and its subclasses for
chat, completions and embeddings (the Anthropic Messages API is in ``messages.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Sequence

import orjson

from .cachedanswers import CachedAnswers
from .budget import budget_used_up, check_budgets, soft_budget_crossings
from .errors import InvalidRequestError, ProxyError, UpstreamConnectionError, UpstreamError, UpstreamTimeoutError
from .providers import PROVIDERS
from .providers.base import Deployment, Provider, StreamState, UpstreamReply, UpstreamRequest, event_object
from .registry import check_model_name
from .router import NoDeploymentAvailable, fallback_kind
from .spend import SpendEvent, cost_of, tokens
from .sse import DONE, EventTooLargeError, format_event
from .upstream import Transfer
from .handlers import BaseHandler

log = logging.getLogger(__name__)

MAX_PENDING_STREAM_BYTES = 8 * 1024 * 1024  # a client this far behind is dropped, upstream aborted
DONE_EVENT = format_event(DONE)
MAX_NON_STREAM_BODY = 65536  # what is kept of a 2xx answer to a streamed request that is not a stream
# The spend log's call_type per endpoint (LiteLLM's names)
CALL_TYPES = {"chat": "acompletion", "completions": "atext_completion", "embeddings": "aembedding",
              "messages": "anthropic_messages", "responses": "aresponses", "moderation": "amoderation",
              "image_generation": "aimage_generation", "audio_speech": "aspeech", "audio_transcription": "atranscription",
              "audio_translation": "atranscription"}


def request_count(body: dict, name: str, default: int) -> int:
    """A non-negative integer the request may set (``num_retries``), else ``default``."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequestError(f"{name} must be a non-negative integer.", param=name)
    return value


def request_fallbacks(body: dict) -> tuple[str, ...]:
    """The request's own ``fallbacks``: model group names (or ``{"model": name}`` objects), as
    LiteLLM's proxy takes them; tried before the configured ones."""
    value = body.get("fallbacks")
    if value is None:
        return ()
    names = [v.get("model") if isinstance(v, dict) else v for v in value] if isinstance(value, list) else None
    if names is None or not all(isinstance(n, str) and n for n in names):
        raise InvalidRequestError("fallbacks must be a list of model names.", param="fallbacks")
    return tuple(names)


def media_type(headers) -> str | None:
    """A reply's Content-Type without parameters, lower-cased (None when it has none)."""
    value = headers.first("Content-Type") if hasattr(headers, "first") else headers.get("Content-Type")
    return value.partition(";")[0].strip().lower() if value else None


@contextlib.contextmanager
def naming_deployment(d: Deployment, call_id: str):
    """A transport failure (cannot connect, timed out) names the deployment and the address
    tried, in the error and in a WARNING line: "curl error 7" alone gives nothing to act on."""
    try:
        yield
    except (UpstreamConnectionError, UpstreamTimeoutError) as exc:
        where = d.public_api_base or "the provider's default address"
        exc.message = f"{exc.message} [deployment model_id={d.id} ({d.model_name}), api_base {where}]"
        log.warning("call %s: %s", call_id, exc.message)
        raise



class OpenAIOutput:
    """How an OpenAI-shaped answer reaches the client of an OpenAI endpoint: unchanged.

    The output hook of ``LLMHandler``: a handler serving another wire format sets
    ``self.output`` to an object with the same four methods (see ``MessagesHandler``)."""

    @staticmethod
    def body(data: bytes) -> bytes:
        return data

    @staticmethod
    def event(payload: bytes) -> bytes:
        return b"data: " + payload + b"\n\n"

    @staticmethod
    def end() -> bytes:
        return DONE_EVENT

    @staticmethod
    def error_event(exc: ProxyError) -> bytes:
        return b"data: " + orjson.dumps(exc.to_body()) + b"\n\n"


class LLMHandler(CachedAnswers, BaseHandler):
    endpoint = "chat"
    body_limit = None
    streams = True
    output = OpenAIOutput
    transfer: Transfer | None = None
    client_gone = False
    _unflushed = 0  # stream bytes written since the last completed flush
    logs_spend = True              # a call that leaves a spend-log row (count_tokens does not)
    end_user: str | None = None    # the body's ``user``, for the spend log
    request_metadata: dict | None = None

    @property
    def call_type(self) -> str | None:
        """LiteLLM's name of this endpoint's calls (spend log, cache settings)."""
        return CALL_TYPES.get(self.endpoint)

    async def post(self, **_path) -> None:
        if self.gw.tracer is not None:
            self.trace = self.gw.tracer.request(self.request.headers, self.request.method, self.route.path,
                                                self.endpoint, self.ctx.started_at)
        body = self.json_body()
        if self.trace is not None:
            self.trace.request_body(body)
        self.note_caller_fields(body)
        self.check_model(body["model"])
        check_budgets(self.principal, body["model"], self.gw.settings.budget_exceeded_status_code)
        await self.admit_rate()
        self.ctx.stream = self.streams and bool(body.get("stream"))
        if self.gw.settings.drop_params and "drop_params" not in body:
            body["drop_params"] = True  # litellm_settings.drop_params: for every request
        cache_body = body.pop("cache", None)  # the gateway's controls: never forwarded
        if self.gw.cache is not None and await self.answer_from_cache(body, cache_body):
            return
        await self.call_with_fallbacks(body)
        if self.cache_answer is not None:
            await self.store_in_cache(self.cache_answer)

    async def call_with_fallbacks(self, body: dict) -> None:
        """The policy: the requested group with its retries, then (for an error that allows it)
        each fallback group in turn, with theirs, up to ``max_fallbacks``; the last error is
        the answer. ``router_settings.timeout`` bounds it all."""
        router = self.gw.router
        retries = request_count(body, "num_retries", router.settings.num_retries)
        deadline = self.ctx.started + self.gw.settings.timeout
        deployments = self.gw.registry.resolve(body["model"])
        error = await self.call_group(deployments, body, retries, deadline)
        if error is None:
            return
        kind = fallback_kind(error)
        groups = router.fallback_groups(deployments[0].model_name, kind, request_fallbacks(body)) if kind else ()
        metrics, requested = self.gw.metrics, deployments[0].model_name
        for group in groups[:router.settings.max_fallbacks]:
            if self.client_gone or time.perf_counter() >= deadline:
                break
            try:
                deployments = self.gw.registry.resolve(group)
            except ProxyError:
                log.warning("call %s: fallback model group %r does not exist; skipped", self.ctx.call_id, group)
                continue
            self.ctx.fallbacks += 1
            log.info("call %s: falling back to %r after: %s", self.ctx.call_id, group, error.message)
            error = await self.call_group(deployments, body, retries, deadline)
            metrics.child(metrics.fallbacks_failed if error else metrics.fallbacks_ok, requested, group).inc()
            if error is None:
                return
        if not self.client_gone:
            raise error

    async def call_group(self, deployments: Sequence[Deployment], body: dict, retries: int,
                         deadline: float) -> ProxyError | None:
        """Attempts on one model group, each on the deployment the router picks (one that has
        not failed in this call, while there is one): up to ``1 + retries`` for a retryable
        error, or what the retry policy says for the error's kind. None once an attempt answered
        the client (or the client left); else the error to fall back on or answer."""
        router, failed = self.gw.router, set()
        # what the background health check found (memory only; empty when checks are off)
        unhealthy = self.gw.unhealthy_deployment_ids() if self.gw.settings.enable_health_check_routing else ()
        retry = 0
        while True:
            try:
                d = router.pick(deployments, failed, unhealthy)
                if self.trace is None:
                    await self.attempt(d, body, deadline)
                else:
                    await self.traced_attempt(d, body, deadline)
                self.gw.metrics.attempt_ended(d.model_name, d.id, d.provider, None, False)
                return None
            except NoDeploymentAvailable as exc:
                return exc
            except ProxyError as exc:
                error = exc
            if self.client_gone:
                return None
            cooled = router.failed(d, len(deployments), error)
            self.gw.metrics.attempt_ended(d.model_name, d.id, d.provider, error.status, cooled)
            failed.add(d.id)
            if retry >= router.retries_for(d.model_name, error, retries):
                return error
            wait = router.retry_delay(retry, error, any(x.id not in failed for x in deployments))
            if time.perf_counter() + wait >= deadline:
                return error
            log.info("call %s: retrying in %.2fs after: %s", self.ctx.call_id, wait, error.message)
            if wait:
                await asyncio.sleep(wait)
            if self.client_gone:
                return None
            self.ctx.retries += 1
            retry += 1

    async def traced_attempt(self, d: Deployment, body: dict, deadline: float) -> None:
        """``attempt`` inside a CLIENT span (tracing on)."""
        self.trace.start_attempt(d, self.ctx.retries)
        try:
            await self.attempt(d, body, deadline)
        except ProxyError as exc:
            self.trace.end_attempt(None, exc)
            raise
        except BaseException:
            self.trace.end_attempt(None, ProxyError("The attempt ended unexpectedly."))
            raise
        self.trace.end_attempt(self.ctx.usage, None)

    async def attempt(self, d: Deployment, body: dict, deadline: float) -> None:
        """One call to one deployment. Raises a ProxyError when it failed before anything
        reached the client; after that, a failure ends the stream with an error event."""
        self.ctx.deployment = d
        # The metrics label is the configured group (a wildcard's pattern, an alias's target),
        # never the requested name: made-up names under a wildcard must not create series.
        self.ctx.model_group = d.model_name
        if d.problem:
            raise InvalidRequestError(d.problem, param="model")
        provider = PROVIDERS[d.provider]
        if "mock_response" in body or d.mock_response is not None:
            provider = PROVIDERS["mock"]
        self.set_model_headers(d)
        endpoint, sent = self.translate(provider, body)
        endpoint = provider.endpoint_for(d, endpoint)  # completions on a chat-only model: via chat
        if provider.local:
            self.answer_locally(provider, d, endpoint, sent)
            return
        router = self.gw.router
        if router.tracks_in_flight:
            router.counters.started(d.id)
        try:
            with naming_deployment(d, self.ctx.call_id):
                if self.ctx.stream:
                    await self.relay_stream(provider, d, endpoint, sent, deadline)
                else:
                    await self.relay(provider, d, endpoint, sent, deadline)
        finally:
            if router.tracks_in_flight:
                router.counters.ended(d.id)
        if router.tracks_latency or router.tracks_usage:
            self.record_success(d)

    def note_caller_fields(self, body: dict) -> None:
        user, metadata = body.get("user"), body.get("metadata")
        self.end_user = user if isinstance(user, str) else None
        self.request_metadata = metadata if isinstance(metadata, dict) else None

    def record_spend(self, status: int) -> None:
        """Cost the call, count it in this worker's memory of the key, team and user at once
        (budgets see it on the next request), warn at a soft budget, and queue the spend-log
        event for the writer. Only calls that got as far as naming a model leave an entry."""
        if self.principal is None or not self.ctx.requested_model or not self.logs_spend:
            return
        d, usage, key = self.ctx.deployment, self.ctx.usage or {}, self.principal.key
        cost = self.call_cost(d, usage) if d is not None else 0.0
        used_up = False
        if cost > 0:
            self.gw.metrics.child(self.gw.metrics.spend, self.ctx.model_group or "").inc(cost)
            records = self.gw.tenants.add_spend(self.principal, cost, self.ctx.requested_model)
            for kind, name, spent, soft in soft_budget_crossings(records, cost):
                log.warning("soft budget reached: %s %s has spent %.6f of its soft_budget %.6f", kind, name, spent,
                            soft)
                self.gw.metrics.child(self.gw.metrics.soft_budget_crossed, kind).inc()
            used_up = budget_used_up(records, cost)
        if self.gw.spend.store is None:
            return  # no database: no spend log to write (and no event to build)
        prompt, completion = tokens(usage, "prompt_tokens"), tokens(usage, "completion_tokens")
        event = SpendEvent(
            request_id=self.ctx.call_id, call_type=self.call_type or self.endpoint,
            api_key=key.token if key is not None else self.gw.master_key_hash(), spend=cost,
            prompt_tokens=prompt, completion_tokens=completion,
            total_tokens=tokens(usage, "total_tokens") or prompt + completion,
            start_time=self.ctx.started_at, end_time=time.time(),
            model=d.model if d is not None else self.ctx.requested_model, model_id=d.id if d is not None else None,
            model_group=self.ctx.requested_model, custom_llm_provider=d.provider if d is not None else None,
            api_base=(d.public_api_base or None) if d is not None else None,
            user=key.user_id if key is not None else None, end_user=self.end_user,
            team_id=key.team_id if key is not None else None, status="success" if status < 400 else "failure",
            metadata=self.request_metadata or {}, cache_hit=self.ctx.cache_hit, origin=self.gw.tenants.origin)
        self.gw.spend.submit(event, urgent=used_up)  # a budget used up: the others learn it at once

    def call_cost(self, d: Deployment, usage: dict | None) -> float:
        """USD for this call (its tokens at the deployment's or the shipped table's prices)."""
        return cost_of(d, usage, self.gw.router.price_table)

    def record_success(self, d: Deployment) -> None:
        counters = self.gw.router.counters
        if self.gw.router.tracks_latency:
            counters.add_latency(d.id, self.ctx.first_token_s if self.ctx.stream else self.ctx.upstream_s)
        if self.gw.router.tracks_usage:
            counters.add_request(d.id)
            counters.add_tokens(d.id, int((self.ctx.usage or {}).get("total_tokens") or 0))

    async def admit_rate(self) -> None:
        """The key's, team's and user's rpm / tpm / parallel limits (a 429 when one is used up);
        the admission is finished, with the tokens used, when the request ends."""
        scopes = self.principal.limit_scopes() if self.principal is not None else ()
        if scopes:
            self.admission = await self.gw.limiter.admit(scopes)
            for name, value in self.admission.headers.items():
                self.set_header(name, value)

    def check_model(self, name: str) -> None:
        """The requested name, before it is used anywhere: well-formed, and one the caller's key
        (and its team) may use."""
        self.ctx.requested_model = check_model_name(name)
        if self.principal is not None:
            self.principal.check_model(name, self.gw.registry.aliases.get(name))

    def deployment_for(self, body: dict) -> Deployment:
        """One deployment for a call that is made once (count_tokens)."""
        self.check_model(body["model"])
        d = self.gw.router.pick(self.gw.registry.resolve(body["model"]))
        self.ctx.model_group = d.model_name
        self.ctx.deployment = d
        if d.problem:
            raise InvalidRequestError(d.problem, param="model")
        return d

    def translate(self, provider: Provider, body: dict) -> tuple[str, dict]:
        """The provider endpoint and body for this request. OpenAI endpoints pass both as they
        are; a handler for another format translates here and sets ``self.output``."""
        return self.endpoint, body

    def upstream_request(self, provider: Provider, d: Deployment, endpoint: str, body: dict,
                         stream: bool) -> UpstreamRequest:
        return provider.build_request(d, endpoint, body, stream=stream)

    def set_duration_headers(self) -> None:
        total_ms = (time.perf_counter() - self.ctx.started) * 1000
        self.set_header("x-litellm-response-duration-ms", f"{total_ms:.3f}")
        self.set_header("x-litellm-overhead-duration-ms", f"{max(total_ms - self.ctx.upstream_s * 1000, 0):.3f}")

    def timeouts(self, d: Deployment, deadline: float) -> tuple[float, float | None]:
        """This attempt's timeout and time-to-first-byte limit, within what is left of the call's."""
        settings = self.gw.settings
        left = deadline - time.perf_counter()
        if left <= 0:
            raise UpstreamTimeoutError(f"Timeout: no answer within router_settings.timeout ({settings.timeout:g}s)")
        timeout = min(d.timeout or settings.timeout, left)
        return timeout, min(d.stream_timeout or settings.stream_timeout or timeout, timeout)

    def answer_locally(self, provider: Provider, d: Deployment, endpoint: str, body: dict) -> None:
        if not self.ctx.stream:
            reply = provider.respond(d, endpoint, body)
            self.ctx.usage = reply.usage
            if self.trace is not None:
                self.trace.response_body(reply.body)
            self.set_duration_headers()
            self.set_header("Content-Type", "application/json")
            self.finish(self.output.body(reply.body))
            self.keep_answer(reply.body)
            return
        chunks, usage = provider.stream(d, endpoint, body)
        self.ctx.usage = usage
        if self.trace is not None:
            self.trace.stream_payloads(chunks)
        self.start_event_stream()
        self.write(b"".join(self.output.event(c) for c in chunks) + self.output.end())
        self.finish()
        if self.assembling:
            self.assembler = self.new_assembler()
            for c in chunks:
                self.assembler.add(c)
            self.keep_answer(None)

    async def relay(self, provider: Provider, d: Deployment, endpoint: str, body: dict, deadline: float) -> None:
        request = self.upstream_request(provider, d, endpoint, body, stream=False)
        timeout = self.timeouts(d, deadline)[0]
        started = time.perf_counter()
        self.transfer = Transfer()  # what on_connection_close aborts
        reply = await self.gw.upstream.fetch(request, timeout, self.transfer, ssl_verify=d.ssl_verify)
        self.ctx.upstream_s = time.perf_counter() - started
        if not 200 <= reply.status < 300:
            raise d.scrubber.error(provider.parse_error(reply, d))
        response = provider.parse_response(endpoint, reply)
        self.ctx.usage = response.usage
        if self.trace is not None:
            self.trace.response_body(response.body)
        self.set_duration_headers()
        self.set_header("Content-Type", "application/json")
        self.finish(self.output.body(response.body))
        self.keep_answer(response.body)

    def start_event_stream(self) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        self.set_duration_headers()

    async def relay_stream(self, provider: Provider, d: Deployment, endpoint: str, body: dict,
                           deadline: float) -> None:
        """Relay one streamed call. Nothing reaches the client before the first event is ready
        to go (the head included): until then every failure raises, and may be retried."""
        request = self.upstream_request(provider, d, endpoint, body, stream=True)
        timeout, first_byte_timeout = self.timeouts(d, deadline)
        state = StreamState(include_usage=bool((body.get("stream_options") or {}).get("include_usage")))
        parser = provider.stream_parser()
        transfer = self.transfer = Transfer()
        render = self.output.event
        trace = self.trace
        assembler = self.assembler = self.new_assembler() if self.assembling else None  # this attempt's
        not_a_stream = False        # a 2xx that is not an event stream: its body is collected
        stopped: ProxyError | None = None  # why the gateway stopped the upstream itself

        def on_head(t: Transfer) -> None:
            nonlocal not_a_stream
            if t.ok:
                self.ctx.upstream_s = t.first_byte_at - t.started
                kind = media_type(t.headers)
                # no Content-Type at all is given the benefit of the doubt (the parser still
                # refuses what is not a stream); a declared other type is not a stream
                if kind is not None and kind not in provider.stream_media_types:
                    not_a_stream = True

        def on_chunk(chunk: bytes) -> None:
            # runs in curl's streaming callback: it must not raise
            if not_a_stream:
                transfer.error_body += chunk[:MAX_NON_STREAM_BODY - len(transfer.error_body)]
                if len(transfer.error_body) >= MAX_NON_STREAM_BODY:
                    stop(None)
                return
            try:
                events = parser.feed(chunk)
            except EventTooLargeError as exc:
                stop(UpstreamError(f"The provider sent a stream event larger than {exc.limit // 2**20} MB "
                                   "(a line that never ends?); the stream was stopped.", status=502))
                return
            payloads = [data for event in events if state.error is None
                        for data in provider.parse_event(endpoint, event.data, state)]
            if assembler is not None:
                for data in payloads:
                    assembler.add(data)
            if trace is not None:
                trace.stream_payloads(payloads)
            out = [render(data) for data in payloads]
            if out:
                if not self._headers_written:  # the first event: now the response is committed
                    self.ctx.first_token_s = time.monotonic() - transfer.started
                    self.start_event_stream()
                self.send(b"".join(out))
            if state.error is not None:
                stop(state.error)

        def stop(error: ProxyError | None) -> None:
            nonlocal stopped
            if stopped is None and transfer.abort_reason is None:
                stopped = error
                self.gw.upstream.abort(transfer, "invalid")

        try:
            await self.gw.upstream.stream(request, timeout, first_byte_timeout, on_head, on_chunk, transfer,
                                          ssl_verify=d.ssl_verify)
        except ProxyError as exc:
            if not self._headers_written:
                raise
            self.end_stream_with_error(d.scrubber.error(exc))
            return
        finally:
            self.ctx.upstream_s = time.perf_counter() - transfer.started
            self.ctx.usage = state.usage
        if transfer.abort_reason == "client":
            return
        if not_a_stream:
            raise d.scrubber.error(self.non_stream_reply(provider, d, transfer))
        if not transfer.ok:
            raise d.scrubber.error(provider.parse_error(UpstreamReply(transfer.status or 502, transfer.headers,
                                                                      bytes(transfer.error_body)), d))
        if stopped is None:
            on_chunk(b"\n\n")  # dispatch an unterminated final event, if any
        error = stopped or state.error  # the gateway's reason, or what the provider said in the stream
        if error is not None:
            if not self._headers_written:
                raise d.scrubber.error(error)
            self.end_stream_with_error(d.scrubber.error(error))
            return
        if not self._headers_written:
            raise UpstreamError(f"{d.provider}/{d.model}: the provider ended the stream before sending any event.",
                                status=502)
        self.send(self.output.end())
        self.finish()
        self.keep_answer(None)

    @staticmethod
    def non_stream_reply(provider: Provider, d: Deployment, transfer: Transfer) -> ProxyError:
        """A streamed request answered with a 2xx that is not an event stream: the provider's
        error if its body is one, else a 502 saying what came instead."""
        body = bytes(transfer.error_body)
        parsed = event_object(body)
        if parsed is not None and parsed.get("error"):
            return provider.parse_error(UpstreamReply(502, transfer.headers, body), d)
        return UpstreamError(f"{d.provider}/{d.model}: the provider answered a streamed request with a non-stream "
                             f"response (Content-Type: {(media_type(transfer.headers) or 'none')[:100]}).",
                             status=502)

    def send(self, data: bytes) -> None:
        """Write stream bytes and flush. Curl gets no backpressure from a slow client, so the
        bytes written since the last completed flush are counted; past the bound the client is
        dropped and the upstream aborted rather than buffering without limit."""
        stream = self.request.connection.stream
        if stream.closed():
            return
        self.write(data)
        self._unflushed += len(data)
        if self._unflushed > MAX_PENDING_STREAM_BYTES:
            log.warning("call %s: client is too slow to read the stream; dropping it", self.ctx.call_id)
            self.gw.upstream.abort(self.transfer, "client")
            stream.close()
            return
        self.flush().add_done_callback(self._flushed)

    def _flushed(self, _future) -> None:
        self._unflushed = 0

    def end_stream_with_error(self, exc: ProxyError) -> None:
        log.warning("call %s: upstream failed mid-stream: %s", self.ctx.call_id, exc.message)
        if self.trace is not None:
            self.trace.failed(exc)
        self.write(self.output.error_event(exc))
        self.finish()

    def on_connection_close(self) -> None:
        self.client_gone = True  # no further attempts
        if self.transfer is not None:
            self.gw.upstream.abort(self.transfer, "client")
        super().on_connection_close()


class ChatCompletionsHandler(LLMHandler):
    endpoint = "chat"


class CompletionsHandler(LLMHandler):
    endpoint = "completions"


class EmbeddingsHandler(LLMHandler):
    endpoint = "embeddings"
    streams = False


HANDLERS = {
    "chat_completions": ChatCompletionsHandler,
    "completions": CompletionsHandler,
    "embeddings": EmbeddingsHandler,
}
