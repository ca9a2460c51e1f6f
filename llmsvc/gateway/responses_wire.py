"""The Responses API's wire: its typed SSE events, and the whole `response` object.

OpenAI's stream repeats what it sent in closing events (the text of a part,
the whole item, the whole response), so the wire keeps the reply so far; all
of it was journaled before the exchange asked for the frames.
"""

from __future__ import annotations

from typing import Any

import orjson

from llmsvc.gateway.wire import Usage
from llmsvc.store.conversations import Turn
from llmsvc.store.keys import utc

DEFAULTS: dict[str, Any] = {
    "instructions": None,
    "max_output_tokens": None,
    "metadata": {},
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "store": True,
    "temperature": 1.0,
    "text": {"format": {"type": "text"}},
    "tool_choice": "auto",
    "tools": [],
    "top_p": 1.0,
    "truncation": "disabled",
}


def echoed(params: dict[str, Any]) -> dict[str, Any]:
    """The request's fields a `response` object repeats, from the body as the client sent it."""
    fields = {k: params[k] if params.get(k) is not None else v for k, v in DEFAULTS.items()}
    if params.get("user") is not None:  # OpenAI's schema has it a string when present
        fields["user"] = params["user"]
    fields["tools"] = [
        {"description": None, "parameters": None, "strict": True, **tool}
        for tool in fields["tools"]
    ]
    return fields


def usage_object(usage: Usage) -> dict[str, Any]:
    """The Responses usage: the stored counts, a count nobody knows null (never 0), and
    `llmsvc_counted` naming the counts llmsvc made itself. No provider llmsvc reads reports
    cached or reasoning tokens apart: those details are 0, as OpenAI's schema wants integers."""
    prompt, completion, counted = usage
    total = prompt + completion if prompt is not None and completion is not None else None
    body: dict[str, Any] = {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": total,
    }
    if counted:
        body["llmsvc_counted"] = {
            {"prompt_tokens": "input_tokens", "completion_tokens": "output_tokens"}[k]: v
            for k, v in counted.items()
        }
    return body


def response_object(
    response_id: str,
    created: int,
    model: str,
    fields: dict[str, Any],
    status: str,
    output: list[dict[str, Any]],
    usage: Usage | None,
    error: dict[str, Any] | None = None,
    incomplete: str | None = None,
) -> dict[str, Any]:
    """A `response` object in OpenAI's shape; `incomplete`: why it is (INCOMPLETE). A response
    under way has no `usage` yet (the schema has no null for it)."""
    response = {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "model": model,
        "output": output,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        **fields,
    }
    if usage is not None:
        response["usage"] = usage_object(usage)
    return response


def message_item(item_id: str, status: str, text: str, refusal: str | None) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if text or not refusal:
        content.append({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    if refusal:
        content.append({"type": "refusal", "refusal": refusal})
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": content,
    }


def call_item(item_id: str, status: str, call: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call.get("id") or "",
        "name": call.get("name") or "",
        "arguments": call.get("arguments") or "",
    }


def whole_output(
    rid: str, content: str, tool_calls: list[dict[str, Any]], refusal: str | None, status: str
) -> list[dict[str, Any]]:
    """A reply's output items: its message (if it said anything, or called nothing), then its
    function calls, as a stored reply is rebuilt too."""
    item_status = "incomplete" if status == "incomplete" else "completed"
    output = []
    if content or refusal or not tool_calls:
        output.append(message_item(f"msg_{rid}", item_status, content, refusal))
    output += [call_item(f"fc_{rid}_{n}", item_status, call) for n, call in enumerate(tool_calls)]
    return output


# The finish reasons that make a response `incomplete`, and the reason it then gives.
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


class ResponsesWire:
    """One response's events; `fields` are the request's echoed fields (`echoed`)."""

    def __init__(self, rid: str, created: int, model: str, fields: dict[str, Any]) -> None:
        self.rid, self.created, self.model, self.fields = rid, created, model, fields
        self.response_id = f"resp_{rid}"
        self.seq = 0  # every event's sequence_number
        self.output: list[dict[str, Any]] = []  # items as sent so far
        self.open: dict[str, Any] | None = None  # the item being streamed, last in output
        self.part: dict[str, Any] | None = None  # its content part being streamed
        self.pieces: list[str] = []  # that part's text so far
        self.calls: dict[int, dict[str, Any]] = {}  # function call items by the deltas' index

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    def _response(
        self,
        status: str,
        usage: Usage | None = None,
        error: dict[str, Any] | None = None,
        incomplete: str | None = None,
    ) -> dict[str, Any]:
        return response_object(
            self.response_id,
            self.created,
            self.model,
            self.fields,
            status,
            self.output,
            usage,
            error,
            incomplete,
        )

    def opening(self, prompt_tokens: int | None) -> bytes:
        """Nothing: the exchange builds the first frame before it asks for the opening, and
        this wire's events are numbered in order, so each frame begins the stream if it is
        the first (`_begin`)."""
        return b""

    def _begin(self) -> bytes:
        """`response.created` and `response.in_progress`, before the stream's first event."""
        if self.seq:
            return b""
        return self._event(
            "response.created", response=self._response("in_progress")
        ) + self._event("response.in_progress", response=self._response("in_progress"))

    def _where(self) -> dict[str, Any]:
        assert self.open is not None
        return {"item_id": self.open["id"], "output_index": len(self.output) - 1}

    def _part_where(self) -> dict[str, Any]:
        """Where the open part is: its item and its index in the item's content."""
        assert self.open is not None
        return {**self._where(), "content_index": len(self.open["content"]) - 1}

    def _open_part(self, kind: str) -> bytes:
        """The message item and a part of `kind` (output_text or refusal) open to stream into."""
        frames = self._begin()
        if self.open is None or self.open["type"] != "message":
            frames += self._close_item("completed")
            n = len(self.output)
            item_id = f"msg_{self.rid}" if n == 0 else f"msg_{self.rid}_{n}"
            self.open = {
                "id": item_id,
                "type": "message",
                "role": "assistant",
                "status": "in_progress",
                "content": [],
            }
            self.output.append(self.open)
            frames += self._event("response.output_item.added", output_index=n, item=self.open)
        if self.part is None or self.part["type"] != kind:
            frames += self._close_part()
            empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            self.part = empty if kind == "output_text" else {"type": "refusal", "refusal": ""}
            self.open["content"].append(self.part)
            frames += self._event(
                "response.content_part.added", **self._part_where(), part=self.part
            )
        return frames

    def _close_part(self) -> bytes:
        if self.part is None or self.open is None:
            return b""
        text, self.pieces = "".join(self.pieces), []
        where = self._part_where()
        if self.part["type"] == "output_text":
            self.part["text"] = text
            done = self._event("response.output_text.done", **where, text=text, logprobs=[])
        else:
            self.part["refusal"] = text
            done = self._event("response.refusal.done", **where, refusal=text)
        frames = done + self._event("response.content_part.done", **where, part=self.part)
        self.part = None
        return frames

    def _close_item(self, status: str) -> bytes:
        """Close the item being streamed (with its part), saying all it holds."""
        if self.open is None:
            return b""
        frames = self._close_part()
        where = self._where()
        if self.open["type"] == "function_call":
            frames += self._event(
                "response.function_call_arguments.done",
                **where,
                name=self.open["name"],
                arguments=self.open["arguments"],
            )
        self.open["status"] = status
        frames += self._event(
            "response.output_item.done", output_index=where["output_index"], item=self.open
        )
        self.open = None
        return frames

    def tokens(self, texts: list[str]) -> bytes:
        """One delta event per journaled batch."""
        return self._part_delta("output_text", "response.output_text.delta", texts, logprobs=[])

    def refusal(self, texts: list[str]) -> bytes:
        return self._part_delta("refusal", "response.refusal.delta", texts)

    def _part_delta(self, kind: str, event: str, texts: list[str], **extra: Any) -> bytes:
        frames = self._open_part(kind)
        delta = "".join(texts)
        self.pieces.append(delta)
        return frames + self._event(event, **self._part_where(), delta=delta, **extra)

    def tool_calls(self, deltas: list[dict[str, Any]]) -> bytes:
        frames = self._begin()
        for delta in deltas:
            index = delta.get("index") or 0
            item = self.calls.get(index)
            if item is None:
                frames += self._close_item("completed")
                n = len(self.output)
                item = call_item(f"fc_{self.rid}_{len(self.calls)}", "in_progress", delta)
                item["arguments"] = ""
                self.calls[index] = self.open = item
                self.output.append(item)
                frames += self._event("response.output_item.added", output_index=n, item=item)
            item["call_id"] = item["call_id"] or delta.get("id") or ""
            item["name"] = item["name"] or delta.get("name") or ""
            if delta.get("arguments"):
                item["arguments"] += delta["arguments"]
                frames += self._event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=self.output.index(item),
                    delta=delta["arguments"],
                )
        return frames

    def closing(self, finish_reason: str, usage: Usage) -> bytes:
        incomplete = INCOMPLETE.get(finish_reason)
        status = "incomplete" if incomplete else "completed"
        frames = self._begin() + self._close_item(status)
        response = self._response(status, usage, incomplete=incomplete)
        return frames + self._event(f"response.{status}", response=response)

    def failure(self, error: dict[str, Any]) -> bytes:
        if self.open is not None:
            self.open["status"] = "incomplete"
            if self.part is not None:
                self.part["text" if self.part["type"] == "output_text" else "refusal"] = "".join(
                    self.pieces
                )
        failed = {"code": "server_error", "message": error["message"]}
        return self._event("response.failed", response=self._response("failed", error=failed))

    def whole(
        self,
        content: str,
        finish_reason: str,
        usage: Usage,
        tool_calls: list[dict[str, Any]],
        refusal: str | None,
    ) -> bytes:
        incomplete = INCOMPLETE.get(finish_reason)
        status = "incomplete" if incomplete else "completed"
        self.output = whole_output(self.rid, content, tool_calls, refusal, status)
        return orjson.dumps(self._response(status, usage, incomplete=incomplete))


# A stored request's status as a response's; `interrupted` and `failed` are both `failed`.
STORED_STATUS = {"completed": "completed", "streaming": "in_progress"}
COUNTED = ("tokenizer", "estimate", "deltas")  # the token sources that are llmsvc's counts


def stored_object(turn: Turn) -> dict[str, Any]:
    """A stored response as `GET /v1/responses/{id}` answers it: the request as the client
    sent it, the last attempt's stored text and tool calls, the stored counts."""
    row = turn.request
    rid = row["id"].hex
    status = STORED_STATUS.get(row["status"], "failed")
    finish = turn.attempts[-1]["finish_reason"] if turn.attempts else None
    incomplete = INCOMPLETE.get(finish) if status == "completed" and finish else None
    if incomplete:
        status = "incomplete"
    sources = {
        "prompt_tokens": row["prompt_tokens_source"],
        "completion_tokens": row["completion_tokens_source"],
    }
    counted = {k: v for k, v in sources.items() if v in COUNTED}
    usage = Usage(row["prompt_tokens"], row["completion_tokens"], counted or None)
    error = None
    if status == "failed":
        error = {"code": "server_error", "message": row["error"] or row["status"]}
    return response_object(
        f"resp_{rid}",
        int(utc(row["created_at"]).timestamp()),
        row["model"],
        echoed(row["params"]),
        status,
        whole_output(rid, turn.reply, turn.tool_calls, None, status),
        usage if turn.ended else None,
        error,
        incomplete=incomplete,
    )
