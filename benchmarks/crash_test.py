#!/usr/bin/env python3
"""Crash harness: SIGKILL the daemon under load, restart it, and check nothing was lost.

Not a test: one run that prints (and writes) JSON. Per sync mode (`write`, `fsync`)
and per iteration, on one PostgreSQL database and one WAL directory kept across
iterations (a real restart reuses both):

1. start `llmsvc run` and wait for `ready`;
2. run `--clients` threads, each looping over streaming requests to the mock
   provider (random `max_tokens` 50..300, random `mock_delay_ms` 2..10), recording the
   request id (`x-request-id`) and every token received. Each request goes by one of
   `--apis` in turn, client i starting at the i-th, so every API is in flight from the
   first moment (a random pick could miss one in a short run): chat completions and
   Responses with the `openai` SDK, Anthropic Messages with the `anthropic` SDK; a token
   is a text delta of whichever API;
3. SIGKILL the daemon at a random moment 0.3..2 s in; clients end on the lost
   connection, keeping what they got;
4. start the daemon again (its boot replays the WAL and marks in-flight requests
   interrupted), wait for `ready`, SIGTERM it and require exit 0;
5. verify against the store: each request a client saw has one attempt whose tokens,
   by seq, are 0..n-1 with no gap and no duplicate and start with exactly what the
   client received (the store may hold a few more: a token is journaled, then sent),
   never fewer or different; every request is `completed`, `failed` or `interrupted`;
   a stream the client read to its end is stored whole and `completed`; and
   `llmsvc check --json` exits 0.

With `--keys N` the daemon runs with `auth = "keys"`, a price table and generous
limits, N keys in `--teams M` teams are made with `llmsvc keys create` before the first
start, client i streams with key i mod N (both a model a tokenizer fits and one it does
not), and benchmarks/crash_keys.py checks after every restart that each stored request
carries its key and team and the token counts and cost its stored tokens make, and at
the end of a mode that `llmsvc spend --by key|team`, the budgets' query and the sum
over the rows agree, each request a client got back counted once under its key.

With `--upstream MS` the clients' model is served by an OpenAI-compatible upstream process
(tests/upstreams/openai_upstream.py, every token MS apart) through an `openai` provider
instead of the mock: the path a real provider's stream takes, its tokens journaled and
written from the upstream connection's callback (chat.Exchange's pump). Messages requests
reach it as chat completions.

Exit status 1 on any lost or duplicated token or any other failure.

Usage:  .venv/bin/python benchmarks/crash_test.py --database-url postgresql://... |
            --pg-url postgresql://user@host:port/postgres   (creates and drops a scratch DB) |
            --sqlite   (a scratch SQLite file)
            [--iterations 25] [--clients 20] [--sync write|fsync|both] [--seed N]
            [--keys N [--teams M]] [--apis chat,responses,messages] [--out crash.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anthropic
import asyncpg
import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import crash_keys  # noqa: E402
from daemon_process import (  # noqa: E402
    DaemonProcess,
    Stored,
    UpstreamProcess,
    daemon_env,
    read_store,
    run_cli,
)

from llmsvc.providers.mock import token as mock_token  # noqa: E402


def upstream_token(i: int) -> str:
    """The i-th token (0-based) tests/upstreams/openai_upstream.py sends."""
    return f"t{i} "


MESSAGES: list[Any] = [{"role": "user", "content": "crash me"}]
APIS = ("chat", "responses", "messages")  # the streaming APIs a client may call
SETTLED = {"completed", "failed", "interrupted"}
CLIENT_JOIN_TIMEOUT = 30.0


def log(message: str) -> None:
    print(f"[crash_test] {message}", file=sys.stderr, flush=True)


# -- URLs and the scratch database -------------------------------------------------------


def redacted(url: str) -> str:
    """The URL without user or password."""
    parts = urlsplit(url)
    netloc = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    return urlunsplit(parts._replace(netloc=netloc))


def plain_pg_url(url: str) -> str:
    return re.sub(r"^postgres(ql)?(\+asyncpg)?://", "postgresql://", url)


def sqlalchemy_pg_url(url: str) -> str:
    return re.sub(r"^postgresql://", "postgresql+asyncpg://", plain_pg_url(url))


async def create_scratch(pg_url: str, name: str) -> str:
    conn = await asyncpg.connect(plain_pg_url(pg_url), timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    finally:
        await conn.close()
    parts = urlsplit(plain_pg_url(pg_url))
    return urlunsplit(parts._replace(path=f"/{name}"))


async def drop_scratch(pg_url: str, name: str) -> None:
    conn = await asyncpg.connect(plain_pg_url(pg_url), timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


# -- clients -----------------------------------------------------------------------------


@dataclass
class Seen:
    """One request as a client saw it."""

    request_id: str
    api: str
    key: str | None = None  # the key's name, with `--keys`
    tokens: list[str] = field(default_factory=list)  # its text deltas, as they came
    finished: bool = False  # the stream ended normally (the daemon said it was done)
    error: str | None = None
    usage: int | None = None  # completion tokens the usage chunk told, with `--keys`

    @property
    def received(self) -> list[str]:
        """The tokens its deltas hold. A Responses or Messages delta carries a whole batch
        (an upstream read), which may hold several; every token of the mock and of the test
        upstream ends in its one space, so the text splits back into them exactly."""
        text = "".join(self.tokens)
        tokens = re.findall(r"[^ ]* ", text)
        rest = text[sum(map(len, tokens)) :]
        return [*tokens, rest] if rest else tokens


class Client(threading.Thread):
    """Loops over streaming requests until told to stop or the daemon goes away."""

    def __init__(
        self,
        base_url: str,
        rng: random.Random,
        stop: threading.Event,
        apis: tuple[str, ...],
        key: crash_keys.Key | None = None,
        model: str = "mock",
    ) -> None:
        """`apis`: the APIs to take in turn, this client's first one first; `model`: the one
        asked for without a key."""
        super().__init__(daemon=True)
        self.model = model
        self.base_url = base_url
        self.rng = rng
        self.stop = stop
        self.apis = apis
        self.key = key  # None: `auth = "none"`, the mock model only
        self.seen: list[Seen] = []
        self.ended_by: str | None = None
        self.refused: str | None = None  # an HTTP error answer: nothing may be refused

    def run(self) -> None:
        api_key = "unused" if self.key is None else self.key.secret
        client = openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, timeout=30
        )
        messages = anthropic.Anthropic(
            base_url=self.base_url, api_key=api_key, max_retries=0, timeout=30
        )
        try:
            for sent in itertools.count():
                if self.stop.is_set():
                    break
                max_tokens = self.rng.randint(50, 300)
                delay_ms = self.rng.randint(2, 10)
                model = self.model if self.key is None else self.rng.choice(crash_keys.MODELS)
                api = self.apis[sent % len(self.apis)]
                current: Seen | None = None
                try:
                    if api == "messages":
                        request_id, pieces = messages_stream(messages, model, max_tokens, delay_ms)
                    elif api == "responses":
                        request_id, pieces = responses_stream(client, model, max_tokens, delay_ms)
                    else:
                        request_id, pieces = chat_stream(
                            client, model, max_tokens, delay_ms, self.key is not None
                        )
                    current = Seen(request_id, api, None if self.key is None else self.key.name)
                    self.seen.append(current)
                    for text, usage in pieces:
                        if text:
                            current.tokens.append(text)
                        if usage is not None:
                            current.usage = usage
                    current.finished = True
                except Exception as exc:  # the daemon died: keep what we got, stop
                    if current is not None:
                        current.error = repr(exc)
                    if isinstance(exc, openai.APIStatusError | anthropic.APIStatusError):
                        self.refused = f"{exc.status_code} {exc.message}"
                    self.ended_by = type(exc).__name__
                    return
        finally:
            client.close()
            messages.close()


Pieces = Iterator[tuple[str | None, int | None]]  # (a text delta, the completion tokens told)


def chat_stream(
    client: openai.OpenAI, model: str, max_tokens: int, delay_ms: int, usage: bool
) -> tuple[str, Pieces]:
    """A streamed chat completion; with `usage` its last chunk tells the completion tokens."""
    options: dict[str, Any] = {"stream_options": {"include_usage": True}} if usage else {}
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=MESSAGES,
        max_tokens=max_tokens,
        stream=True,
        extra_body={"mock_delay_ms": delay_ms},
        **options,
    )

    def pieces() -> Pieces:
        for chunk in raw.parse():
            for choice in chunk.choices:
                yield choice.delta.content, None
            if chunk.usage is not None:
                yield None, chunk.usage.completion_tokens

    return raw.headers["x-request-id"], pieces()


def responses_stream(
    client: openai.OpenAI, model: str, max_tokens: int, delay_ms: int
) -> tuple[str, Pieces]:
    """A streamed Responses call: its `response.output_text.delta` events, and the output
    tokens `response.completed` tells."""
    raw = client.responses.with_raw_response.create(
        model=model,
        input="crash me",
        max_output_tokens=max_tokens,
        stream=True,
        extra_body={"mock_delay_ms": delay_ms},
    )

    def pieces() -> Pieces:
        for event in raw.parse():
            if event.type == "response.output_text.delta":
                yield event.delta, None
            elif event.type == "response.completed" and event.response.usage is not None:
                yield None, event.response.usage.output_tokens

    return raw.headers["x-request-id"], pieces()


def messages_stream(
    client: anthropic.Anthropic, model: str, max_tokens: int, delay_ms: int
) -> tuple[str, Pieces]:
    """A streamed Anthropic Messages call: its text deltas, and the output tokens its
    `message_delta` tells."""
    raw = client.messages.with_raw_response.create(
        model=model,
        max_tokens=max_tokens,
        messages=MESSAGES,
        stream=True,
        extra_body={"mock_delay_ms": delay_ms},
    )

    def pieces() -> Pieces:
        for event in raw.parse():
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                yield event.delta.text, None
            elif event.type == "message_delta":
                yield None, event.usage.output_tokens

    return raw.headers["x-request-id"], pieces()


# -- verification ------------------------------------------------------------------------


@dataclass
class Tally:
    iterations: int = 0
    requests_checked: int = 0
    requests_finished_by_client: int = 0
    requests_cut_by_kill: int = 0
    tokens_checked: int = 0
    tokens_lost: int = 0
    tokens_different: int = 0
    duplicates: int = 0
    gaps: int = 0
    extra_stored_tokens: int = 0
    max_extra_for_one_request: int = 0
    marked_interrupted: int = 0
    killed_with_flush_process: int = 0  # kills while the flush process wrote the batches
    statuses: dict[str, int] = field(default_factory=dict)
    requests_by_api: dict[str, int] = field(default_factory=dict)
    kill_after_s: list[float] = field(default_factory=list)
    restart_ready_s: list[float] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)

    def fail(self, iteration: int, what: str, **detail: Any) -> None:
        self.failures.append({"iteration": iteration, "what": what, **detail})


def verify(
    tally: Tally,
    iteration: int,
    database_url: str,
    seen: list[Seen],
    env: dict[str, str],
    max_extra: int,
    token_of: Callable[[int], str],
) -> Stored:
    store = read_store(database_url)
    for request in store.requests.values():
        status = request["status"]
        if status not in SETTLED:
            tally.fail(iteration, "unsettled status", request_id=str(request["id"]), status=status)

    for item in seen:
        received = item.received
        tally.requests_checked += 1
        tally.requests_by_api[item.api] = tally.requests_by_api.get(item.api, 0) + 1
        tally.tokens_checked += len(received)
        if item.finished:
            tally.requests_finished_by_client += 1
        else:
            tally.requests_cut_by_kill += 1
        rid = uuid.UUID(item.request_id)
        request = store.requests.get(rid)
        if request is None:
            tally.tokens_lost += len(received)
            tally.fail(iteration, "request missing", request_id=item.request_id,
                       received=len(received))  # fmt: skip
            continue
        status = request["status"]
        tally.statuses[status] = tally.statuses.get(status, 0) + 1
        attempts = store.attempts.get(rid, [])
        if len(attempts) != 1:
            tally.fail(iteration, "not exactly one attempt", request_id=item.request_id,
                       attempts=len(attempts))  # fmt: skip
            if not attempts:
                tally.tokens_lost += len(received)
                continue
        rows = [row for attempt in attempts for row in store.tokens.get(attempt["id"], [])]
        seqs = [seq for seq, _ in rows]
        texts = [text for _, text in rows]
        dups = len(seqs) - len(set(seqs))
        if dups:
            tally.duplicates += dups
            tally.fail(iteration, "duplicate token rows", request_id=item.request_id,
                       duplicates=dups)  # fmt: skip
        distinct = sorted(set(seqs))
        if distinct != list(range(len(distinct))):
            missing = sorted(set(range(max(distinct) + 1)) - set(distinct)) if distinct else []
            tally.gaps += len(missing)
            tally.fail(iteration, "gap in seqs", request_id=item.request_id,
                       missing_seqs=missing[:20])  # fmt: skip
        # What the client received must be the store's first tokens, exactly.
        got = received
        same = 0
        while same < min(len(got), len(texts)) and got[same] == texts[same]:
            same += 1
        if same < len(got):
            lost = max(0, len(got) - len(texts))
            different = len(got) - same - lost
            tally.tokens_lost += lost
            tally.tokens_different += different
            tally.fail(iteration, "received tokens not stored", request_id=item.request_id,
                       status=status, received=len(got), stored=len(texts), matching_prefix=same,
                       lost=lost, different=different)  # fmt: skip
        extra = max(0, len(texts) - len(got))
        tally.extra_stored_tokens += extra
        tally.max_extra_for_one_request = max(tally.max_extra_for_one_request, extra)
        if texts != [token_of(i) for i in range(len(texts))]:
            tally.fail(iteration, "stored tokens are not the ones sent", request_id=item.request_id)
        if item.finished:
            if extra or status != "completed":
                tally.fail(iteration, "finished stream not stored whole and completed",
                           request_id=item.request_id, status=status, received=len(got),
                           stored=len(texts))  # fmt: skip
        elif extra > max_extra:
            tally.fail(iteration, "too many stored tokens the client never saw",
                       request_id=item.request_id, extra=extra)  # fmt: skip
        for attempt in attempts:
            if attempt.get("token_count") is not None and attempt["token_count"] != len(rows):
                tally.fail(iteration, "attempt token_count disagrees with rows",
                           request_id=item.request_id, token_count=attempt["token_count"],
                           rows=len(rows))  # fmt: skip

    result = run_cli(env, "check", "--json", timeout=60)
    if result.returncode != 0:
        tally.fail(iteration, "llmsvc check failed", returncode=result.returncode,
                   output=(result.stdout + result.stderr)[-2000:])  # fmt: skip
    return store


# -- one sync mode -----------------------------------------------------------------------


@dataclass
class Callers:
    """The keys mode's state across sync modes: the keys, and every request a client got back."""

    keys: list[crash_keys.Key]
    sent: dict[uuid.UUID, tuple[str, int | None]] = field(default_factory=dict)
    checked: set[uuid.UUID] = field(default_factory=set)


def run_mode(
    sync: str,
    database_url: str,
    work: Path,
    args: argparse.Namespace,
    rng: random.Random,
    callers: Callers | None,
    upstream: UpstreamProcess | None,
) -> dict[str, Any]:
    wal_dir = work / f"wal-{sync}" / "wal"
    wal_dir.parent.mkdir(parents=True, exist_ok=True)
    settings = {} if callers is None else crash_keys.settings()
    model, token_of = "mock", mock_token
    if upstream is not None:
        model, token_of = "paced", upstream_token
        provider = {"name": "up", "kind": "openai", "base_url": upstream.base_url}
        settings["providers"] = json.dumps([{**provider, "models": [model]}])
    env = daemon_env(database_url, wal_dir, wal_sync=sync, flush_process=True, **settings)
    tally = Tally()
    spend = crash_keys.SpendTally(checked=callers.checked) if callers else None
    began = time.monotonic()
    for iteration in range(args.iterations):
        daemon = DaemonProcess(env).start()
        if callers is not None:
            daemon.wait_caught_up()  # its key table read: a key unknown before is a 503
        stop = threading.Event()
        clients = [
            Client(
                daemon.base_url,
                random.Random(rng.getrandbits(64)),
                stop,
                args.apis[i % len(args.apis) :] + args.apis[: i % len(args.apis)],
                None if callers is None else callers.keys[i % len(callers.keys)],
                model,
            )
            for i in range(args.clients)
        ]
        for client in clients:
            client.start()
        kill_after = rng.uniform(args.kill_min, args.kill_max)
        tally.kill_after_s.append(round(kill_after, 3))
        time.sleep(kill_after)
        code = daemon.kill()
        tally.killed_with_flush_process += "flush process ready" in daemon.log
        if code != -signal.SIGKILL:
            tally.fail(iteration, "daemon did not die of SIGKILL", returncode=code)
        stop.set()
        for client in clients:
            client.join(CLIENT_JOIN_TIMEOUT)
            if client.is_alive():
                tally.fail(iteration, "client still reading after the kill")
            if client.refused is not None:
                tally.fail(iteration, "request refused", answer=client.refused)
        seen = [item for client in clients for item in client.seen]

        restarted = time.monotonic()
        again = DaemonProcess(env).start()
        tally.restart_ready_s.append(round(time.monotonic() - restarted, 3))
        stopped = again.stop()
        if stopped != 0:
            tally.fail(iteration, "restarted daemon did not stop cleanly", returncode=stopped,
                       log=again.log[-3000:])  # fmt: skip
        if found := re.search(r"marked interrupted count=(\d+)", again.log):
            tally.marked_interrupted += int(found.group(1))

        store = verify(tally, iteration, database_url, seen, env, args.max_extra, token_of)
        if callers is not None and spend is not None:
            sent = {uuid.UUID(s.request_id): (str(s.key), s.usage if s.finished else None)
                    for s in seen}  # fmt: skip
            callers.sent.update(sent)
            crash_keys.check_rows(spend, store, callers.keys, sent,
                                  functools.partial(tally.fail, iteration))  # fmt: skip
        tally.iterations += 1
        log(
            f"{sync} iteration {iteration + 1}/{args.iterations}: kill at {kill_after:.2f}s, "
            f"{len(seen)} requests, {sum(len(s.tokens) for s in seen)} tokens, "
            f"failures so far {len(tally.failures)}"
        )
    if callers is not None and spend is not None:
        crash_keys.check_spend(spend, env, database_url, callers.keys, callers.sent,
                               functools.partial(tally.fail, args.iterations))  # fmt: skip
    report: dict[str, Any] = {
        "iterations": tally.iterations,
        "clients": args.clients,
        "requests_checked": tally.requests_checked,
        "requests_finished_by_client": tally.requests_finished_by_client,
        "requests_cut_by_kill": tally.requests_cut_by_kill,
        "tokens_checked": tally.tokens_checked,
        "tokens_lost": tally.tokens_lost,
        "tokens_different": tally.tokens_different,
        "duplicates": tally.duplicates,
        "gaps": tally.gaps,
        "extra_stored_tokens": tally.extra_stored_tokens,
        "max_extra_for_one_request": tally.max_extra_for_one_request,
        "marked_interrupted_at_boot": tally.marked_interrupted,
        "killed_with_flush_process": tally.killed_with_flush_process,
        "statuses_of_checked_requests": tally.statuses,
        "requests_by_api": tally.requests_by_api,
        "kill_after_s": tally.kill_after_s,
        "restart_ready_s": tally.restart_ready_s,
        "seconds": round(time.monotonic() - began, 2),
        "failures": tally.failures[:200],
        "failure_count": len(tally.failures),
    }
    if spend is not None:
        report["keys"] = spend.report()
    return report


def run(args: argparse.Namespace) -> dict[str, Any]:
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    modes = ["write", "fsync"] if args.sync == "both" else [args.sync]
    scratch = None
    work = Path(tempfile.mkdtemp(prefix="llmsvc-crash-"))
    if args.sqlite:
        database_url = f"sqlite+aiosqlite:///{work / 'llmsvc.db'}"
    elif args.database_url:
        sqlite = args.database_url.startswith("sqlite")
        database_url = args.database_url if sqlite else sqlalchemy_pg_url(args.database_url)
    else:
        scratch = f"llmsvc_crash_{uuid.uuid4().hex[:12]}"
        database_url = sqlalchemy_pg_url(asyncio.run(create_scratch(args.pg_url, scratch)))
    report: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "seed": seed,
        "database": "sqlite" if database_url.startswith("sqlite") else redacted(database_url),
        "scratch_database": scratch,
        "settings": {
            "iterations": args.iterations,
            "clients": args.clients,
            "kill_window_s": [args.kill_min, args.kill_max],
            "max_tokens": [50, 300],
            "mock_delay_ms": [2, 10],
            "max_extra": args.max_extra,
            "keys": args.keys,
            "teams": args.teams if args.keys else 0,
            "apis": list(args.apis),
            "upstream_token_delay_ms": args.upstream,
        },
        "modes": {},
    }
    try:
        callers = None
        if args.keys:
            env = daemon_env(database_url, work / "cli" / "wal")
            callers = Callers(crash_keys.create_callers(env, args.keys, args.teams))
        with contextlib.ExitStack() as stack:
            upstream = None
            if args.upstream is not None:
                upstream = stack.enter_context(UpstreamProcess(token_delay_ms=args.upstream))
            for sync in modes:
                report["modes"][sync] = run_mode(
                    sync, database_url, work, args, rng, callers, upstream
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if scratch is not None:
            asyncio.run(drop_scratch(args.pg_url, scratch))
    modes_report = report["modes"].values()
    report["ok"] = bool(modes_report) and all(
        m["tokens_lost"] == 0 and m["duplicates"] == 0 and m["failure_count"] == 0
        for m in modes_report
    )
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--database-url", help="the daemon's database (postgresql:// or sqlite+aiosqlite:///)"
    )
    where.add_argument("--pg-url", help="a server to create (and drop) a scratch database on")
    where.add_argument("--sqlite", action="store_true", help="a scratch SQLite file")
    p.add_argument("--iterations", type=int, default=25)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--sync", choices=["write", "fsync", "both"], default="both")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--kill-min", type=float, default=0.3, help="earliest SIGKILL, seconds")
    p.add_argument("--kill-max", type=float, default=2.0, help="latest SIGKILL, seconds")
    p.add_argument(
        "--max-extra",
        type=int,
        default=16,
        help="most stored tokens a cut-off client may not have seen, per request",
    )
    p.add_argument(
        "--keys", type=int, default=0, help='callers\' keys, with auth = "keys" (default 0: none)'
    )
    p.add_argument("--teams", type=int, default=2, help="teams the keys are spread over")
    p.add_argument(
        "--apis",
        type=lambda text: tuple(text.split(",")),
        default=("chat",),
        help=f"the streaming APIs clients call, comma-separated, of {','.join(APIS)}",
    )
    p.add_argument(
        "--upstream",
        type=float,
        default=None,
        metavar="MS",
        help="serve the clients' model by an OpenAI-compatible upstream process, a token "
        "every MS, instead of the mock",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.upstream is not None and (args.keys or args.upstream <= 0):
        p.error("--upstream takes a positive pace in ms, and does not go with --keys")
    if not args.apis or set(args.apis) - set(APIS):
        p.error(f"--apis takes a comma-separated list of {', '.join(APIS)}")
    url = r"^(postgres(ql)?(\+asyncpg)?|sqlite\+aiosqlite)://"
    if args.database_url and not re.match(url, args.database_url):
        p.error("--database-url must be a postgresql:// or sqlite+aiosqlite:/// URL")
    if args.keys < 0 or args.teams < 0:
        p.error("--keys and --teams count; they cannot be negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=1, allow_nan=False)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
