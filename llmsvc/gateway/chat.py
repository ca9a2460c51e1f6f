"""One request to a provider, whatever API it came by: journal it, call the provider,
forward what was journaled through the request's wire (gateway/wire.py).

Every token batch is appended to the WAL and its batch future awaited before
the batch is written to the client socket: whatever the client received, the
log holds. Response headers wait for the first journaled batch, so a failure
before any token is still a plain HTTP error. When the WAL's disk fills up the
request ends with what was journaled, and its end records wait in memory
until space returns.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from llmsvc.callers import Caller
from llmsvc.config import RetryPolicy
from llmsvc.errors import (
    LlmsvcError,
    ModelNotAllowed,
    ProviderError,
    ProviderUnavailable,
    ServiceUnavailable,
    WalFatal,
    WalFull,
)
from llmsvc.gateway.accounting import Counts, Pieces, count, prompt_counter, tool_texts
from llmsvc.gateway.attribution import Attribution, record_fields
from llmsvc.gateway.deadline import Deadline
from llmsvc.gateway.errors import describe
from llmsvc.gateway.http_request import ReplyWriter
from llmsvc.gateway.ids import new_id
from llmsvc.gateway.journal import Journal, When, now_us
from llmsvc.gateway.request import ClientGone
from llmsvc.gateway.router import Router, Target
from llmsvc.gateway.sse import ASGISend
from llmsvc.gateway.wire import Wire
from llmsvc.logs import logger
from llmsvc.providers.base import Batch, Native, RefusalDeltas, Reply, ToolCallDeltas
from llmsvc.providers.http import TRACEPARENT
from llmsvc.wal import AttemptEndFields, RequestEndFields, Sender, Status

if TYPE_CHECKING:
    from llmsvc.gateway.tracing import RequestTrace

log = logger(__name__)

SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
JSON_HEADERS = [(b"content-type", b"application/json")]
NO_ATTEMPT = uuid.UUID(int=0)  # an exchange's attempt id before it calls a provider


class Exchange:
    """The state of one request from the first record to the last byte.

    Thousands are open at once on slow streams, so it has slots and keeps only
    the three fields it needs of the validated request, not the model itself.
    """

    __slots__ = (
        "api",
        "attempt_id",
        "attempt_no",
        "attempt_open",
        "attempts",
        "began",
        "began_us",
        "bound",
        "caller",
        "calls",
        "closed",
        "correlation_id",
        "cost",
        "counts",
        "created",
        "crowded",
        "data",
        "deadline",
        "ended",
        "error_code",
        "first_token_us",
        "headers",
        "held",
        "journal",
        "model",
        "native",
        "params",
        "pieces",
        "policy",
        "pumped",
        "request_deadline",
        "request_id",
        "router",
        "send",
        "seq",
        "skipped",
        "start_fut",
        "started",
        "status",
        "store_content",
        "stream",
        "target",
        "targets",
        "task",
        "tool_seq",
        "trace",
        "unconfirmed",
        "who",
        "wire",
        "write",
        "write_reply",
    )

    def __init__(
        self,
        journal: Journal,
        router: Router,
        policy: RetryPolicy,
        data: dict[str, Any],
        model: str,
        stream: bool,
        request_id: uuid.UUID,
        correlation_id: str,
        send: ASGISend,
        closed: Callable[[], bool],
        write: Callable[[bytes], bool],
        write_reply: ReplyWriter,
        *,
        caller: Caller | None,
        attribution: Attribution,
        wire: Callable[[str, int], Wire],
        api: str,
        native: Native | None = None,
        store_content: bool = True,
        params: dict[str, Any] | None = None,
        pinned: Target | None = None,
    ) -> None:
        """`data`: the request as a chat completion (what a provider without `native`'s API
        is sent); `native`: the body as the client sent it in another API, forwarded as is
        to a provider that speaks that API. `wire(request_id_hex, created)` renders replies.
        `store_content` False: a whole reply's content is sent and not journaled, for
        embeddings' vectors, which are data and stored only if asked (`store_embeddings`).
        `params`: what the start record keeps when the client's body is not `native`'s (a
        Responses body whose `previous_response_id` the forwarded one has resolved).
        `pinned`: the one target to try instead of the model's route (the console's replay;
        the operator chose it, so a key's model allowlist does not apply)."""
        if (
            pinned is None
            and caller is not None
            and caller.models is not None
            and model not in caller.models
        ):
            raise ModelNotAllowed(
                f"the key {caller.key_name!r} may not use the model {model!r}; "
                f"it may use {', '.join(sorted(caller.models))}",
                param="model",
            )
        self.journal = journal
        self.caller = caller  # who sent it (None with `auth = "none"`)
        self.router = router
        self.policy = policy
        # UnknownModel before anything is journaled
        self.targets = [pinned] if pinned is not None else router.targets(model)
        self.target = self.targets[0]  # the one being tried
        self.data = data
        self.model, self.stream, self.api, self.native = model, stream, api, native
        self.store_content = store_content
        # What the start record keeps besides the messages: the body as the client sent it.
        skip = ("model", "messages") if native is None else ("model",)
        source = data if native is None else native.body
        self.params: dict[str, Any] | None = (
            params if params is not None else {k: v for k, v in source.items() if k not in skip}
        )
        self.send = send
        self.closed = closed  # the connection is known gone (a write failed), asked at once
        self.write = write  # a piece of the streamed body written now, if the client reads
        self.write_reply = write_reply  # the head with the first body in one write, if it can
        self.pumped: asyncio.Future[None] | None = None  # woken when the pump stops
        self.held: bytes | None = None  # a pumped batch's frame, journaled or about to be, unsent
        self.request_id = request_id
        self.attempt_id = NO_ATTEMPT  # each attempt's own, from the first
        self.attempt_no = 0
        self.attempt_open = False  # an attempt is started and not yet ended in the journal
        self.attempts: list[tuple[str, str, str, str | None]] = []  # provider, model, status, code
        self.skipped: list[tuple[str, str]] = []  # provider, code: targets skipped, not called
        self.correlation_id = correlation_id
        self.who: Sender | None = record_fields(caller, attribution)  # for the start record
        self.created = int(time.time())
        self.wire = wire(request_id.hex, self.created)
        self.started = False  # response headers sent
        self.ended = False  # end records journaled
        self.seq = 0  # tokens journaled
        self.tool_seq = 0  # tool-call deltas journaled, this attempt
        self.deadline = 0.0  # loop time the current attempt must end by
        self.request_deadline = float("inf")  # and the request as a whole
        self.bound: Deadline | None = None  # its timer, moved at the first token
        self.calls: Deadline | None = None  # the provider calls' scope, while they run
        self.task: asyncio.Task[Any] | None = None  # the task serving it, once it runs
        self.start_fut: asyncio.Future[int] | None = None
        self.unconfirmed: tuple[asyncio.Future[int] | None, int] = (None, 0)  # last token batch
        self.first_token_us: int | None = None
        self.pieces = Pieces()  # this attempt's journaled texts, counted if need be
        self.counts = Counts()  # as the provider reported them, else counted at the end
        self.cost: float | None = None
        self.error_code: str | None = None
        self.status: Status = "streaming"
        self.trace: RequestTrace | None = None  # its spans, when tracing is on (gateway/tracing)
        self.began = time.monotonic()
        self.began_us = now_us()  # the clock first_token_us is on
        self.headers: Sequence[tuple[bytes, bytes]] = ()  # more for the answer (rate limits)
        # Others were open when it began: its ends wait for the loop round's end, to share
        # one WAL write with theirs. Alone, it writes them at once (a round's wait is its own).
        self.crowded = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop serving it, its task's: only while it runs."""
        assert self.task is not None
        return self.task.get_loop()

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        """The ids every answer carries, and `headers`; made when the answer starts, not kept
        for the stream's life."""
        return [
            (b"x-request-id", str(self.request_id).encode()),
            (b"x-correlation-id", self.correlation_id.encode()),
            *self.headers,
        ]

    def interrupt(self) -> None:
        """Shutdown's: cancel the provider calls now; the request journals its end as
        interrupted, and a begun reply gets a last frame. Nothing once they are over."""
        calls = self.calls
        if calls is not None and not calls.expired():
            calls.reschedule(-math.inf)  # due now: cancels the task at the loop's next round

    async def run(self) -> None:
        """Serve the request; `interrupt` is how shutdown ends it early."""
        params, who = self.params or {}, self.who
        self.params = self.who = None  # only the start record has them; a stream lives long
        try:
            self.start_fut = self.journal.request_start(
                self.request_id,
                self.correlation_id,
                self.model,
                self.stream,
                self.data["messages"],
                params,
                who,
                self.api,
            )
            del params, who
            # Looked up once (see gateway/deadline.py); the journal's futures are the loop's.
            self.task = task = asyncio.current_task(self.start_fut.get_loop())
            assert task is not None
            self.calls = calls = Deadline(task, None)
            try:
                with calls:
                    await self.router.try_targets(self)
            except TimeoutError:
                if not calls.expired():  # not the interruption's
                    raise
            finally:
                self.calls = None
            if calls.expired() and not self.ended:
                stopped = ServiceUnavailable("llmsvc shut down before the reply ended")
                await self._end("interrupted", error=str(stopped), error_code="shutdown")
                if not self.started:
                    raise stopped  # still a plain HTTP 503
                await self._send_final(self.wire.failure(describe(stopped)[1]))
        except ClientGone:
            await self._end("interrupted", error="client disconnected")
        except LlmsvcError as exc:
            await self._fail(exc)
        except Exception as exc:
            log.exception("request failed", request_id=self.request_id)
            await self._fail(exc)
        finally:
            if self.trace is not None:
                self.trace.ended(
                    self.status,
                    self.error_code,
                    self.target.provider.name,
                    self.target.model,
                    self.counts.prompt,
                    self.counts.completion,
                )
            self._log()

    def replied(self) -> bool:
        """Whether part of the reply was journaled or sent: then nothing is retried."""
        return bool(self.seq or self.tool_seq or self.started)

    async def attempt(self, target: Target) -> None:
        """One call to one provider, journaled as an attempt, with its breaker told."""
        name = target.provider.name
        self.target, self.attempt_no = target, self.attempt_no + 1
        self.attempt_id, self.first_token_us, self.attempt_open = new_id(), None, True
        self.tool_seq, self.pieces = 0, Pieces()
        self.journal.attempt_start(
            self.attempt_id, self.request_id, self.attempt_no, name, target.model
        )
        settled = False
        traced = None
        if self.trace is not None:  # the upstream call carries the attempt span's context
            no, aid = self.attempt_no, self.attempt_id
            traced = TRACEPARENT.set(self.trace.attempt_started(no, aid, name, target.model))
        try:
            await self._call(target)
            self.router.breakers.success(name)
            settled = True
        except ProviderError as exc:
            if exc.retryable:
                self.router.breakers.failure(name, str(exc))
                settled = True
            raise
        finally:
            if not settled:
                self.router.breakers.release(name)
            if traced is not None:
                TRACEPARENT.reset(traced)

    async def _call(self, target: Target) -> None:
        """The provider call, bounded: until the first token by `first_token_timeout` (when
        streaming), and as a whole by `attempt_timeout`. One timer for both, moved when the
        first token arrives: nothing per token."""
        task = self.task
        assert task is not None
        loop = task.get_loop()
        self.deadline = min(loop.time() + self.policy.attempt_timeout, self.request_deadline)
        first = loop.time() + self.policy.first_token_timeout
        try:
            with Deadline(
                task, min(first, self.deadline) if self.stream else self.deadline
            ) as self.bound:
                reply = await target.provider.open(
                    self.data, target.model, self.stream, self.native
                )
                try:
                    if self.stream:
                        await self._stream(reply)
                    else:
                        await self._whole(reply)
                finally:
                    await reply.aclose()
        except TimeoutError:
            waited = self.first_token_us is None and self.stream
            what = "no first token" if waited else "the reply did not end"
            raise ProviderUnavailable(
                f"{target.provider.name}: {what} in time (first_token_timeout_seconds, "
                "attempt_timeout_seconds, request_timeout_seconds)",
                code="first_token_timeout" if waited else "attempt_timeout",
            ) from None

    def _first_token(self) -> None:
        """The first token (or tool call) is here: only the attempt's bound applies now."""
        self.first_token_us = now_us()
        if self.bound is not None:
            self.bound.reschedule(self.deadline)

    async def end_attempt(self, exc: ProviderError) -> None:
        """Journal a failed attempt that will be retried or followed by another target."""
        fields = self._attempt_fields("failed", None, str(exc), exc.code, exc.status)
        self.attempts.append((self.target.provider.name, self.target.model, "failed", exc.code))
        self.attempt_open = False
        if self.trace is not None:
            self.trace.attempt_ended(fields, None)
        await self.journal.attempt_end(self.attempt_id, **fields)

    async def _stream(self, reply: Reply) -> None:
        wire = self.wire
        aid = self.attempt_id.bytes
        closed = self.closed  # asked at each batch: sends to a closed connection are dropped
        async for texts in reply.batches():
            if closed():
                raise ClientGone
            if isinstance(texts, ToolCallDeltas):  # rare: tool calls, not tokens
                await self._send_chunk(await self._journal_tools(texts), reply)
                continue
            fut = self._journal_tokens(aid, texts)  # a refusal too: the client gets it
            if self.first_token_us is None:
                self._first_token()
            refused = isinstance(texts, RefusalDeltas)  # rare: sent as delta.refusal
            frame = wire.refusal(texts) if refused else wire.tokens(texts)
            await fut
            self.unconfirmed = (None, 0)
            await self._send_chunk(frame, reply)
            del texts, fut, frame  # the wait for the next batch holds nothing of this one
            if (woken := self._pump(reply)) is not None:
                try:
                    await woken  # in this frame: a coroutine of its own lasts as the stream
                finally:
                    reply.unpump()
                    self.pumped = None
                await self._send_held(reply)
        if closed():  # a one-batch reply meets no check above
            raise ClientGone
        fut = self._end_records("completed", reply)
        tail = wire.closing(reply.finish_reason or "stop", self.counts.usage())
        await fut
        await self._send_chunk(tail, reply, more=False)

    def _pump(self, reply: Reply) -> asyncio.Future[None] | None:
        """Let the upstream connection's callback journal and write the next batches itself
        (`_take`), with no task switch per read, until something needs this task: a batch
        that is not plain tokens, a second batch while one is `held`, a client to wait for,
        the end, a failure. Returns what wakes the task then (None: the reply cannot pump
        now); `batches` goes on where the pump stopped, after `_send_held`."""
        if not reply.pump(self._take, self._pump_stopped):  # it calls back on later reads
            return None
        self.pumped = self.loop.create_future()
        return self.pumped

    async def _send_held(self, reply: Reply) -> None:
        """The batch a stopped pump held, sent once its WAL write is done (or its refusal
        raised)."""
        fut = self.unconfirmed[0]
        if self.held is not None and fut is not None:
            await fut  # `_journaled` runs first, and may send it
        if self.held is not None:  # the client was not reading
            frame, self.held = self.held, None
            await self._send_chunk(frame, reply)

    def _take(self, texts: Batch) -> bool:
        """One batch, in the upstream connection's callback: journaled with the other streams'
        batches of this loop round, and `held` until `_journaled` writes it to the client.
        False leaves it to the task: not plain tokens, the client gone, a held batch the
        client is not reading or whose write is under way, or a WAL that refuses appends
        (the task meets the refusal again).

        The stream's next read can come while a batch is held: before that batch's WAL write
        (two reads in one loop round, or the writer's thread yet to take the batch) or after
        it, before the write's done callback runs (the loop polls before it runs the
        callbacks of the round before). On a busy loop a third of a paced stream's batches
        came so, and the task sent each at several times the pump's cost (BENCHMARKS.md,
        "The pump's misses"). The held batch is written at once in the second case, and
        joined by this one in the first (`WalWriter.append_to` says when it can be)."""
        if isinstance(texts, ToolCallDeltas | RefusalDeltas) or self.closed():
            return False
        held = self.held
        if held is not None and not self._release_held():
            return self._join_held(held, texts)
        try:
            fut = self._journal_tokens(self.attempt_id.bytes, texts, "round")
        except LlmsvcError:
            return False
        self.held = self.wire.tokens(texts)
        fut.add_done_callback(self._journaled)
        return True

    def _release_held(self) -> bool:
        """Write the held batch now if its WAL write is done and the client reads."""
        fut = self.unconfirmed[0]
        if fut is None or not fut.done():
            return False
        self._journaled(fut)
        return self.held is None

    def _join_held(self, held: bytes, texts: list[str]) -> bool:
        """Journal `texts` into the WAL write of the `held` batch if that is still gathering,
        and hold their frame after its own: the one write and its done callback cover both."""
        fut, count = self.unconfirmed
        if fut is None:
            return False
        try:
            if not self.journal.join_tokens(fut, self.attempt_id.bytes, self.seq, texts):
                return False
        except LlmsvcError:
            return False
        self.seq += len(texts)
        self.pieces.join_last(texts)
        self.unconfirmed = (fut, count + len(texts))
        self.held = held + self.wire.tokens(texts)
        return True

    def _journaled(self, fut: asyncio.Future[int]) -> None:
        """The held batch's WAL write is done: write it to the client now if it reads, else
        (or if the WAL refused it) wake the task to send it or fail. Nothing if `_take`
        already released it (`fut` is no longer the batch unconfirmed)."""
        if fut is not self.unconfirmed[0]:
            return
        if fut.exception() is None:
            self.unconfirmed = (None, 0)
            if self.held is not None and self.write(self.held):
                self.held = None
                return
        self._pump_stopped()

    def _pump_stopped(self) -> None:
        woken = self.pumped
        if woken is not None and not woken.done():
            woken.set_result(None)

    async def _journal_tools(self, deltas: ToolCallDeltas) -> bytes:
        """Journal tool-call deltas and return their client chunk, once they are durable."""
        fut = self.journal.tool_deltas(self.attempt_id.bytes, self.tool_seq, deltas)
        self.tool_seq += len(deltas)
        self.pieces.add(tool_texts(deltas))
        if self.first_token_us is None:
            self._first_token()
        await fut
        return self.wire.tool_calls(deltas)

    async def _whole(self, reply: Reply) -> None:
        texts: list[str] = []
        async for batch in reply.batches():
            if not isinstance(batch, ToolCallDeltas | RefusalDeltas):  # tokens, not those
                texts.extend(batch)
        content = "".join(texts)
        if content or reply.tool_calls or reply.refusal:
            self.first_token_us = now_us()
        if content and self.store_content:  # the ends' append below writes these too
            self._journal_tokens(self.attempt_id.bytes, [content], "next")
        if reply.refusal:  # stored as the reply's text, after any content
            self._journal_tokens(self.attempt_id.bytes, [reply.refusal], "next")
        if reply.tool_calls:
            self.journal.tool_deltas(self.attempt_id.bytes, 0, reply.tool_calls, "next")
            self.tool_seq = len(reply.tool_calls)
            self.pieces.add(tool_texts(reply.tool_calls))
        fut = self._end_records("completed", reply)
        finish, usage = reply.finish_reason or "stop", self.counts.usage()
        body = self.wire.whole(content, finish, usage, reply.tool_calls, reply.refusal)
        await fut
        headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
        taken = self._write_start(headers, body, more=False)
        if taken is None:  # it could not: by ASGI
            await self._start(headers)
            await self.send({"type": "http.response.body", "body": body, "more_body": True})
            taken = not self.closed()
            await self.send({"type": "http.response.body", "body": b""})
        if not taken:  # the write found the client gone: the reply was journaled, not received
            await self._correct_end("interrupted", reply, "client disconnected")

    async def _correct_end(self, status: Status, reply: Reply, error: str) -> None:
        """Journal the attempt's and the request's ends again with another status, usage kept.

        The ends go into the same WAL batch as the reply (one disk write on the
        common path); a disconnect found while writing the reply changes them.
        """
        attempt, request = self._end_fields(status, reply, error, "client_gone", None)
        self.status = status
        self.attempts[-1] = (*self.attempts[-1][:2], status, "client_gone")
        await self.journal.ends(self.attempt_id, attempt, self.request_id, request)

    def _journal_tokens(
        self, attempt_id: bytes, texts: list[str], when: When = "now"
    ) -> asyncio.Future[int]:
        """Append a token batch; counted as journaled unless the WAL refuses it later. `when`:
        how soon it is written (journal.When)."""
        fut = self.journal.tokens(attempt_id, self.seq, texts, when)
        self.seq += len(texts)
        self.pieces.add(texts)  # kept, not counted: the per-token path does no counting
        self.unconfirmed = (fut, len(texts))
        return fut

    async def _send_chunk(self, frame: bytes, reply: Reply, more: bool = True) -> None:
        if not self.started:
            frame = self.wire.opening(reply.prompt_tokens) + frame
            if more and self._write_start(SSE_HEADERS, frame, True) is not None:
                return  # a client gone is found at the next batch (`closed`)
            await self._start(SSE_HEADERS)
        await self.send({"type": "http.response.body", "body": frame, "more_body": more})

    def _write_start(
        self, headers: list[tuple[bytes, bytes]], body: bytes, more: bool
    ) -> bool | None:
        """The response's head and first body in one write (`http_request.reply_writer`)."""
        self.started = True
        return self.write_reply(200, headers + self.response_headers(), body, more)

    async def _start(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        await self.send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": headers + self.response_headers(),
            }
        )

    async def _send_final(self, frame: bytes) -> None:
        """End a begun stream with a last frame; a begun whole reply is complete already, and
        before the start there is nothing to end."""
        if self.started and self.stream:
            await self.send({"type": "http.response.body", "body": frame, "more_body": False})

    async def _fail(self, exc: BaseException) -> None:
        """Record the failure; before the first byte re-raise it for an HTTP error."""
        error_code = "wal_full" if isinstance(exc, WalFull) else describe(exc)[1]["code"]
        http_status = exc.status if isinstance(exc, ProviderError) else None
        if self.start_fut is None:  # its start was refused: nothing of it is journaled to end
            self.status, self.error_code = "failed", error_code
        elif isinstance(exc, WalFull):  # whatever end this request journaled was refused with it
            await self._hold_end("failed", error=str(exc), error_code="wal_full")
        elif not self.ended:
            await self._end(
                "failed", error=str(exc), error_code=error_code, http_status=http_status
            )
        if not self.started:
            raise exc
        await self._send_final(self.wire.failure(describe(exc)[1]))

    def _end_records(
        self,
        status: Status,
        reply: Reply | None = None,
        *,
        error: str | None = None,
        error_code: str | None = None,
        http_status: int | None = None,
    ) -> asyncio.Future[int]:
        """Journal the open attempt's end and the request's; the reply, if any, gives usage."""
        self.ended, self.status = True, status
        attempt, request = self._end_fields(status, reply, error, error_code, http_status)
        ended = self.attempt_id if self.attempt_open else None
        if self.attempt_open:
            self.attempt_open = False
            self.attempts.append((self.target.provider.name, self.target.model, status, error_code))
            if self.trace is not None:
                self.trace.attempt_ended(attempt, reply.finish_reason if reply else None)
        return self.journal.ends(
            ended, attempt, self.request_id, request, "round" if self.crowded else "now"
        )

    def _end_fields(
        self,
        status: Status,
        reply: Reply | None,
        error: str | None,
        error_code: str | None,
        http_status: int | None,
    ) -> tuple[AttemptEndFields, RequestEndFields]:
        self.error_code = error_code
        model = self.target.model
        prompt_of = prompt_counter(self.data, self.native)
        counted = count(reply, self.pieces, self.seq + self.tool_seq, model, prompt_of)
        self.counts = counted
        prompt, completion = counted.prompt, counted.completion
        self.cost = self.router.cost(self.target.provider.name, model, prompt, completion)
        attempt = self._attempt_fields(status, reply, error, error_code, http_status)
        request: RequestEndFields = {
            "status": status,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "prompt_tokens_source": counted.prompt_source,
            "completion_tokens_source": counted.completion_source,
            "cost": self.cost,
            "provider": self.target.provider.name,
            "error": error,
        }
        return attempt, request

    def _attempt_fields(
        self,
        status: Status,
        reply: Reply | None,
        error: str | None,
        error_code: str | None,
        http_status: int | None,
    ) -> AttemptEndFields:
        return {
            "status": status,
            "http_status": reply.http_status if reply else http_status,
            "error_code": error_code,
            "error_message": error,
            "prompt_tokens": reply.prompt_tokens if reply else None,
            "completion_tokens": reply.completion_tokens if reply else None,
            "token_count": self.seq,
            "first_token_ts": self.first_token_us,
            "finish_reason": reply.finish_reason if reply else None,
            "stop_reason": reply.stop_reason if reply else None,
        }

    async def _end(
        self,
        status: Status,
        *,
        error: str,
        error_code: str | None = None,
        http_status: int | None = None,
    ) -> None:
        """End without a reply (failure or interruption) and wait until it is journaled."""
        try:
            fut = self._end_records(
                status, error=error, error_code=error_code, http_status=http_status
            )
            await fut
        except WalFull:
            await self._hold_end(status, error=error, error_code=error_code)
        except WalFatal:
            pass  # the daemon is exiting; the next boot marks this request interrupted

    async def _hold_end(self, status: Status, *, error: str, error_code: str | None) -> None:
        """The WAL refused a record: end the request in memory, written when space returns.

        What reached the log decides what the end says: nothing at all if the
        start records were refused, else the tokens journaled before the
        refused batch. The futures asked about settle at once: the writer
        refuses or resolves every batch before it refuses new appends.
        """
        self.ended, self.status = True, status
        start, (batch, tokens) = self.start_fut, self.unconfirmed
        await asyncio.wait([f for f in (start, batch) if f is not None])
        if start is None or start.exception() is not None:
            return
        if batch is not None and batch.exception() is not None:
            self.seq -= tokens
            self.pieces.drop_last()  # the refused batch's texts, added last
        self.unconfirmed = (None, 0)
        attempt, request = self._end_fields(status, None, error, error_code, None)
        held = self.attempt_id if self.attempt_open else None
        self.attempt_open = False
        self.journal.hold_ends(held, attempt, self.request_id, request)

    def _log(self) -> None:
        """The request's access line; `error` is the error code of one that did not complete."""
        log.info(
            "request",
            request_id=self.request_id,
            correlation_id=self.correlation_id,
            key=self.caller.key_name if self.caller is not None else "-",
            model=self.model,
            provider=self.target.provider.name,
            stream=self.stream,
            status=self.status,
            prompt_tokens=self.counts.prompt,
            completion_tokens=self.counts.completion,
            deltas=self.seq,  # content pieces sent and stored (a whole reply is one)
            latency_ms=round((time.monotonic() - self.began) * 1000, 1),
            error=self.error_code,
        )
