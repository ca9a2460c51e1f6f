"""`llmsvc status` filters and `llmsvc spend` over requests journaled under different callers.

Requests are journaled with the gateway's own `Journal` and attribution fields into
a real WAL, flushed by the real Flusher into SQLite or PostgreSQL, then read back by
the `llmsvc` command as an operator runs it.
"""

from __future__ import annotations

import asyncio
import re
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from daemon_process import daemon_env, run_cli
from policies import flush_policy, wal_policy

from llmsvc.admin.console import charts
from llmsvc.admin.console.charts import AXIS_Y, TOP, usage_charts
from llmsvc.callers import Caller
from llmsvc.gateway.attribution import Attribution, record_fields
from llmsvc.gateway.journal import Journal
from llmsvc.store.attribution import spend
from llmsvc.store.engine import create_engine, upgrade_to_head
from llmsvc.store.flusher import Flusher
from llmsvc.store.schema import api_keys, llm_requests, teams
from llmsvc.wal.segment import instance_id
from llmsvc.wal.writer import WalWriter

pytestmark = pytest.mark.timeout(120)

SEARCH, ADS = uuid.uuid4(), uuid.uuid4()
ALPHA, BETA, GAMMA, ORPHAN = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()


@dataclass
class Journaled:
    env: dict[str, str]
    ids: dict[str, uuid.UUID]  # r1..r5

    def cli(self, *args: str) -> Any:
        done = run_cli(self.env, *args, "--json")
        assert done.returncode == 0, done.stderr
        return orjson.loads(done.stdout)

    def status(self, *args: str) -> set[str]:
        """The request names (r1..r5) `status` lists with these filters."""
        names = {str(v): k for k, v in self.ids.items()}
        return {names[row["id"]] for row in self.cli("status", *args)}


# name: (caller, attribution, model, prompt, completion, cost)
REQUESTS: dict[str, tuple[Caller | None, Attribution, str, int, int, float | None]] = {
    "r1": (
        Caller(ALPHA, "alpha", SEARCH, "search"),
        Attribution("u1", {"app": "web", "env": "prod"}, "s1"),
        "gpt-a", 10, 5, 0.1,
    ),
    "r2": (Caller(BETA, "beta", SEARCH, "search"), Attribution("u2", {"app": "cli"}),
           "gpt-b", 20, 10, 0.2),
    "r3": (Caller(GAMMA, "gamma", ADS, "ads"), Attribution("u1"), "gpt-a", 30, 15, 0.3),
    "r4": (Caller(ORPHAN, "gone"), Attribution(), "gpt-a", 1, 1, None),  # no api_keys row
    "r5": (None, Attribution(), "gpt-b", 2, 2, None),  # auth = "none"
}  # fmt: skip


async def _journal(database_url: str, wal_dir: Path) -> dict[str, uuid.UUID]:
    engine = create_engine(database_url)
    try:
        await upgrade_to_head(engine)
        now = datetime.now(UTC)
        async with engine.begin() as conn:
            await conn.execute(
                sa.insert(teams),
                [
                    {"id": t, "name": n, "created_at": now, "updated_at": now}
                    for t, n in ((SEARCH, "search"), (ADS, "ads"))
                ],
            )
            await conn.execute(
                sa.insert(api_keys),
                [
                    {
                        "id": k,
                        "name": n,
                        "team_id": t,
                        "secret_hash": k.hex * 2,
                        "prefix": "sk-llmsvc-" + k.hex[:4],
                        "created_at": now,
                        "updated_at": now,
                    }
                    for k, n, t in ((ALPHA, "alpha", SEARCH), (BETA, "beta", SEARCH),
                                    (GAMMA, "gamma", ADS))
                ],
            )  # fmt: skip
        wal_id = instance_id(wal_dir)
        writer = WalWriter(wal_dir, wal_id, wal_policy())
        writer.open(asyncio.get_running_loop(), lambda exc: None)
        journal = Journal(writer, {"environment": "staging", "version": "1.2.3"})
        ids = {}
        for name, (caller, who, model, prompt, completion, cost) in REQUESTS.items():
            ids[name] = request_id = uuid.uuid4()
            messages = [{"role": "user", "content": name}]
            journal.request_start(
                request_id, uuid.uuid4(), model, True, messages, {}, record_fields(caller, who)
            )
            last = journal.request_end(
                request_id,
                status="completed",
                prompt_tokens=prompt,
                completion_tokens=completion,
                cost=cost,
                provider="mock",
                error=None,
            )
        await last
        flusher = Flusher(engine, wal_dir, wal_id, lambda: writer.end, flush_policy(interval=0.01))
        await flusher.start()
        assert await flusher.drain(10)
        await flusher.close()
        await writer.close()
        async with engine.begin() as conn:  # r3 was three days ago
            await conn.execute(
                sa.update(llm_requests)
                .where(llm_requests.c.id == ids["r3"])
                .values(created_at=now - timedelta(days=3))
            )
        return ids
    finally:
        await engine.dispose()


@pytest.fixture
async def journaled(database_url: str, tmp_path: Path) -> Journaled:
    wal_dir = tmp_path / "wal"
    wal_dir.mkdir()
    ids = await _journal(database_url, wal_dir)
    return Journaled(daemon_env(database_url, tmp_path / "cli-wal"), ids)


def test_each_row_records_its_callers_key_team_user_metadata_session_and_deployment(
    journaled: Journaled,
) -> None:
    r1 = journaled.cli("show", str(journaled.ids["r1"]))["request"]
    assert (r1["key_id"], r1["team_id"]) == (str(ALPHA), str(SEARCH))
    assert (r1["end_user"], r1["session_id"]) == ("u1", "s1")
    assert r1["metadata"] == {"app": "web", "env": "prod"}
    assert (r1["environment"], r1["version"]) == ("staging", "1.2.3")
    r5 = journaled.cli("show", str(journaled.ids["r5"]))["request"]
    assert [r5[c] for c in ("key_id", "team_id", "end_user", "metadata", "session_id")] == [
        None
    ] * 5
    assert (r5["environment"], r5["version"]) == ("staging", "1.2.3")


def test_status_filters_by_key_team_user_metadata_and_since(journaled: Journaled) -> None:
    assert journaled.status() == {"r1", "r2", "r3", "r4", "r5"}
    assert journaled.status("--key", "alpha") == {"r1"}
    assert journaled.status("--key", str(BETA)) == {"r2"}
    assert journaled.status("--key", str(ORPHAN)) == {"r4"}  # an id with no key row
    assert journaled.status("--team", "search") == {"r1", "r2"}
    assert journaled.status("--team", str(ADS)) == {"r3"}
    assert journaled.status("--user", "u1") == {"r1", "r3"}
    assert journaled.status("--metadata", "app=web") == {"r1"}
    assert journaled.status("--metadata", "app=web", "--metadata", "env=prod") == {"r1"}
    assert journaled.status("--metadata", "app=web", "--metadata", "env=dev") == set()
    assert journaled.status("--since", "24h") == {"r1", "r2", "r4", "r5"}
    assert journaled.status("--since", "7d", "--team", "ads", "--user", "u1") == {"r3"}
    tomorrow = (date.today() + timedelta(days=2)).isoformat()
    assert journaled.status("--since", tomorrow) == set()


def test_status_shows_key_and_team_names_or_the_id_without_a_row(journaled: Journaled) -> None:
    done = run_cli(journaled.env, "status")
    assert done.returncode == 0, done.stderr
    header, *lines = done.stdout.splitlines()
    assert header.split()[6:9] == ["KEY", "TEAM", "STATUS"]
    line = {name: next(x for x in lines if str(i) in x) for name, i in journaled.ids.items()}
    assert line["r1"].split()[5:7] == ["alpha", "search"]
    assert line["r3"].split()[5:7] == ["gamma", "ads"]
    assert line["r4"].split()[5:7] == [str(ORPHAN), "-"]
    assert line["r5"].split()[5:7] == ["-", "-"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("--key", "nosuch"), 1, "no key named 'nosuch'"),
        (("--team", "nosuch"), 1, "no team named 'nosuch'"),
        (("--since", "yesterday"), 2, "--since: 'yesterday' is neither a duration"),
        (("--metadata", "app"), 2, "--metadata 'app': give it as KEY=VALUE"),
    ],
)
def test_status_refuses_unknown_names_and_bad_filters_saying_why(
    journaled: Journaled, args: tuple[str, ...], code: int, message: str
) -> None:
    done = run_cli(journaled.env, "status", *args)
    assert done.returncode == code
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def _spend(journaled: Journaled, *args: str) -> dict[Any, tuple[Any, ...]]:
    return {
        row["group"]: (
            row["name"],
            row["requests"],
            row["prompt_tokens"],
            row["completion_tokens"],
            None if row["cost"] is None else round(row["cost"], 9),
        )
        for row in journaled.cli("spend", *args)
    }


def test_spend_sums_requests_tokens_and_cost_per_key_team_user_model_and_day(
    journaled: Journaled,
) -> None:
    assert _spend(journaled, "--by", "key") == {
        str(ALPHA): ("alpha", 1, 10, 5, 0.1),
        str(BETA): ("beta", 1, 20, 10, 0.2),
        str(GAMMA): ("gamma", 1, 30, 15, 0.3),
        str(ORPHAN): (None, 1, 1, 1, None),
        None: (None, 1, 2, 2, None),
    }
    assert _spend(journaled, "--by", "team") == {
        str(SEARCH): ("search", 2, 30, 15, 0.3),
        str(ADS): ("ads", 1, 30, 15, 0.3),
        None: (None, 2, 3, 3, None),
    }
    assert _spend(journaled, "--by", "user") == {
        "u1": (None, 2, 40, 20, 0.4),
        "u2": (None, 1, 20, 10, 0.2),
        None: (None, 2, 3, 3, None),
    }
    assert _spend(journaled, "--by", "model") == {
        "gpt-a": (None, 3, 41, 21, 0.4),
        "gpt-b": (None, 2, 22, 12, 0.2),
    }
    today = datetime.now(UTC).date()
    assert _spend(journaled, "--by", "day") == {
        (today - timedelta(days=3)).isoformat(): (None, 1, 30, 15, 0.3),
        today.isoformat(): (None, 4, 33, 18, 0.3),
    }
    assert _spend(journaled, "--by", "team", "--since", "24h") == {
        str(SEARCH): ("search", 2, 30, 15, 0.3),
        None: (None, 2, 3, 3, None),
    }


def test_spend_prints_a_table_costliest_first_with_names(journaled: Journaled) -> None:
    done = run_cli(journaled.env, "spend", "--by", "team")
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header == "TEAM    REQUESTS  PROMPT TOKENS  COMPLETION TOKENS  COST"
    assert [r.split() for r in rows] == [
        ["search", "2", "30", "15", "0.300000"],  # 0.1 + 0.2, then 0.3: the count decides
        ["ads", "1", "30", "15", "0.300000"],
        ["-", "2", "3", "3", "-"],
    ]


async def test_spend_per_day_splits_each_group_by_utc_date_in_date_order(
    journaled: Journaled,
) -> None:
    engine = create_engine(journaled.env["LLMSVC_DATABASE_URL"])
    try:
        daily = await spend(engine, "model", per="day")
        whole = await spend(engine, "model")
        by_day = await spend(engine, "day", per="day")  # already per day: as without
        hourly = await spend(engine, "provider", per="hour")
    finally:
        await engine.dispose()
    today = datetime.now(UTC).date()
    days = [row["day"] for row in daily]
    assert days == sorted(days)
    assert set(days) == {(today - timedelta(days=3)).isoformat(), today.isoformat()}
    summed: dict[str, list[int]] = {}
    for row in daily:
        totals = summed.setdefault(row["group"], [0, 0, 0])
        for n, field in enumerate(("requests", "prompt_tokens", "completion_tokens")):
            totals[n] += row[field]
    assert summed == {
        row["group"]: [row["requests"], row["prompt_tokens"], row["completion_tokens"]]
        for row in whole
    }
    assert [row["group"] for row in by_day] == [(today - timedelta(days=3)).isoformat(),
                                                today.isoformat()]  # fmt: skip
    hours = [row["day"] for row in hourly]  # per UTC hour, by the provider that served each
    assert hours == sorted(hours)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:00", hour) for hour in hours)
    assert {hour[:10] for hour in hours} == set(days)
    assert sum(row["requests"] for row in hourly) == sum(row["requests"] for row in whole)
    assert sum(row["errors"] for row in hourly) == sum(row["errors"] for row in whole)
    assert all(0 <= row["errors"] <= row["requests"] for row in hourly)


SVG = "{http://www.w3.org/2000/svg}"


def _bars(html: str) -> dict[str, dict[tuple[str, str], float]]:
    """Each chart's bar heights by (bucket, series), as the console's usage page draws them."""
    charts: dict[str, dict[tuple[str, str], float]] = {}
    for svg in ET.fromstring(f"<div>{html}</div>").iter(f"{SVG}svg"):
        bars = charts.setdefault(svg.attrib["class"].split()[1], {})
        for rect in svg.iter(f"{SVG}rect"):
            title = rect.find(f"{SVG}title")
            if title is not None:  # a bar; a legend's swatch has none
                bucket, _, rest = (title.text or "").partition(" · ")
                bars[bucket, rest.rpartition(":")[0]] = float(rect.attrib["height"])
    return charts


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_usage_charts_draw_each_days_totals_to_scale_stacked_by_group(
    journaled: Journaled, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Today: r1, r2, r4 and r5 (failed here), 51 tokens, $0.3; three days ago r3 alone, 45
    tokens, $0.3. The tallest bucket fills the plot; the others are to its scale."""
    engine = create_engine(journaled.env["LLMSVC_DATABASE_URL"])
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.update(llm_requests)
                               .where(llm_requests.c.id == journaled.ids["r5"])
                               .values(status="failed"))  # fmt: skip
        rows = await spend(engine, "model", per="day")
    finally:
        await engine.dispose()
    today = datetime.now(UTC).date()
    now, then = today.isoformat(), (today - timedelta(days=3)).isoformat()
    plot = AXIS_Y - TOP
    drawn = _bars(usage_charts(rows, "model", "day"))
    assert drawn["tokens"] == pytest.approx({
        (then, "gpt-a"): plot * 45 / 51,
        (now, "gpt-a"): plot * (15 + 2) / 51,
        (now, "gpt-b"): plot * (30 + 4) / 51,
    }, abs=0.01)  # fmt: skip
    assert drawn["requests"] == pytest.approx({
        (then, "completed"): plot * 1 / 4,
        (now, "completed"): plot * 3 / 4,
        (now, "errors"): plot * 1 / 4,
    }, abs=0.01)  # fmt: skip
    assert drawn["cost"] == pytest.approx({(then, "cost"): plot, (now, "cost"): plot}, abs=0.01)
    monkeypatch.setattr(charts, "TOP_GROUPS", 1)  # gpt-a has more tokens: gpt-b is "other"
    html = usage_charts(rows, "model", "day")
    assert set(_bars(html)["tokens"]) == {(then, "gpt-a"), (now, "gpt-a"), (now, "other")}
    legend = [t.text for t in ET.fromstring(f"<div>{html}</div>").iter(f"{SVG}text")
              if t.get("class") == "legend"]  # fmt: skip
    assert legend[:2] == ["gpt-a", "other"]
