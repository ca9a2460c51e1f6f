"""The console's page times on a large PostgreSQL store (issue 18: every page under 1 s).

Fills a scratch database with server-side SQL (`INSERT … SELECT generate_series`):
`--requests` requests over `--days` days across 20 models, 5 providers, 200 keys in 20
teams and 5,000 users, a tenth of them with a second attempt, and `--tokens` token rows
per request's last attempt in the token log's daily partitions; then ANALYZE. A real
daemon is started on it with an admin token, the console is logged in to over HTTP (form
POST, cookie) and every page is fetched `--repeats` times: median and max. A few values
are rare on purpose (one model, provider, user and tenant in the metadata) so a filter that
finds few rows shows what an index is missing. A search of the replies' text is timed where
it finds every request, where it finds none (it reads as many replies as one search may: the
worst case), on the page after that one, and with the rare model (its candidates are spread
over every day's partition of the token log).

Before/after a migration in one session: run once with `--keep`, then again with
`--reuse` on the same database: the store is migrated to head first (the time is
reported, it is what the migration costs an operator on this store) and not filled again.

    python benchmarks/bench_console.py --pg-url postgresql://postgres@127.0.0.1:5432/postgres \
        --keep --out benchmarks/results/console-before.json
"""

from __future__ import annotations

import argparse
import asyncio
import http.cookiejar
import re
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from benchkit import (
    PACKAGES,
    identifier,
    log,
    machine_info,
    pg_drop_scratch,
    pg_scratch,
    write_report,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from daemon_process import DaemonProcess, daemon_env

from llmsvc.maintenance.retention import create_partition
from llmsvc.store.engine import schema_revision, upgrade_to_head

TOKEN = "bench-console-admin-token"
MODELS, PROVIDERS, TEAMS, KEYS, USERS, TENANTS = 20, 5, 20, 200, 5000, 1000
RARE = 10_000  # every RARE-th request has the rare model, user and tenant


def uuid_sql(kind: int, number: str) -> str:
    """A deterministic UUID for row `number` of a kind (1 request, 2 attempt, 3 key, 4 team)."""
    return f"('00000000-0000-4000-800{kind}-' || lpad(to_hex({number}), 12, '0'))::uuid"


def fill_statements(requests: int, tokens: int, start: datetime, span_s: float) -> list[str]:
    """The SQL that fills the store: teams, keys, requests, attempts (tokens apart)."""
    step = span_s / requests
    at = f"(timestamptz '{start.isoformat()}' + (g * {step}) * interval '1 second')"
    rare = f"g % {RARE} = 0"
    return [
        f"""INSERT INTO teams (id, name, created_at, updated_at)
            SELECT {uuid_sql(4, "g")}, 'team-' || g, now(), now()
            FROM generate_series(0, {TEAMS - 1}) g""",
        f"""INSERT INTO api_keys (id, name, team_id, secret_hash, prefix, created_at, updated_at)
            SELECT {uuid_sql(3, "g")}, 'key-' || g, {uuid_sql(4, f"g % {TEAMS}")},
                   md5('secret' || g) || md5('hash' || g), 'sk-bench' || g, now(), now()
            FROM generate_series(0, {KEYS - 1}) g""",
        f"""INSERT INTO llm_requests (id, instance_id, correlation_id, model, stream, status,
                messages, params, created_at, ended_at, prompt_tokens, completion_tokens, cost,
                provider, error, key_id, team_id, end_user, metadata, api)
            SELECT {uuid_sql(1, "g")}, '00000000-0000-4000-8000-00000000beef', 'corr-' || g,
                CASE WHEN {rare} THEN 'model-rare' ELSE 'model-' || (g % {MODELS}) END,
                g % 3 > 0,
                CASE WHEN g % 100 = 7 THEN 'failed' WHEN g % 1000 = 13 THEN 'interrupted'
                     ELSE 'completed' END,
                '[{{"role": "user", "content": "Tell me about durable logs."}}]'::jsonb,
                '{{"max_tokens": {tokens}}}'::jsonb,
                {at}, {at} + interval '1200 milliseconds',
                20 + g % 50, {tokens}, (20 + g % 50 + {tokens}) * 0.000002,
                CASE WHEN {rare} THEN 'provider-rare' ELSE 'provider-' || (g % {PROVIDERS}) END,
                CASE WHEN g % 100 = 7 THEN 'upstream 500' END,
                {uuid_sql(3, f"g % {KEYS}")}, {uuid_sql(4, f"g % {KEYS} % {TEAMS}")},
                CASE WHEN {rare} THEN 'user-rare' ELSE 'user-' || (g % {USERS}) END,
                jsonb_build_object('app', 'app-' || (g % 10), 'tenant',
                    CASE WHEN {rare} THEN 'tenant-rare' ELSE 'tenant-' || (g % {TENANTS}) END),
                'chat'
            FROM generate_series(1, {requests}) g""",
        # The last attempt of every request; a tenth had a failed one before it.
        f"""INSERT INTO llm_attempts (id, request_id, attempt_no, provider, model, status,
                started_at, first_token_at, ended_at, http_status, prompt_tokens,
                completion_tokens, token_count)
            SELECT {uuid_sql(2, "g * 2")}, {uuid_sql(1, "g")},
                CASE WHEN g % 10 = 3 THEN 2 ELSE 1 END, r.provider, 'upstream-model', r.status,
                r.created_at + interval '100 milliseconds',
                r.created_at + interval '250 milliseconds', r.ended_at, 200,
                r.prompt_tokens, r.completion_tokens, {tokens}
            FROM generate_series(1, {requests}) g
            JOIN llm_requests r ON r.id = {uuid_sql(1, "g")}""",
        f"""INSERT INTO llm_attempts (id, request_id, attempt_no, provider, model, status,
                started_at, ended_at, http_status, error_code, error_message)
            SELECT {uuid_sql(2, "g * 2 + 1")}, {uuid_sql(1, "g")}, 1,
                'provider-' || ((g + 1) % {PROVIDERS}), 'upstream-model', 'failed',
                timestamptz '{start.isoformat()}' + (g * {step}) * interval '1 second',
                timestamptz '{start.isoformat()}' + (g * {step} + 0.05) * interval '1 second',
                503, 'server_error', 'overloaded'
            FROM generate_series(1, {requests}) g WHERE g % 10 = 3""",
    ]


def token_statement(first: int, last: int, tokens: int, step: float, start: datetime) -> str:
    """Token rows of requests first..last: `tokens` each, 20 ms apart after the first at 250 ms."""
    return f"""INSERT INTO llm_token_log (attempt_id, seq, text, created_at)
        SELECT {uuid_sql(2, "g * 2")}, s, 'tok ',
            timestamptz '{start.isoformat()}'
                + (g * {step} + 0.25 + (s - 1) * 0.02) * interval '1 second'
        FROM generate_series({first}, {last}) g, generate_series(1, {tokens}) s"""


async def fill(engine: AsyncEngine, args: argparse.Namespace) -> dict[str, float]:
    """Fill the store; seconds per part. Token rows go in slices over two connections."""
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=args.days)
    span_s = args.days * 86400 - 60
    took: dict[str, float] = {}
    began = time.monotonic()
    async with engine.begin() as conn:
        day = start.date()
        while day <= now.date():
            await create_partition(conn, day)
            day += timedelta(days=1)
        await conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
        for sql in fill_statements(args.requests, args.tokens, start, span_s):
            await conn.exec_driver_sql(sql)
    took["requests_and_attempts_s"] = time.monotonic() - began
    began = time.monotonic()
    step = span_s / args.requests
    slice_size = max(1, args.requests // 40)
    slices = asyncio.Queue[tuple[int, int]]()
    for first in range(1, args.requests + 1, slice_size):
        slices.put_nowait((first, min(first + slice_size - 1, args.requests)))

    async def loader() -> None:
        while not slices.empty():
            first, last = slices.get_nowait()
            async with engine.begin() as conn:
                await conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
                await conn.exec_driver_sql(token_statement(first, last, args.tokens, step, start))

    await asyncio.gather(*(loader() for _ in range(2)))
    took["tokens_s"] = time.monotonic() - began
    return took


async def analyze(engine: AsyncEngine) -> float:
    began = time.monotonic()
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.exec_driver_sql("VACUUM ANALYZE")
    return time.monotonic() - began


async def sizes(engine: AsyncEngine) -> dict[str, Any]:
    async with engine.connect() as conn:
        count = "SELECT count(*) FROM {}"
        return {
            "requests": await conn.scalar(sa.text(count.format("llm_requests"))),
            "attempts": await conn.scalar(sa.text(count.format("llm_attempts"))),
            "token_rows": await conn.scalar(sa.text(count.format("llm_token_log"))),
            "database_bytes": await conn.scalar(
                sa.text("SELECT pg_database_size(current_database())")
            ),
        }


async def cursor_at(engine: AsyncEngine, fraction: float) -> str:
    """The `before` link of a page `fraction` deep in the store (what following links gives)."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.text(
                    "SELECT created_at, id FROM llm_requests ORDER BY created_at DESC, id DESC "
                    "OFFSET :n LIMIT 1"
                ),
                {
                    "n": int(
                        fraction * await conn.scalar(sa.text("SELECT count(*) FROM llm_requests"))
                    )
                },
            )
        ).one()
    return f"{row.created_at.astimezone(UTC).isoformat()}_{row.id}"


class Console:
    """A logged-in HTTP client of the console: its session cookie in a jar."""

    def __init__(self, base_url: str) -> None:
        self.base = f"{base_url}/console/"
        jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        form = urllib.parse.urlencode({"token": TOKEN}).encode()
        login = urllib.request.Request(
            self.base + "login", data=form, headers={"Origin": base_url}, method="POST"
        )
        with self.opener.open(login, timeout=30) as answer:  # followed to the requests page
            assert answer.url.endswith("/console/requests"), answer.url
        assert len(jar) == 1, "no session cookie"

    def get(self, path: str) -> tuple[float, str]:
        began = time.monotonic()
        with self.opener.open(self.base + path, timeout=120) as answer:
            body = answer.read().decode()
        return time.monotonic() - began, body


def older_link(body: str) -> str:
    found = re.search(r'class="older" href="/console/([^"]+)"', body)
    assert found, "no link to older requests"
    return found[1].replace("&amp;", "&")


def pages(console: Console, deep: str, request_id: str, tokens: int) -> dict[str, str]:
    """Every page timed: name -> path under /console/."""
    _, first = console.get("requests")
    rare_since = (datetime.now(UTC) - timedelta(days=15)).replace(microsecond=0)
    window = {
        "since": rare_since.isoformat(),
        "until": (rare_since + timedelta(hours=1)).isoformat(),
    }
    _, detail = console.get(f"requests/{request_id}")
    assert f"{tokens} tokens" in detail, "the request page shows no timeline of its tokens"
    q = urllib.parse.urlencode
    # A text no reply holds is a search's worst case: it reads all the replies it may.
    _, nowhere = console.get(f"requests?{q({'text': 'no reply says this'})}")
    assert 'class="searched"' in nowhere, "the search does not say how far it read"
    return {
        "requests": "requests",
        "requests_page_2": older_link(first),
        "requests_deep_page": f"requests?{q({'before': deep})}",
        "filter_status_failed": f"requests?{q({'status': 'failed'})}",
        "filter_status_interrupted": f"requests?{q({'status': 'interrupted'})}",
        "filter_model": f"requests?{q({'model': 'model-7'})}",
        "filter_model_rare": f"requests?{q({'model': 'model-rare'})}",
        "filter_provider": f"requests?{q({'provider': 'provider-3'})}",
        "filter_provider_rare": f"requests?{q({'provider': 'provider-rare'})}",
        "filter_key": f"requests?{q({'key': 'key-42'})}",
        "filter_team": f"requests?{q({'team': 'team-4'})}",
        "filter_user": f"requests?{q({'user': 'user-1234'})}",
        "filter_user_rare": f"requests?{q({'user': 'user-rare'})}",
        "filter_metadata": f"requests?{q({'metadata': 'tenant:tenant-77'})}",
        "filter_metadata_rare": f"requests?{q({'metadata': 'tenant:tenant-rare'})}",
        "filter_correlation_id": f"requests?{q({'correlation_id': 'corr-4242'})}",
        "filter_time_range": f"requests?{q(window)}",
        "filter_model_and_user": f"requests?{q({'model': 'model-4', 'user': 'user-1234'})}",
        "filter_text_found": f"requests?{q({'text': 'TOK TOK'})}",
        "filter_text_nowhere": f"requests?{q({'text': 'no reply says this'})}",
        "filter_text_nowhere_older": older_link(nowhere),
        "filter_text_nowhere_model_rare": (
            f"requests?{q({'text': 'no reply says this', 'model': 'model-rare'})}"
        ),
        "request_with_timeline": f"requests/{request_id}",
        "usage_default": "usage",
        "usage_model_daily_30d": f"usage?{q({'by': 'model', 'since': '30d', 'per': 'day'})}",
        "usage_key_7d": f"usage?{q({'by': 'key', 'since': '7d'})}",
        "usage_team_30d": f"usage?{q({'by': 'team', 'since': '30d'})}",
        "usage_day_30d": f"usage?{q({'by': 'day', 'since': '30d'})}",
        "health": "health",
    }


def time_pages(console: Console, paths: dict[str, str], repeats: int) -> dict[str, Any]:
    timed: dict[str, Any] = {}
    for name, path in paths.items():
        seconds = [console.get(path)[0] for _ in range(repeats)]
        timed[name] = {
            "median_ms": round(statistics.median(seconds) * 1000, 1),
            "max_ms": round(max(seconds) * 1000, 1),
        }
        log(f"{name}: {timed[name]}")
    return timed


async def prepare(url: str, args: argparse.Namespace) -> dict[str, Any]:
    engine = create_async_engine(url)
    try:
        report: dict[str, Any] = {}
        before = (await schema_revision(engine))[0]
        began = time.monotonic()
        await upgrade_to_head(engine)
        report["migrated"] = {
            "from": before,
            "to": (await schema_revision(engine))[0],
            "seconds": round(time.monotonic() - began, 1),
        }
        if not args.reuse:
            log(f"filling {args.requests} requests with {args.tokens} tokens each")
            took = await fill(engine, args)
            took["vacuum_analyze_s"] = await analyze(engine)
            report["fill"] = {k: round(v, 1) for k, v in took.items()}
            report["fill"]["total_s"] = round(sum(took.values()), 1)
            log(f"filled: {report['fill']}")
        else:
            report["analyze_s"] = round(await analyze(engine), 1)
        report["store"] = await sizes(engine)
        report["deep_cursor"] = await cursor_at(engine, 0.6)
        return report
    finally:
        await engine.dispose()


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    url = asyncio.run((pg_scratch if not args.reuse else reused)(args.pg_url, args.db))
    report: dict[str, Any] = {
        "machine": machine_info(tmp, PACKAGES),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": {k: v for k, v in vars(args).items() if k not in ("pg_url", "out", "tmp_dir")},
    }
    try:
        report.update(asyncio.run(prepare(url, args)))
        env = daemon_env(url, tmp / "wal", admin_token=TOKEN)
        with DaemonProcess(env) as daemon:
            daemon.wait_caught_up(timeout=600)  # boot checks every token row
            console = Console(daemon.base_url)
            request_id = f"00000000-0000-4000-8001-{args.requests // 2:012x}"
            paths = pages(console, report.pop("deep_cursor"), request_id, args.tokens)
            report["pages"] = time_pages(console, paths, args.repeats)
            report["daemon_exit"] = daemon.stop()
        slowest = max(report["pages"].items(), key=lambda item: item[1]["median_ms"])
        report["slowest_page"] = {"page": slowest[0], **slowest[1]}
    finally:
        if not args.keep:
            asyncio.run(pg_drop_scratch(args.pg_url, args.db))
    return report


async def reused(pg_url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(pg_url)
    scheme = "postgresql+asyncpg"
    return urllib.parse.urlunsplit(parts._replace(scheme=scheme, path=f"/{name}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--db", type=identifier, default="llmsvc_bench_console")
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--tokens", type=int, default=50, help="token rows per request")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument("--reuse", action="store_true", help="time a kept database again")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--tmp-dir", type=Path)
    args = parser.parse_args()
    out = args.out or Path(__file__).parent / "results" / (
        f"{datetime.now(UTC):%Y-%m-%d}-bench-console.json"
    )
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        write_report(run(args, Path(tmp)), out)


if __name__ == "__main__":
    main()
