"""The keys mode of benchmarks/crash_test.py: callers under several teams, their spend checked.

With `auth = "keys"` the clients stream under different keys of different teams; after
each crash and restart every stored request must carry its key's id and team, hold
token counts and a cost that follow from its stored tokens and the price table, and
`llmsvc spend --by key|team`, the budgets' own query and a plain sum over the rows must
agree, with each request a client got back counted once under its key.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import math
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from daemon_process import Stored, read_store, run_async, run_cli

from llmsvc.store.engine import create_engine
from llmsvc.store.queries import spend_since
from llmsvc.tokens import count_completion, count_prompt

# A tokenizer fits the first model (its counts are `tokenizer`), none the second (`deltas`);
# both are served by the mock provider, whose usage counts the prompt's words.
MODELS = ("gpt-4o-mini", "mock")
PRICES = {model: {"input_per_million": 1000.0, "output_per_million": 2000.0} for model in MODELS}
MOCK_PROMPT_WORDS = 2  # "crash me"
# Limits that are on (buckets, budget spend read from the store) but never refuse here.
GENEROUS = ["--rpm", "1000000", "--tpm", "1000000000", "--budget", "1000000"]
GENEROUS += ["--budget-period", "month"]
EVER = datetime(2000, 1, 1, tzinfo=UTC)
NOTHING = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost": None}


def settings() -> dict[str, str]:
    """The daemon's settings for this mode: keys required, both models, a price table."""
    provider = {"name": "mock", "kind": "mock", "models": list(MODELS)}
    return {"auth": "keys", "providers": json.dumps([provider]), "prices": json.dumps(PRICES)}


@dataclass(frozen=True)
class Key:
    name: str
    id: uuid.UUID
    team_id: uuid.UUID | None
    secret: str


def _cli_json(env: dict[str, str], *args: str) -> Any:
    done = run_cli(env, *args, "--json", timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"llmsvc {' '.join(args[:2])} failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def create_callers(env: dict[str, str], keys: int, teams: int) -> list[Key]:
    """`teams` teams and `keys` keys (key i in team i mod teams) made with the CLI, as an
    operator makes them, before the daemon's first start; the commands run side by side."""
    if (done := run_cli(env, "migrate", timeout=60)).returncode != 0:
        raise RuntimeError(f"llmsvc migrate failed: {done.stderr.strip()}")
    team_names = [f"team-{t}" for t in range(teams)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        made = pool.map(lambda n: _cli_json(env, "teams", "create", n, *GENEROUS), team_names)
        team_ids = {t["team"]["name"]: uuid.UUID(t["team"]["id"]) for t in made}

        def create(i: int) -> Key:
            options = ["--team", team_names[i % teams]] if teams else []
            printed = _cli_json(env, "keys", "create", f"key-{i}", *options, *GENEROUS)
            team = team_names[i % teams] if teams else None
            return Key(
                f"key-{i}",
                uuid.UUID(printed["key"]["id"]),
                None if team is None else team_ids[team],
                printed["secret"],
            )

        return list(pool.map(create, range(keys)))


def expected_cost(model: str, prompt: int | None, completion: int | None) -> float | None:
    if prompt is None or completion is None:
        return None
    price = PRICES[model]
    return (prompt * price["input_per_million"] + completion * price["output_per_million"]) / 1e6


def same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@dataclass
class SpendTally:
    """What the keys mode checked, summed over a sync mode's iterations."""

    requests_with_tokens_counted: int = 0
    interrupted_counted: dict[str, int] = field(default_factory=dict)  # by completion source
    interrupted_without_cost: int = 0  # no tokenizer fits: the prompt, so the cost, is unknown
    client_usage_checked: int = 0  # finished streams whose `include_usage` matched the row
    stored_not_seen: int = 0  # journaled, then the kill before the client had its headers
    groups: dict[str, Any] = field(default_factory=dict)  # the last spend check's figures
    checked: set[uuid.UUID] = field(default_factory=set)  # rows checked (by any mode)

    def report(self) -> dict[str, Any]:
        return {
            "requests_with_tokens_counted": self.requests_with_tokens_counted,
            "interrupted_counted_by": self.interrupted_counted,
            "interrupted_without_cost": self.interrupted_without_cost,
            "client_usage_checked": self.client_usage_checked,
            "stored_not_seen_by_a_client": self.stored_not_seen,
            "spend": self.groups,
        }


def check_rows(
    tally: SpendTally,
    store: Stored,
    keys: list[Key],
    sent: dict[uuid.UUID, tuple[str, int | None]],
    fail: Any,
) -> None:
    """Each request stored since the last call: its key and team, its token counts and cost
    from its stored tokens.

    `sent` maps each request id a client got back since the last call to its key's name and,
    for a stream the client read to its end, the completion tokens its usage chunk told.
    """
    by_name = {key.name: key for key in keys}
    by_id = {key.id: key for key in keys}
    for rid, (key_name, told) in sent.items():
        row = store.requests.get(rid)
        if row is None:
            continue  # counted as missing by the token check
        key = by_name[key_name]
        if (row["key_id"], row["team_id"]) != (key.id, key.team_id):
            fail("request not attributed to its key", request_id=str(rid), key=key_name,
                 key_id=str(row["key_id"]), team_id=str(row["team_id"]))  # fmt: skip
        if told is not None:
            tally.client_usage_checked += 1
            if row["completion_tokens"] != told:
                fail("stored completion tokens differ from the client's usage",
                     request_id=str(rid), stored=row["completion_tokens"], told=told)  # fmt: skip
    for rid, row in store.requests.items():
        if rid in tally.checked:
            continue
        tally.checked.add(rid)
        if row["key_id"] not in by_id:
            fail("stored request without one of the keys", request_id=str(rid))
            continue
        if by_id[row["key_id"]].team_id != row["team_id"]:
            fail("stored request's team is not its key's", request_id=str(rid))
        if rid not in sent:
            tally.stored_not_seen += 1
        _check_counts(tally, store, rid, row, fail)


def _check_counts(
    tally: SpendTally, store: Stored, rid: uuid.UUID, row: dict[str, Any], fail: Any
) -> None:
    """Token counts and cost as the stored tokens and the price table make them."""
    texts = [text for attempt in store.attempts.get(rid, []) for _, text in
             store.tokens.get(attempt["id"], [])]  # fmt: skip
    model, status = row["model"], row["status"]
    got = (row["prompt_tokens"], row["completion_tokens"], row["cost"])
    sources = (row["prompt_tokens_source"], row["completion_tokens_source"])
    if not texts:
        return  # nothing received: nothing known billed
    tally.requests_with_tokens_counted += 1
    if sources[1] == "provider":
        want: tuple[Any, ...] = (MOCK_PROMPT_WORDS, len(texts))
        want_sources: tuple[Any, ...] = ("provider", "provider")
    else:
        completion, source = count_completion(model, [texts], len(texts))
        prompt, prompt_source = count_prompt(model, [{"role": "user", "content": "crash me"}])
        want, want_sources = (prompt, completion), (prompt_source, source)
        if status == "interrupted":
            tally.interrupted_counted[source] = tally.interrupted_counted.get(source, 0) + 1
            if row["cost"] is None:
                tally.interrupted_without_cost += 1
    if status == "completed" and sources[1] != "provider":
        fail("completed request without the provider's usage", request_id=str(rid))
    if got[:2] != want or sources != want_sources or not same(got[2], expected_cost(model, *want)):
        fail("token counts or cost do not follow from the stored tokens", request_id=str(rid),
             status=status, model=model, stored=list(got), sources=list(sources),
             expected=[*want, expected_cost(model, *want)], tokens=len(texts))  # fmt: skip


def check_spend(
    tally: SpendTally,
    env: dict[str, str],
    database_url: str,
    keys: list[Key],
    sent: dict[uuid.UUID, tuple[str, int | None]],
    fail: Any,
) -> None:
    """Per key and per team: `llmsvc spend`, the budgets' query and the rows' sum agree,
    and every request a client got back is counted once, under its key."""
    store = read_store(database_url)
    rows = list(store.requests.values())
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two CLI starts side by side
        spending = {by: pool.submit(_cli_json, env, "spend", "--by", by) for by in ("key", "team")}
        spent = {by: future.result() for by, future in spending.items()}
    for by, column in (("key", "key_id"), ("team", "team_id")):
        printed = {uuid.UUID(r["group"]): r for r in spent[by]}
        owners = {getattr(key, "id" if by == "key" else "team_id") for key in keys} - {None}
        if set(printed) != {r[column] for r in rows}:  # an owner without requests has no group
            fail(f"spend --by {by} groups are not the {by}s with requests",
                 printed=sorted(map(str, printed)))  # fmt: skip
        budgeted = run_async(functools.partial(_budget_spend, database_url, by, owners))
        figures = {}
        for owner in owners:
            mine = [r for r in rows if r[column] == owner]
            summed = {
                "requests": len(mine),
                "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in mine),
                "completion_tokens": sum(r["completion_tokens"] or 0 for r in mine),
                "cost": sum(r["cost"] for r in mine if r["cost"] is not None),
            }
            got = printed.get(owner, NOTHING)
            if any(got.get(k) != summed[k] for k in ("requests", "prompt_tokens",
                                                     "completion_tokens")) or not same(
                got.get("cost") or 0.0, summed["cost"]
            ):  # fmt: skip
                fail(f"spend --by {by} differs from the sum over its rows", owner=str(owner),
                     printed=got, summed=summed)  # fmt: skip
            if not same(budgeted[owner], summed["cost"]):
                fail(f"the budget's spend of a {by} differs from the sum over its rows",
                     owner=str(owner), budget=budgeted[owner], summed=summed["cost"])  # fmt: skip
            figures[str(owner)] = summed
        tally.groups[by] = figures
    stored_ids = {r["id"] for r in rows}
    counted = sum(f["requests"] for f in tally.groups["key"].values())
    if counted != len(stored_ids):
        fail("requests counted under keys differ from the stored requests",
             counted=counted, stored=len(stored_ids))  # fmt: skip
    if missing := [str(rid) for rid in sent if rid not in stored_ids]:
        fail("requests a client got back are not stored", request_ids=missing[:20])


async def _budget_spend(
    database_url: str, by: str, owners: set[uuid.UUID]
) -> dict[uuid.UUID, float]:
    """Each owner's spend as the limiter reads it for a budget (`spend_since`)."""
    engine = create_engine(database_url)
    try:
        return {owner: await spend_since(engine, by, owner, EVER) for owner in owners}
    finally:
        await engine.dispose()
