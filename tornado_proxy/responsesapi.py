"""The OpenAI Responses API: ``POST /v1/responses`` for every model, and ``GET`` / ``DELETE
/v1/responses/{id}``.

``openai/`` and ``azure/`` models get the body as it came (model rewritten) and their reply or
event stream goes back as is (``previous_response_id``, ``store`` and the stored responses are
then the provider's own). Any other model is called with the chat translation of the request
(``providers/responses_format.py``) and its answer rewritten as a ``response`` object or typed
event stream; those responses are kept by the gateway (``responsestore.py``) so that a follow-up
turn with ``previous_response_id`` continues the conversation.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence
from urllib.parse import urlencode

from .errors import DatabaseUnavailable, InvalidRequestError, NotFoundError, ProxyError, ServiceUnavailableError
from .handlers import BaseHandler
from .llm import LLMHandler, naming_deployment
from .providers import PROVIDERS
from .providers.base import Deployment, Provider
from .providers.responses_format import (PassThroughOutput, ResponseDraft, TranslatedOutput, check_tools,
                                         input_items, to_chat_request)
from .responsestore import StoredResponse
from .upstream import Transfer

log = logging.getLogger(__name__)


def not_found(response_id: str, param: str = "response_id") -> NotFoundError:
    return NotFoundError(f"No response found with id '{response_id[:100]}'.", param=param)


async def stored(gw, response_id: str, param: str = "response_id") -> StoredResponse | None:
    """The stored response (None when there is none); a 503 when only the database could say
    and it does not answer."""
    try:
        return await gw.responses.get(response_id)
    except DatabaseUnavailable as exc:
        raise ServiceUnavailableError(f"Database unavailable ({exc}): response '{response_id[:100]}' is not in "
                                      "this worker's memory and could not be looked up.", param=param) from None


def without_ids(item: dict) -> dict:
    """A stored item as input to another provider: the ids the gateway made up mean nothing there."""
    return {k: v for k, v in item.items() if k not in ("id", "status")}


class ResponseOwner:
    """Who may see a stored response: the key that created it, and admins (the master key)."""

    @staticmethod
    def token(principal) -> str:
        return (principal.token or "") if principal is not None else ""

    @staticmethod
    def admin(principal) -> bool:
        return principal is None or principal.is_admin


class ResponsesHandler(LLMHandler):
    endpoint = "responses"
    items: list[dict] | None = None         # the conversation sent (earlier turns, then this input)
    previous: StoredResponse | None = None  # what previous_response_id names, when the gateway holds it
    storing: dict | None = None             # the request whose response is to be kept, until it is

    async def call_with_fallbacks(self, body: dict) -> None:
        await self.load_previous(body)
        self.storing = body
        await super().call_with_fallbacks(body)

    def write(self, chunk) -> None:
        """Every byte of the answer goes through here: the response is kept before the first
        bytes that name it (the body, the final event) leave, so a follow-up turn sent the moment
        the client has the answer finds it, on any worker."""
        if self.storing is not None and getattr(self.output, "final", None) is not None:
            self.keep_response(self.storing)
        super().write(chunk)

    async def load_previous(self, body: dict) -> None:
        """The conversation a translated call sends: the stored turns ``previous_response_id``
        continues, then this request's input. An id the gateway does not hold is a 404, unless
        the model has pass-through deployments (their provider holds its own responses)."""
        self.items = input_items(body.get("input"))
        previous_id = body.get("previous_response_id")
        if previous_id is None:
            return
        record = await stored(self.gw, previous_id, "previous_response_id")
        if record is not None and not record.visible_to(ResponseOwner.token(self.principal),
                                                        ResponseOwner.admin(self.principal)):
            record = None
        if record is None:
            deployments = self.gw.registry.resolve(body["model"])
            if not any(self.passes_through(d.provider) for d in deployments) or "mock_response" in body:
                raise not_found(previous_id, "previous_response_id")
            return
        self.previous = record
        if not record.passthrough:
            self.items = record.conversation() + self.items

    @staticmethod
    def passes_through(provider_name: str) -> bool:
        provider = PROVIDERS.get(provider_name)
        return provider is not None and "responses" in provider.passthrough_endpoints

    async def call_group(self, deployments: Sequence[Deployment], body: dict, retries: int,
                         deadline: float) -> ProxyError | None:
        """A follow-up of a pass-through response goes to the deployment that holds it."""
        held = self.previous.deployment_id if self.previous is not None and self.previous.passthrough else None
        pinned = tuple(d for d in deployments if d.id == held)
        return await super().call_group(pinned or deployments, body, retries, deadline)

    def translate(self, provider: Provider, body: dict) -> tuple[str, dict]:
        if self.endpoint in provider.passthrough_endpoints:
            self.output = PassThroughOutput()
            if self.previous is not None and not self.previous.passthrough:
                # the gateway holds the earlier turns, the provider does not: send them as input
                body = {k: v for k, v in body.items() if k != "previous_response_id"}
                body["input"] = [without_ids(item) for item in self.items]
            return self.endpoint, body
        check_tools(body)
        previous_id = body.get("previous_response_id")
        if previous_id is not None and self.previous is None:
            raise not_found(previous_id, "previous_response_id")
        if previous_id is not None and self.previous.passthrough:
            raise InvalidRequestError(
                f"Response '{previous_id[:100]}' is held by the provider of an openai/ or azure/ model, which this "
                f"model ({body['model']}) cannot read: continue it on that model.", param="previous_response_id")
        self.output = TranslatedOutput(ResponseDraft.of(body))
        return "chat", to_chat_request(body, self.items)

    def keep_response(self, body: dict) -> None:
        """Store the answer (``store`` defaults to true, as OpenAI's): a translated response
        whole, a pass-through one as the deployment that holds it (from its first event on).
        Memory and the instance's directory now, the database in the background."""
        self.storing = None
        final = getattr(self.output, "final", None)
        d = self.ctx.deployment
        if body.get("store") is False or not isinstance(final, dict) or not isinstance(final.get("id"), str) \
                or d is None:
            return
        owner = ResponseOwner.token(self.principal)
        if isinstance(self.output, PassThroughOutput):
            record = StoredResponse(id=final["id"], owner=owner, model=body["model"], deployment_id=d.id,
                                    created_at=time.time())
        else:
            record = StoredResponse(id=final["id"], owner=owner, model=body["model"], response=final,
                                    input_items=self.items, created_at=final.get("created_at") or time.time())
        self.gw.responses.save(record)


class ResponseHandler(BaseHandler):
    """``GET`` / ``DELETE /v1/responses/{response_id}``: a stored response (404 when the caller
    did not create it, unless it is the master key); a pass-through one is asked of the
    deployment that holds it."""

    async def get(self, response_id: str) -> None:
        record = await self.find(response_id)
        if record.passthrough:
            await self.forward(record, "GET")
            return
        self.write_json(record.response)

    async def delete(self, response_id: str) -> None:
        record = await self.find(response_id)
        if record.passthrough:
            await self.forward(record, "DELETE")
            if self.get_status() < 300:
                try:
                    await self.gw.responses.delete(response_id)
                except DatabaseUnavailable as exc:  # deleted where it lives; only the record stays
                    self.gw.responses.forget(response_id)
                    log.warning("response %s: deleted by its provider, its database record stays (%s)",
                                response_id, exc)
            return
        await self.forget(response_id)
        self.write_json({"id": response_id, "object": "response", "deleted": True})

    async def forget(self, response_id: str) -> None:
        try:
            await self.gw.responses.delete(response_id)
        except DatabaseUnavailable as exc:
            raise ServiceUnavailableError(f"Database unavailable ({exc}): response '{response_id[:100]}' was not "
                                          "deleted.", param="response_id") from None

    async def find(self, response_id: str) -> StoredResponse:
        record = await stored(self.gw, response_id)
        if record is None or not record.visible_to(ResponseOwner.token(self.principal),
                                                   ResponseOwner.admin(self.principal)):
            raise not_found(response_id)
        return record

    async def forward(self, record: StoredResponse, method: str, suffix: str = "", params: str = "") -> None:
        d = self.gw.registry.by_id.get(record.deployment_id or "")
        if d is None:
            raise NotFoundError(f"Response '{record.id[:100]}' was answered by deployment {record.deployment_id}, "
                                "which is no longer configured.", param="response_id")
        self.ctx.deployment = d
        self.set_model_headers(d)
        provider = PROVIDERS[d.provider]
        request = provider.stored_response_request(d, method, record.id, suffix, params)
        started = time.perf_counter()
        with naming_deployment(d, self.ctx.call_id):
            reply = await self.gw.upstream.fetch(request, d.timeout or self.gw.settings.timeout, Transfer(),
                                                 ssl_verify=d.ssl_verify)
        self.ctx.upstream_s = time.perf_counter() - started
        if not 200 <= reply.status < 300:
            error: ProxyError = provider.parse_error(reply, d)
            raise d.scrubber.error(error)
        self.set_status(reply.status)
        self.set_header("Content-Type", "application/json")
        self.finish(reply.body)


class ResponseInputItemsHandler(ResponseHandler):
    """``GET /v1/responses/{response_id}/input_items``: the items the response was made from
    (for a translated model: the whole conversation sent, earlier turns included), as OpenAI's
    list: ``limit`` (1-100, 20), ``order`` (``desc`` by default, or ``asc``), ``after``."""

    async def get(self, response_id: str) -> None:
        limit, order, after = self.list_arguments()
        record = await self.find(response_id)
        if record.passthrough:
            await self.forward(record, "GET", "/input_items", urlencode(
                {k: v for k, v in (("limit", limit), ("order", order), ("after", after)) if v is not None}))
            return
        self.write_json(item_page(record, limit, order, after))

    def list_arguments(self) -> tuple[int, str, str | None]:
        try:
            limit = int(self.get_query_argument("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            raise InvalidRequestError("limit must be an integer from 1 to 100.", param="limit")
        order = self.get_query_argument("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidRequestError("order must be 'asc' or 'desc'.", param="order")
        return limit, order, self.get_query_argument("after", None)


def item_page(record: StoredResponse, limit: int, order: str, after: str | None) -> dict:
    """One page of a translated response's input items, each with an id (the client's, or one
    derived from the response id and the item's place, so ``after`` works across calls)."""
    items = [item if item.get("id") else {"id": f"msg_{record.id[5:]}_{n}", **item}
             for n, item in enumerate(dict(i) for i in record.input_items)]
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise InvalidRequestError(f"No input item with id '{after[:100]}' in this response.", param="after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}


HANDLERS = {"responses": ResponsesHandler, "response": ResponseHandler,
            "response_input_items": ResponseInputItemsHandler}
