"""A streamed reply's pump (HttpReply.pump): batches handed over from the connection's callback.

The upstream is a real local server that writes OpenAI's SSE events when the test says, one
write each, so every case puts on the wire exactly what it names: reads while pumping, a batch
the taker refuses, a failure event, a silence, the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
import pytest

from llmsvc.config import ProviderConfig
from llmsvc.errors import ProviderError, ProviderUnavailable
from llmsvc.providers.base import Batch, Reply
from llmsvc.providers.openai import OpenAIProvider

pytestmark = pytest.mark.timeout(30)


def event(text: str) -> bytes:
    chunk = {"choices": [{"index": 0, "delta": {"content": text}}]}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class Upstream:
    """One streamed response at a time; `send` puts one chunk of body on the wire."""

    def __init__(self) -> None:
        self.writer: asyncio.StreamWriter | None = None
        self.connected = asyncio.Event()
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
        writer.write(b"Transfer-Encoding: chunked\r\n\r\n")
        self.writer = writer
        self.connected.set()
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass

    async def send(self, *events: bytes, end: bool = False) -> None:
        assert self.writer is not None
        for data in events:
            self.writer.write(chunked(data))
        if end:
            self.writer.write(chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await self.writer.drain()


class Taker:
    """A pump's two callbacks: `take` keeps what it is given (refusing whatever `refuse`
    says), `stopped` sets an event."""

    def __init__(self, refuse: list[str] | None = None) -> None:
        self.taken: list[Batch] = []
        self.refuse = refuse or []
        self.stopped = asyncio.Event()
        self.arrived = asyncio.Event()

    def take(self, batch: Batch) -> bool:
        if any(text in self.refuse for text in batch):
            return False
        self.taken.append(batch)
        self.arrived.set()
        return True

    async def has(self, count: int) -> None:
        """Until `count` batches were taken."""
        while len(self.taken) < count:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 5)

    def stop(self) -> None:
        self.stopped.set()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    server = await asyncio.start_server(up.handle, "127.0.0.1", 0)
    up.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    try:
        yield up
    finally:
        if up.writer is not None:
            up.writer.close()
        server.close()


async def opened(upstream: Upstream, silence: float = 5.0) -> tuple[OpenAIProvider, Reply]:
    config = ProviderConfig(
        name="up", kind="openai", base_url=upstream.url, models=["m"], timeout_seconds=silence
    )
    provider = OpenAIProvider(config)
    reply = await provider.open({"messages": [], "stream": True}, "m", stream=True)
    await upstream.connected.wait()
    return provider, reply


@dataclass
class Pumped:
    """A reply whose first batch `batches` gave, pumped since by `taker`."""

    provider: OpenAIProvider
    reply: Reply
    batches: AsyncIterator[Batch]
    taker: Taker

    async def stopped(self) -> None:
        """Until the pump stops by itself; then it is taken off, as the exchange does."""
        await asyncio.wait_for(self.taker.stopped.wait(), 5)
        self.reply.unpump()


async def pumping(upstream: Upstream, taker: Taker, silence: float = 5.0) -> Pumped:
    provider, reply = await opened(upstream, silence)
    batches = reply.batches()
    await upstream.send(event("a"))
    assert await anext(batches) == ["a"]
    assert reply.pump(taker.take, taker.stop)
    return Pumped(provider, reply, batches, taker)


async def test_reads_while_pumping_go_to_take_in_order_and_batches_ends_after(
    upstream: Upstream,
) -> None:
    pumped = await pumping(upstream, taker := Taker())

    for count, text in enumerate(("b", "c", "d"), start=1):
        await upstream.send(event(text))
        await taker.has(count)
    assert not taker.stopped.is_set()
    await upstream.send(end=True)
    await pumped.stopped()

    assert taker.taken == [["b"], ["c"], ["d"]]
    assert [batch async for batch in pumped.batches] == []  # ended with [DONE]: no error
    await pumped.provider.close()


async def test_a_refused_batch_stops_the_pump_and_batches_goes_on_from_it(
    upstream: Upstream,
) -> None:
    pumped = await pumping(upstream, taker := Taker(refuse=["no"]))

    await upstream.send(event("b"))
    await taker.has(1)
    await upstream.send(event("no") + event("ignored in the same read"))
    await pumped.stopped()
    await upstream.send(event("after"), end=True)

    rest = [batch async for batch in pumped.batches]
    assert rest == [["no", "ignored in the same read"], ["after"]]
    assert taker.taken == [["b"]]
    await pumped.provider.close()


async def test_a_failure_event_while_pumping_is_raised_by_batches_after_what_came_before(
    upstream: Upstream,
) -> None:
    pumped = await pumping(upstream, taker := Taker())

    failure = b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n'
    await upstream.send(event("b") + failure)
    await pumped.stopped()

    assert taker.taken == [["b"]]
    with pytest.raises(ProviderError, match="overloaded"):
        await anext(pumped.batches)
    await pumped.provider.close()


async def test_content_that_is_not_text_while_pumping_is_raised_by_batches(
    upstream: Upstream,
) -> None:
    pumped = await pumping(upstream, Taker())

    bad = {"choices": [{"index": 0, "delta": {"content": {"not": "text"}}}]}
    await upstream.send(b"data: " + orjson.dumps(bad) + b"\n\n")
    await pumped.stopped()

    with pytest.raises(ProviderError, match="content that is not text"):
        await anext(pumped.batches)
    await pumped.provider.close()


async def test_a_silence_while_pumping_fails_after_timeout_seconds(upstream: Upstream) -> None:
    pumped = await pumping(upstream, taker := Taker(), silence=0.3)

    await upstream.send(event("b"))  # a read while pumping moves the silence's start
    await taker.has(1)
    await pumped.stopped()

    with pytest.raises(ProviderUnavailable, match=r"no data for 0.3 s \(timeout_seconds\)"):
        await anext(pumped.batches)
    await pumped.provider.close()


async def test_a_reply_with_bytes_waiting_for_batches_does_not_pump(upstream: Upstream) -> None:
    provider, reply = await opened(upstream)
    batches = reply.batches()
    await upstream.send(event("a"))
    assert await anext(batches) == ["a"]
    await upstream.send(event("b"))
    await asyncio.sleep(0.1)  # arrived, buffered for `batches`
    taker = Taker()

    assert not reply.pump(taker.take, taker.stop)
    await upstream.send(end=True)
    assert [batch async for batch in batches] == [["b"]]
    assert taker.taken == []
    await provider.close()
