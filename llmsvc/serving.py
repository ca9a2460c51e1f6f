"""A daemon's listeners: uvicorn's server on the API port, the port workers share, `/metrics`.

uvicorn's server runs as a task on the daemon's loop, without signal handlers of
its own (the daemon owns the signals); the HTTP/1.1 protocol it makes for each
connection is llmsvc's own, `llmsvc.gateway.http_protocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import socket
from collections.abc import Iterator

import uvicorn

from llmsvc.admin.app import AdminApi
from llmsvc.config import Settings
from llmsvc.errors import LlmsvcError
from llmsvc.gateway.http_protocol import (
    HttpLimits,
    connection_bound,
    descriptor_limit,
    protocol_class,
)
from llmsvc.logs import logger
from llmsvc.metrics import Metrics, MetricsServer

log = logger(__name__)


class EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the daemon owns the signals.

    `capture_signals` is not a promised API; uvicorn is pinned and
    tests/test_daemon.py keeps a test on it.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """The API port: uvicorn's server serving `app` as a task of the daemon's loop."""

    def __init__(self, server: EmbeddedServer, task: asyncio.Task[None]) -> None:
        self.server = server
        self.task = task
        self.port: int = server.servers[0].sockets[0].getsockname()[1]  # the real one for port 0

    @classmethod
    async def start(
        cls, settings: Settings, app: AdminApi, metrics: Metrics, shared: bool
    ) -> HttpServer:
        """Serve `app` on the settings' host:port (`shared` with other workers), or LlmsvcError."""
        s = settings
        descriptors = descriptor_limit()
        limits = HttpLimits(
            max_header_bytes=s.max_header_bytes,
            header_timeout=s.request_header_timeout_seconds,
            body_timeout=s.request_body_timeout_seconds,
            max_connections=connection_bound(s.max_connections, descriptors),
            refused=metrics.http_refusal,
        )
        if limits.max_connections < s.max_connections:
            asked = "max_connections" in s.model_fields_set  # a default lowered is no news
            log.log(
                logging.WARNING if asked else logging.INFO,
                "boot: max_connections lowered to %d to fit the descriptor limit of %d "
                "(RLIMIT_NOFILE; raise it, e.g. LimitNOFILE= in the systemd unit)",
                limits.max_connections,
                descriptors,
            )
        log.info(
            "boot: http limits",
            max_connections=limits.max_connections,
            max_header_bytes=limits.max_header_bytes,
            header_timeout=limits.header_timeout,
            body_timeout=limits.body_timeout,
            keepalive_timeout=s.keepalive_timeout_seconds,
            descriptors=descriptors,
        )
        config = uvicorn.Config(
            app,
            host=s.host,
            port=s.port,
            loop="none",
            http=protocol_class(limits),
            ws="none",
            lifespan="off",
            interface="asgi3",  # AdminApi's call returns the awaitable; not detected as ASGI 3
            log_config=None,
            access_log=False,
            server_header=False,
            # Nothing reads a client's address, so no X-Forwarded-For rewrites it: one
            # middleware frame less per request, kept for a stream's whole life.
            proxy_headers=False,
            timeout_keep_alive=s.keepalive_timeout_seconds,
            # Connections still open halfway through the stop's bound are cut.
            timeout_graceful_shutdown=math.ceil(s.shutdown_http_seconds / 2),
        )
        server = EmbeddedServer(config)
        sockets = []
        address = f"{s.host}:{s.port}"
        if shared:  # the port is shared with the other workers
            try:
                sockets.append(shared_port_socket(s.host, s.port, True))
            except OSError as exc:
                raise LlmsvcError(f"cannot listen on {address}: {exc.strerror or exc}") from None
        task = asyncio.create_task(_serve(server, sockets), name="http")
        while not server.started:
            if task.done():
                raise LlmsvcError(f"cannot listen on {address} (in use, or not an address here)")
            await asyncio.sleep(0.01)
        return cls(server, task)

    async def stop(self, within: float) -> None:
        """Close the listener and the connections; TimeoutError past `within` seconds."""
        self.server.should_exit = True
        await asyncio.wait_for(self.task, timeout=within)


async def _serve(server: EmbeddedServer, sockets: list[socket.socket]) -> None:
    with contextlib.suppress(SystemExit):  # uvicorn exits when it cannot bind
        await server.serve(sockets or None)


def shared_port_socket(host: str, port: int, listen: bool) -> socket.socket:
    """A SO_REUSEPORT TCP socket on host:port: the kernel spreads connections across workers.

    Each worker listens on its own (one accept queue each, no thundering herd);
    the supervisor only binds one, to hold the port and learn it when it is 0.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        if listen:
            sock.listen(2048)
            sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def start_metrics(settings: Settings, metrics: Metrics, worker: int | None) -> MetricsServer | None:
    """`/metrics` on its own port, so scraping never shares the API's listener.

    A port that cannot be bound is logged, not fatal (None): the gateway's
    traffic matters more than its metrics, and Prometheus alerts on a target
    it cannot scrape (docs/DECISIONS.md). Worker k of a supervisor serves on
    metrics_port + k; 0 stays any free port.
    """
    host, port = settings.metrics_host, settings.metrics_port
    if port and worker is not None:
        port += worker
    try:
        server = MetricsServer.start(metrics.registry, host, port)
    except OSError as exc:
        log.error(
            "boot: metrics port not served, cannot listen on %s:%d (%s); "
            "set metrics_port to a free port, or 0 for any",
            host,
            port,
            exc.strerror or exc,
        )
        return None
    log.info("boot: metrics", port=server.port, host=host)
    return server


def tune_gc() -> None:
    """Keep the cyclic collector off the hot path once the daemon serves.

    Boot's objects (modules, pools, settings) live as long as the process:
    frozen, no collection scans them again; left in, each full collection
    walked them all (up to 140 ms with 300 open streams). Collecting the young
    generation every 10,000 allocations instead of 700 cuts the collector's
    CPU per streamed token about fivefold; each pass stays a few milliseconds.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 50)
