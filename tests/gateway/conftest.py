"""Gateway fixtures: a real socket, real uvicorn, a real WAL (see served_gateway.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import uvicorn
from aiohttp import web
from policies import circuit_policy, retry_policy, wal_policy
from pydantic import SecretStr
from served_gateway import (
    ANTHROPIC_MODEL,
    MAX_BODY_BYTES,
    UNREACHABLE_KEY,
    UNREACHABLE_MODEL,
    UPSTREAM_MODEL,
    Served,
    _QuietServer,
)
from upstreams import anthropic_upstream
from upstreams.openai_upstream import Upstream

from llmsvc.config import ProviderConfig, Settings
from llmsvc.errors import WalFatal
from llmsvc.gateway import rejections
from llmsvc.gateway.app import Gateway
from llmsvc.gateway.breaker import Breakers
from llmsvc.gateway.http_protocol import HttpLimits, protocol_class
from llmsvc.gateway.journal import Journal
from llmsvc.gateway.router import Router
from llmsvc.providers import build_provider
from llmsvc.wal.segment import instance_id
from llmsvc.wal.writer import WalWriter


def default_limits() -> HttpLimits:
    """The daemon's default bounds (its settings' defaults), for the served gateway."""
    fields = Settings.model_fields
    return HttpLimits(
        max_header_bytes=fields["max_header_bytes"].default,
        header_timeout=fields["request_header_timeout_seconds"].default,
        body_timeout=fields["request_body_timeout_seconds"].default,
        max_connections=fields["max_connections"].default,
        refused=lambda reason: None,
    )


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port bound but not listening: connecting to it is refused, and nobody else gets it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture
async def served(
    tmp_path: Path, refused_port: int, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Served]:
    configs = [
        ProviderConfig(name="mock", kind="mock", models=["mock"]),
        ProviderConfig(
            name="far",
            kind="openai",
            base_url=f"http://127.0.0.1:{refused_port}/v1",
            api_key=SecretStr(UNREACHABLE_KEY),
            models=[UNREACHABLE_MODEL],
            timeout_seconds=5,
        ),
    ]
    async with _serve(tmp_path, configs, monkeypatch) as served:
        yield served


@pytest.fixture
async def served_upstream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    """A gateway whose one provider, `oai` (model UPSTREAM_MODEL), is the fake OpenAI upstream
    (tests/upstreams/openai_upstream.py), served in the test's own event loop."""
    async with Upstream() as upstream:
        await upstream.start()
        config = ProviderConfig(
            name="oai", kind="openai", base_url=upstream.base_url, models=[UPSTREAM_MODEL]
        )
        async with _serve(tmp_path, [config], monkeypatch) as served:
            yield served


@pytest.fixture
async def served_responses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Served, Upstream]]:
    """A gateway whose one provider, `oai` (model UPSTREAM_MODEL), is the fake OpenAI upstream
    with `responses = true`: Responses requests go to its `/v1/responses` as the client sent
    them; and that upstream, which keeps the bodies it was sent there."""
    async with Upstream() as upstream:
        await upstream.start()
        config = ProviderConfig(
            name="oai",
            kind="openai",
            base_url=upstream.base_url,
            models=[UPSTREAM_MODEL],
            responses=True,
        )
        async with _serve(tmp_path, [config], monkeypatch) as served:
            yield served, upstream


@pytest.fixture
async def served_anthropic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Served, anthropic_upstream.Upstream]]:
    """A gateway whose one provider, `claude` (model ANTHROPIC_MODEL), is the fake Anthropic
    upstream (tests/upstreams/anthropic_upstream.py), served in the test's own event loop;
    and that upstream, which keeps the bodies it was sent."""
    upstream = anthropic_upstream.Upstream(UNREACHABLE_KEY)
    runner = web.AppRunner(upstream.app, access_log=None, shutdown_timeout=0.25)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        config = ProviderConfig(
            name="claude",
            kind="anthropic",
            base_url=f"http://127.0.0.1:{runner.addresses[0][1]}",
            api_key=SecretStr(UNREACHABLE_KEY),
            models=[ANTHROPIC_MODEL],
        )
        async with _serve(tmp_path, [config], monkeypatch) as served:
            yield served, upstream
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def _serve(
    tmp_path: Path, configs: list[ProviderConfig], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Served]:
    # Each test has the rejected-request log's budget to itself, whatever ran the same second.
    monkeypatch.setattr(rejections, "_budget", rejections._Budget())
    wal_dir = tmp_path / "wal"
    wal_dir.mkdir()
    wal_id = instance_id(wal_dir)
    fatal: list[WalFatal] = []
    writer = WalWriter(wal_dir, wal_id, wal_policy())
    writer.open(asyncio.get_running_loop(), fatal.append)

    providers = {c.name: build_provider(c) for c in configs}
    gateway = Gateway(
        Journal(writer),
        Router(configs, providers, Breakers(circuit_policy())),
        max_body_bytes=MAX_BODY_BYTES,
        policy=retry_policy(),
    )

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    host, port = listener.getsockname()
    config = uvicorn.Config(
        gateway,
        http=protocol_class(default_limits()),
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        async with asyncio.timeout(5):
            while not server.started:
                if task.done():
                    task.result()  # raises why it did not start
                    pytest.fail("uvicorn stopped before it started")
                await asyncio.sleep(0.01)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            yield Served(
                f"http://{host}:{port}", host, port, gateway, writer, wal_dir, wal_id, session
            )
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)
        listener.close()
        for provider in providers.values():
            await provider.close()
        await writer.close()
    assert not fatal, f"the WAL failed: {fatal}"
