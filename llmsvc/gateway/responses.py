"""OpenAI's Responses API in, a chat completion out: validating a `/v1/responses` body and
translating it, its `previous_response_id` resolved from llmsvc's own store.

A continued response's history is what the previous response's provider was
sent plus its reply (a stored turn), so a conversation goes on across
provider kinds and daemon restarts. The body a Responses upstream is sent has
that history as input items, in front of the client's own.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from llmsvc.callers import Caller
from llmsvc.errors import ClientError, NotFound, ServiceUnavailable
from llmsvc.gateway.conversations import Conversations
from llmsvc.gateway.request import Integer, Metadata, parse_body
from llmsvc.store.conversations import Turn

RESPONSE_PREFIX = "resp_"


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["input_text", "output_text"]
    text: str


class MessageItem(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["message"]
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str
    id: str | None = None
    status: str | None = None


def _as_items(given: Any) -> Any:
    """A string input is one user message, and an item without `type` a message, as OpenAI
    reads them."""
    if isinstance(given, str):
        return [{"type": "message", "role": "user", "content": given}]
    if isinstance(given, list):
        return [
            {"type": "message", **item} if isinstance(item, dict) and "type" not in item else item
            for item in given
        ]
    return given


InputItem = Annotated[
    MessageItem | FunctionCallItem | FunctionCallOutputItem,
    Field(discriminator="type"),
]


def _function_only(tool: Any) -> Any:
    """Tools OpenAI runs itself (web search, file search...) have no provider here to run them."""
    if isinstance(tool, dict) and tool.get("type") != "function":
        raise ValueError(
            f"llmsvc takes function tools only (type 'function'); {tool.get('type')!r} is a "
            "tool OpenAI runs itself"
        )
    return tool


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    format: TextFormat | None = None


class ResponsesRequest(BaseModel):
    """The Responses fields llmsvc serves; any other field is refused, naming it, rather than
    silently not done."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1, max_length=200)
    input: Annotated[list[InputItem], BeforeValidator(_as_items)]
    instructions: str | None = None
    tools: list[Annotated[FunctionTool, BeforeValidator(_function_only)]] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: Integer | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    text: TextConfig | None = None
    truncation: Literal["disabled"] | None = None
    metadata: Metadata | None = None
    user: str | None = Field(default=None, max_length=256)
    session_id: str | None = Field(default=None, max_length=200)  # llmsvc's attribution
    mock_delay_ms: float | None = Field(default=None, ge=0, le=60_000)  # the mock provider's


def parse_responses(body: bytes) -> tuple[dict[str, Any], ResponsesRequest]:
    """The body as sent (stored as the response's params) and validated."""
    data, request = parse_body(body, ResponsesRequest)
    if request.max_output_tokens is not None:
        data["max_output_tokens"] = request.max_output_tokens
    return data, request


def response_uuid(response_id: str) -> uuid.UUID | None:
    """The request id a `resp_<hex>` names, or None if it names none."""
    if not response_id.startswith(RESPONSE_PREFIX):
        return None
    try:
        return uuid.UUID(hex=response_id[len(RESPONSE_PREFIX) :])
    except ValueError:
        return None


async def stored_response(
    conversations: Conversations | None, response_id: str, caller: Caller | None
) -> Turn | None:
    """The stored response a client may see: one of its own key's, stored, not deleted."""
    rid = response_uuid(response_id)
    if rid is None:
        return None
    if conversations is None:
        raise ServiceUnavailable("this gateway has no store to keep responses in")
    found = await conversations.turn(rid)
    if found is None:
        return None
    row = found.request
    mine = caller is None or row["key_id"] == caller.key_id
    stored = row["api"] == "responses" and row["params"].get("store", True)
    return found if mine and stored and row["deleted_at"] is None else None


async def get_response(
    conversations: Conversations | None, response_id: str, caller: Caller | None
) -> Turn:
    """The stored response, or a 404 as OpenAI answers one it does not have."""
    found = await stored_response(conversations, response_id, caller)
    if found is None:
        raise NotFound(f"No response found with id '{response_id}'.")
    return found


async def previous_history(
    conversations: Conversations | None, response_id: str, caller: Caller | None
) -> list[dict[str, Any]]:
    """The chat messages a continuation of that response starts with: what its provider was
    sent and its reply, minus its `instructions` (OpenAI does not carry those over)."""
    found = await stored_response(conversations, response_id, caller)
    if found is None or found.request["status"] != "completed":
        raise ClientError(
            f"Previous response with id '{response_id}' not found.", param="previous_response_id"
        )
    history = found.history()
    return history[1:] if found.request["params"].get("instructions") else history


def _text(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def chat_messages(items: list[InputItem]) -> list[dict[str, Any]]:
    """Input items as chat messages; consecutive function calls are one assistant message."""
    messages: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": _text(item.content)})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        else:
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant":
                last = {"role": "assistant", "content": None}
                messages.append(last)
            last.setdefault("tool_calls", []).append(call)
    return messages


def responses_as_chat(request: ResponsesRequest, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The request as the chat completion a provider without the Responses API is sent."""
    system = [{"role": "system", "content": request.instructions}] if request.instructions else []
    data: dict[str, Any] = {
        "model": request.model,
        "messages": [*system, *history, *chat_messages(request.input)],
        "stream": request.stream,
    }
    if request.tools:
        data["tools"] = [
            {
                "type": "function",
                "function": tool.model_dump(exclude={"type"}, exclude_none=True),
            }
            for tool in request.tools
        ]
        if request.parallel_tool_calls is not None:
            data["parallel_tool_calls"] = request.parallel_tool_calls
        choice = request.tool_choice  # chat completions take it only with tools
        if isinstance(choice, FunctionChoice):
            data["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        elif choice is not None:
            data["tool_choice"] = choice
    passed = {
        "max_tokens": request.max_output_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "user": request.user,
        "mock_delay_ms": request.mock_delay_ms,
    }
    data.update({k: v for k, v in passed.items() if v is not None})
    return data


def history_items(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages (a stored history) as Responses input items."""
    items: list[dict[str, Any]] = []
    for message in messages:
        role, content = message["role"], message.get("content")
        text = content if isinstance(content, str) else ""  # a stored turn's is text or null
        if role == "tool":
            items.append(
                {
                    "type": "function_call_output",
                    "call_id": message.get("tool_call_id") or "",
                    "output": text,
                }
            )
        elif role == "assistant":
            if text:
                part = {"type": "output_text", "text": text, "annotations": []}
                items.append({"type": "message", "role": "assistant", "content": [part]})
            for call in message.get("tool_calls") or ():
                function = call.get("function") or {}
                items.append(
                    {
                        "type": "function_call",
                        "call_id": call.get("id") or "",
                        "name": function.get("name") or "",
                        "arguments": function.get("arguments") or "",
                    }
                )
        else:
            part = {"type": "input_text", "text": text}
            items.append({"type": "message", "role": role, "content": [part]})
    return items


def forwardable(client: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """The body a Responses upstream is sent: the history as input items before the client's
    input, no `previous_response_id` (the upstream never saw that response)."""
    local = ("previous_response_id", "session_id", "mock_delay_ms")  # not the upstream's
    body = {k: v for k, v in client.items() if k not in local}
    if history:
        given = client["input"]
        if isinstance(given, str):
            given = [{"type": "message", "role": "user", "content": given}]
        body["input"] = [*history_items(history), *given]
    return body
