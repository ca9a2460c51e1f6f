"""llmsvc's upstream HTTP client (providers/upstream_http.py) against real local servers.

Each server is a few lines of asyncio speaking raw HTTP/1.1, so a test puts on the
wire exactly the case it names: a connection reused or closed, a body chunked and
compressed, a silence, a reader that goes away, a certificate trusted or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import ssl
import subprocess
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest

from llmsvc.config import ProviderConfig
from llmsvc.errors import ProviderUnavailable
from llmsvc.providers.openai import OpenAIProvider
from llmsvc.providers.upstream_http import Response, UpstreamClient, UpstreamError

pytestmark = pytest.mark.timeout(30)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Serve = Callable[..., Awaitable["Server"]]


@dataclass
class Server:
    """A local upstream: each connection is served by `handler`; `ended` is set for each
    connection once the client has closed it (its read saw the end)."""

    handler: Handler
    url: str = ""
    connections: int = 0
    ended: list[asyncio.Event] = field(default_factory=list)


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request's body (None once the client closed the connection)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return await reader.readexactly(length)


async def until_closed(reader: asyncio.StreamReader) -> None:
    """Read until the client closes the connection (or resets it)."""
    try:
        while await reader.read(65536):
            pass
    except ConnectionError:
        pass


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler, tls: ssl.SSLContext | None = None) -> Server:
        state = Server(handler)

        async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            state.connections += 1
            ended = asyncio.Event()
            state.ended.append(ended)
            try:
                await handler(reader, writer)
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError, ssl.SSLError):
                    await writer.wait_closed()
                ended.set()

        server = await asyncio.start_server(connected, "127.0.0.1", 0, ssl=tls)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        state.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/v1/x"
        return state

    yield start
    for server in servers:
        server.close()


def answer(body: bytes, *extra: str) -> bytes:
    head = "".join(f"{line}\r\n" for line in extra)
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body


async def whole(response: Response) -> bytes:
    try:
        return await response.body(1 << 20)
    finally:
        response.release()


async def test_an_idle_connection_is_reused_and_one_the_server_closed_is_not(
    serve: Serve, client: UpstreamClient
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for n in range(2):  # two replies, then the server closes the idle connection
            if await read_request(reader) is None:
                return
            writer.write(answer(f"reply {n}".encode()))
            await writer.drain()

    server = await serve(handler)
    assert await whole(await client.post(server.url, b"{}", {})) == b"reply 0"
    assert await whole(await client.post(server.url, b"{}", {})) == b"reply 1"
    assert server.connections == 1
    await server.ended[0].wait()
    # until the client has read the close (a wait, not a timing assertion)
    while client._idle.get(next(iter(client._idle))):  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    assert await whole(await client.post(server.url, b"{}", {})) == b"reply 0"
    assert server.connections == 2


async def test_a_connection_that_answers_twice_is_not_reused(
    serve: Serve, client: UpstreamClient
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(answer(b"asked") + answer(b"not asked"))  # one request, two replies
            await writer.drain()

    server = await serve(handler)
    assert await whole(await client.post(server.url, b"{}", {})) == b"asked"
    assert await whole(await client.post(server.url, b"{}", {})) == b"asked"
    assert server.connections == 2


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data)[2:-4]),  # raw, as some servers send it
    ],
)
async def test_a_chunked_compressed_body_reads_whole(
    serve: Serve, client: UpstreamClient, encoding: str, compress: Callable[[bytes], bytes]
) -> None:
    text = b"".join(b'data: {"n": %d}\n\n' % n for n in range(500))
    packed = compress(text)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
            + f"Content-Encoding: {encoding}\r\n\r\n".encode()
        )
        for at in range(0, len(packed), 100):  # many chunks, each its own write
            part = packed[at : at + 100]
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await until_closed(reader)

    server = await serve(handler)
    response = await client.post(server.url, b"{}", {})
    assert response.headers["CONTENT-ENCODING"] == encoding
    assert await whole(response) == text


async def test_repeated_fields_read_joined_and_frame_the_body_as_sent(
    serve: Serve, client: UpstreamClient
) -> None:
    """The head's fields are kept raw and read into headers only when asked: a repeated
    field reads comma-joined in any case, and the framing read from the raw pairs is the
    one sent (chunked, and gzip in mixed case)."""
    text = b"data: [DONE]\n\n" * 50
    packed = gzip.compress(text)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nX-Limit: 1\r\ntransfer-encoding: Chunked\r\n"
            b"Content-Encoding:  GZip\r\nx-limit: 2\r\n\r\n"
            + b"%x\r\n%s\r\n0\r\n\r\n"
            % (len(packed), packed)
        )
        await until_closed(reader)

    server = await serve(handler)
    response = await client.post(server.url, b"{}", {})
    assert response.headers["X-LIMIT"] == "1, 2"
    assert response.headers["Content-Encoding"] == "GZip"
    assert await whole(response) == text


async def test_a_body_read_until_close_ends_with_the_connection(
    serve: Serve, client: UpstreamClient
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nno length, ")
        await writer.drain()
        writer.write(b"no chunks")

    server = await serve(handler)
    assert await whole(await client.post(server.url, b"{}", {})) == b"no length, no chunks"
    assert not any(client._idle.values())  # its end was the connection's


async def test_a_silence_mid_stream_fails_the_read_after_what_came(serve: Serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await until_closed(reader)  # then nothing, until the client gives up

    server = await serve(handler)
    client = UpstreamClient(5, 0.2, tls=False)
    try:
        response = await client.post(server.url, b"{}", {})
        assert await response.read() == b"first"
        with pytest.raises(UpstreamError, match=r"no data for 0.2 s \(timeout_seconds\)"):
            await response.read()
        response.release()
        await server.ended[0].wait()  # the connection was closed, not pooled
        assert not any(client._idle.values())
    finally:
        await client.close()


async def test_a_cancelled_read_closes_its_connection(serve: Serve, client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf")
        await until_closed(reader)

    server = await serve(handler)
    response = await client.post(server.url, b"{}", {})

    async def read_all() -> None:
        try:
            while await response.read():
                pass
        finally:
            response.release()

    reading = asyncio.create_task(read_all())
    await asyncio.sleep(0)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    await server.ended[0].wait()  # the upstream saw its client go
    assert not any(client._idle.values())


async def test_an_error_reply_is_read_and_its_retry_after_found_in_any_case(serve: Serve) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        error = orjson.dumps({"error": {"message": "slow down", "code": "rate_limited"}})
        writer.write(
            b"HTTP/1.1 429 Too Many Requests\r\nRETRY-AFTER: 7\r\n"
            + b"Content-Length: %d\r\n\r\n%s" % (len(error), error)
        )
        await until_closed(reader)

    server = await serve(handler)
    provider = OpenAIProvider(
        ProviderConfig(name="up", kind="openai", base_url=server.url, models=["m"])
    )
    try:
        with pytest.raises(ProviderUnavailable, match="slow down") as refused:
            await provider.open({"messages": []}, "m", stream=False)
        assert (refused.value.status, refused.value.retry_after) == (429, 7.0)
    finally:
        await provider.close()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    """A plain-HTTP client with 5 s timeouts, closed after the test."""
    client = UpstreamClient(5, 5, tls=False)
    yield client
    await client.close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_checks_the_certificate_against_the_trusted_cas(
    serve: Serve,
    certificate: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(*certificate)
    events = b"".join(
        b"data: %s\n\n" % orjson.dumps({"choices": [{"delta": {"content": word}}]})
        for word in ("over ", "tls")
    )
    events += b"data: [DONE]\n\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(answer(events, "Content-Type: text/event-stream"))
            await writer.drain()

    server = await serve(handler, tls)
    config = ProviderConfig(name="up", kind="openai", base_url=server.url, models=["m"])
    untrusting = OpenAIProvider(config)  # the system's CAs only
    try:
        with pytest.raises(ProviderUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusting.open({"messages": []}, "m", stream=True)
    finally:
        await untrusting.close()

    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))  # as an operator would
    trusting = OpenAIProvider(config)
    try:
        reply = await trusting.open({"messages": []}, "m", stream=True)
        assert [batch async for batch in reply.batches()] == [["over ", "tls"]]
    finally:
        await trusting.close()


async def test_headers_dropped_mid_body_leave_the_body_and_its_trailers_whole(
    serve: Serve, client: UpstreamClient
) -> None:
    """A stream drops its response's headers after the head (HttpProvider.post): the body
    still reads to its end, trailers and all, and the connection is reused."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Ratelimit: 9\r\n"
                b"Trailer: X-Checksum\r\n\r\n"
            )
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"5\r\nhello\r\n0\r\nX-Checksum: 1\r\n\r\n")

    server = await serve(handler)
    for _ in range(2):
        response = await client.post(server.url, b"{}", {})
        assert response.headers["x-ratelimit"] == "9"
        response.drop_headers()
        assert "x-ratelimit" not in response.headers
        assert await whole(response) == b"hello"
    assert server.connections == 1
