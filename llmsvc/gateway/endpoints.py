"""The `/v1` endpoints that reach a provider, and the sessions', one function each.

Each reads and translates its API's body (its own module: request.py, responses.py,
messages.py, embeddings.py), then hands an exchange with its API's wire to the gateway
(app.py), which admits, runs, counts and charges it the same way for every API.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, MutableMapping
from typing import Any, Protocol

from llmsvc.errors import ServiceUnavailable
from llmsvc.gateway.attribution import Attribution, attribution, read_attribution
from llmsvc.gateway.conversations import Conversations
from llmsvc.gateway.count_tokens import count_tokens
from llmsvc.gateway.embeddings import EmbeddingsWire, parse_embeddings
from llmsvc.gateway.errors import send_json
from llmsvc.gateway.messages import CountRequest, beta_headers, messages_as_chat, parse_messages
from llmsvc.gateway.messages_wire import MessagesWire
from llmsvc.gateway.request import CALLER, parse_chat, read_body, request_id_header
from llmsvc.gateway.responses import (
    forwardable,
    parse_responses,
    previous_history,
    responses_as_chat,
)
from llmsvc.gateway.responses_wire import ResponsesWire, echoed
from llmsvc.gateway.router import Router
from llmsvc.gateway.sessions import Sessions, is_session
from llmsvc.gateway.sse import ASGIReceive, ASGISend, ChatWire
from llmsvc.gateway.wire import Wire
from llmsvc.providers.base import Native
from llmsvc.providers.embeddings import EMBEDDINGS
from llmsvc.tokens import count_prompt

Scope = MutableMapping[str, Any]
# A generating endpoint returns its serving for the gateway to await: an open stream lasts
# minutes, and with thousands open the endpoint's frame would cost its raw body, validated
# model and headers (a client SDK sends a dozen or more) for each one.
Serving = Coroutine[Any, Any, None]


class Gateway(Protocol):
    """What an endpoint asks of the gateway (app.py): admission, then serving an exchange."""

    router: Router
    conversations: Conversations | None
    sessions: Sessions | None
    max_body_bytes: int
    store_embeddings: bool

    async def admit(self, scope: Scope, receive: ASGIReceive) -> tuple[dict[bytes, bytes], bytes]:
        """The admitted request's headers and body."""
        ...

    def serve(
        self,
        scope: Scope,
        send: ASGISend,
        headers: dict[bytes, bytes],
        data: dict[str, Any],
        model: str,
        stream: bool,
        attribution: Attribution,
        wire: Callable[[str, int], Wire],
        api: str,
        native: Native | None = None,
        store_content: bool = True,
        params: dict[str, Any] | None = None,
    ) -> Serving:
        """The admitted request's serving, through an exchange with this wire."""
        ...


SESSION_PREFIX = "/v1/sessions/"


async def chat_completions(
    gateway: Gateway, scope: Scope, receive: ASGIReceive, send: ASGISend
) -> Serving:
    headers, body = await gateway.admit(scope, receive)
    data, request = parse_chat(body)
    attribution = read_attribution(data, request, headers)
    if is_session(attribution.session_id):
        history = await session_store(gateway).history(attribution.session_id, scope.get(CALLER))
        data["messages"] = [*history, *data["messages"]]
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    model, stream = request.model, request.stream
    return gateway.serve(
        scope,
        send,
        headers,
        data,
        model,
        stream,
        attribution,
        lambda rid, created: ChatWire(f"chatcmpl-{rid}", created, model, include_usage),
        "chat",
    )


async def embeddings(
    gateway: Gateway, scope: Scope, receive: ASGIReceive, send: ASGISend
) -> Serving:
    """`POST /v1/embeddings`: sent natively (a provider without the API refuses it), never
    streamed; its messages are none and its vectors stored only with `store_embeddings`."""
    headers, body = await gateway.admit(scope, receive)
    data, request = parse_embeddings(body)
    attribution = read_attribution(data, request, headers)
    model, encoding_format = request.model, request.encoding_format
    return gateway.serve(
        scope,
        send,
        headers,
        {"messages": []},
        model,
        False,
        attribution,
        lambda rid, created: EmbeddingsWire(model, encoding_format),
        api=EMBEDDINGS,
        native=Native(EMBEDDINGS, data),
        store_content=gateway.store_embeddings,
    )


async def messages(gateway: Gateway, scope: Scope, receive: ASGIReceive, send: ASGISend) -> Serving:
    """Anthropic's Messages API (gateway/messages.py, messages_wire.py); an Anthropic
    provider is sent the client's body, any other its chat-completion form."""
    headers, body = await gateway.admit(scope, receive)
    native, request = parse_messages(body)
    data = messages_as_chat(native, request)
    user = request.metadata.user_id if request.metadata is not None else None
    model, stream = request.model, request.stream
    return gateway.serve(
        scope,
        send,
        headers,
        data,
        model,
        stream,
        attribution(user, None, None, headers),
        lambda rid, _created: MessagesWire(
            f"msg_{rid}", model, lambda: count_prompt(model, data["messages"])[0]
        ),
        api="messages",
        native=Native("messages", native, beta_headers(headers)),
    )


async def count_message_tokens(
    gateway: Gateway, scope: Scope, receive: ASGIReceive, send: ASGISend
) -> None:
    """A Messages body's input tokens (gateway/count_tokens.py); not a generation."""
    headers = dict(scope["headers"])
    native, request = parse_messages(
        await read_body(receive, headers, gateway.max_body_bytes), CountRequest
    )
    chat = messages_as_chat(native, request)
    forwarded = Native("messages", native, beta_headers(headers))
    answer = await count_tokens(gateway.router, scope.get(CALLER), forwarded, chat)
    await send_json(send, 200, answer, [request_id_header(scope)])


async def responses(
    gateway: Gateway, scope: Scope, receive: ASGIReceive, send: ASGISend
) -> Serving:
    """`POST /v1/responses`: a chat completion to a provider without the Responses API, the
    body itself (its history resolved) to one with it; the client's body is the params."""
    headers, body = await gateway.admit(scope, receive)
    client, request = parse_responses(body)
    attribution = read_attribution(client, request, headers)
    history = []
    if request.previous_response_id is not None:
        history = await previous_history(
            gateway.conversations, request.previous_response_id, scope.get(CALLER)
        )
    model, fields, stream = request.model, echoed(client), request.stream
    chat = responses_as_chat(request, history)
    return gateway.serve(
        scope,
        send,
        headers,
        chat,
        model,
        stream,
        attribution,
        lambda rid, created: ResponsesWire(rid, created, model, fields),
        api="responses",
        native=Native("responses", forwardable(client, history)),
        params={k: v for k, v in client.items() if k != "model"},
    )


def session_store(gateway: Gateway) -> Sessions:
    """The sessions, or a 503 from a gateway built without a store (some tests')."""
    if gateway.sessions is None:
        raise ServiceUnavailable("sessions need llmsvc's store, and this gateway has none")
    return gateway.sessions


async def create_session(
    gateway: Gateway, scope: Scope, receive: ASGIReceive, send: ASGISend
) -> None:
    """`POST /v1/sessions` (gateway/sessions.py has the rest of the session routes' logic)."""
    body = await read_body(receive, dict(scope["headers"]), gateway.max_body_bytes)
    session = await session_store(gateway).create(body, scope.get(CALLER))
    await send_json(send, 201, session, [request_id_header(scope)])


async def retrieve_session(
    gateway: Gateway, scope: Scope, receive: ASGIReceive, send: ASGISend
) -> None:
    session_id = scope["path"][len(SESSION_PREFIX) :]
    session = await session_store(gateway).retrieve(session_id, scope.get(CALLER))
    await send_json(send, 200, session, [request_id_header(scope)])


async def delete_session(
    gateway: Gateway, scope: Scope, receive: ASGIReceive, send: ASGISend
) -> None:
    session_id = scope["path"][len(SESSION_PREFIX) :]
    await session_store(gateway).delete(session_id, scope.get(CALLER))
    await send(
        {"type": "http.response.start", "status": 204, "headers": [request_id_header(scope)]}
    )
    await send({"type": "http.response.body", "body": b""})
