"""Anthropic's Messages API, read: a client's `POST /v1/messages` body validated, and its
chat-completion form (what a provider that does not speak Messages is sent, and what the
store keeps as the request's messages).

The reverse of `providers/anthropic.py:to_anthropic`: `system` becomes a system
message, `tool_use` blocks an assistant's `tool_calls` (arguments as JSON text),
`tool_result` blocks `tool` messages, images `image_url` parts, `stop_sequences`
`stop`, tools function tools, `tool_choice` any `required`, `metadata.user_id`
`user`. `top_k` has no chat-completion field and reaches only an Anthropic
provider, which is sent the client's own body. Blocks llmsvc does not read
(`thinking`, `redacted_thinking`, `document`, server tools) are forwarded to such a
provider as sent and left out of the chat form.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from llmsvc.errors import ClientError
from llmsvc.gateway.request import Integer, parse_body

# Block types only an Anthropic provider reads: forwarded to it, left out of the chat form.
PASSED_BLOCKS = frozenset(
    {
        "thinking",
        "redacted_thinking",
        "document",
        "search_result",
        "server_tool_use",
        "web_search_tool_result",
    }
)
CHOICES = {"auto": "auto", "any": "required", "none": "none"}  # Anthropic's -> OpenAI's


def _content(value: Any) -> Any:
    """A string or a list of blocks (objects), checked in one step so that an error names the
    field, not a member of a union; the blocks are checked by their type later."""
    if isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(block, dict) for block in value)
    ):
        return value
    raise ValueError("must be a string or a list of content blocks")


Content = Annotated[Any, BeforeValidator(_content)]


class _Strict(BaseModel):
    """Strict types; other fields (`cache_control`, `citations`, ...) are forwarded as sent."""

    model_config = ConfigDict(extra="allow", strict=True)


class TextBlock(_Strict):
    type: Literal["text"]
    text: str


class ImageSource(_Strict):
    type: Literal["base64", "url"]
    media_type: str | None = None
    data: str | None = None
    url: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> ImageSource:
        """The fields its type needs: base64 `media_type` and `data`, or a `url`."""
        if self.type == "url" and not self.url:
            raise ValueError("a url image needs `url`")
        if self.type == "base64" and not (self.media_type and self.data):
            raise ValueError("a base64 image needs `media_type` and `data`")
        return self


class ImageBlock(_Strict):
    type: Literal["image"]
    source: ImageSource


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: Content | None = None
    is_error: bool | None = None


BLOCKS: dict[str, type[_Strict]] = {
    "text": TextBlock,
    "image": ImageBlock,
    "tool_use": ToolUseBlock,
    "tool_result": ToolResultBlock,
}
RESULT_BLOCKS = ("text", "image")  # what a tool result's content may hold


class Turn(_Strict):
    """One message: a user's or the assistant's turn."""

    role: Literal["user", "assistant"]
    content: Content


class ToolSpec(_Strict):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any] | None = None  # server tools (`type`) have none


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class UserMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: str | None = Field(default=None, max_length=256)


class MessagesRequest(_Strict):
    """The fields llmsvc reads; anything else reaches an Anthropic provider as sent."""

    model: str = Field(min_length=1, max_length=200)
    max_tokens: Integer = Field(ge=1, le=1_000_000)
    messages: list[Turn] = Field(min_length=1)
    system: Content | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoice | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: Integer | None = Field(default=None, ge=0)
    metadata: UserMetadata | None = None
    stream: bool = False
    mock_delay_ms: float | None = Field(default=None, ge=0, le=60_000)  # llmsvc's mock only


class CountRequest(MessagesRequest):
    """`/v1/messages/count_tokens` takes a Messages body without `max_tokens`."""

    max_tokens: Integer = Field(default=1, ge=1, le=1_000_000)


def beta_headers(headers: dict[bytes, bytes]) -> tuple[tuple[str, str], ...]:
    """The client's `anthropic-beta` header, which an Anthropic provider is sent as it came:
    a beta's fields in the body (Claude Code's, say) are refused upstream without it."""
    beta = headers.get(b"anthropic-beta")
    return (("anthropic-beta", beta.decode("latin-1")),) if beta else ()


def parse_messages(
    body: bytes, model: type[MessagesRequest] = MessagesRequest
) -> tuple[dict[str, Any], MessagesRequest]:
    """The body as sent (to forward natively) and validated; ClientError names the field,
    down to a content block's (`messages.0.content.1.input`)."""
    data, request = parse_body(body, model)
    if "max_tokens" in data:
        data["max_tokens"] = request.max_tokens  # an integral float as the int it is
    for i, message in enumerate(request.messages):
        if isinstance(message.content, list):
            _check_blocks(message.content, f"messages.{i}.content", BLOCKS.keys())
    if isinstance(request.system, list):
        _check_blocks(request.system, "system", ("text",))
    choice = request.tool_choice
    if choice is not None and choice.type == "tool" and not choice.name:
        raise ClientError("tool_choice.name: required when type is tool", param="tool_choice.name")
    return data, request


def _check_blocks(blocks: list[dict[str, Any]], where: str, allowed: Any) -> None:
    for j, block in enumerate(blocks):
        kind = str(block.get("type"))
        if kind in PASSED_BLOCKS and where.startswith("messages"):
            continue
        if kind not in allowed:
            raise ClientError(
                f"{where}.{j}.type: must be one of {', '.join(allowed)}, not {kind!r}",
                param=f"{where}.{j}.type",
            )
        checked = _validate(BLOCKS[kind], block, f"{where}.{j}")
        if isinstance(checked, ToolResultBlock) and isinstance(checked.content, list):
            _check_blocks(checked.content, f"{where}.{j}.content", RESULT_BLOCKS)


def _validate(model: type[_Strict], value: dict[str, Any], where: str) -> _Strict:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join([where, *(str(part) for part in err["loc"])])
        raise ClientError(f"{field}: {err['msg']}", param=field) from None


def messages_as_chat(data: dict[str, Any], request: MessagesRequest) -> dict[str, Any]:
    """The request as a chat completion: what a provider that does not speak Messages gets."""
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": _text(request.system)})
    for message in data["messages"]:
        messages += _chat_messages(message["role"], message["content"])
    out: dict[str, Any] = {
        "model": request.model,
        "messages": messages,
        "max_tokens": request.max_tokens,
        "stream": request.stream,
    }
    if request.stop_sequences:
        out["stop"] = request.stop_sequences
    for name in ("temperature", "top_p", "mock_delay_ms"):
        if getattr(request, name) is not None:
            out[name] = getattr(request, name)
    if request.metadata is not None and request.metadata.user_id:
        out["user"] = request.metadata.user_id
    tools = [tool for tool in data.get("tools") or () if "input_schema" in tool]
    if tools:
        out["tools"] = [_function(tool) for tool in tools]
    choice = request.tool_choice
    if choice is not None:
        if choice.type == "tool":
            out["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            out["tool_choice"] = CHOICES[choice.type]
        if choice.disable_parallel_tool_use and choice.type != "none":
            out["parallel_tool_calls"] = False
    return out


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    function = {"name": tool["name"], "parameters": tool["input_schema"]}
    if tool.get("description"):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _chat_messages(role: str, content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One Messages turn as chat messages: a user turn's tool results come first, each a `tool`
    message (they answer the assistant turn before), then what the user said."""
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if role == "assistant":
        text = "".join(block["text"] for block in content if block["type"] == "text")
        calls = [_tool_call(block) for block in content if block["type"] == "tool_use"]
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            message["tool_calls"] = calls
        return [message] if text or calls else []
    out = [
        {"role": "tool", "tool_call_id": block["tool_use_id"], "content": _result(block)}
        for block in content
        if block["type"] == "tool_result"
    ]
    parts = [_part(block) for block in content if block["type"] in RESULT_BLOCKS]
    if len(parts) == 1 and parts[0]["type"] == "text":
        out.append({"role": "user", "content": parts[0]["text"]})
    elif parts:
        out.append({"role": "user", "content": parts})
    return out


def _tool_call(block: dict[str, Any]) -> dict[str, Any]:
    arguments = orjson.dumps(block["input"]).decode()
    return {
        "id": block["id"],
        "type": "function",
        "function": {"name": block["name"], "arguments": arguments},
    }


def _result(block: dict[str, Any]) -> str:
    """A tool result's text (a `tool` message holds text only; an image in it is left out)."""
    content = block.get("content")
    return content if isinstance(content, str) else _text(content or [])


def _part(block: dict[str, Any]) -> dict[str, Any]:
    if block["type"] == "text":
        return {"type": "text", "text": block["text"]}
    source = block["source"]
    url = source.get("url") if source["type"] == "url" else None
    if url is None:
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    return {"type": "image_url", "image_url": {"url": url}}


def _text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "".join(block.get("text", "") for block in content if block.get("type") == "text")
