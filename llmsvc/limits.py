"""Rate limits and budgets per key and per team, decided in memory, shared through the store.

A request is admitted or refused (429) from local state alone: token buckets
for requests and tokens per minute, and each period's spend. Every
SHARE_SECONDS the other instances' use is read from the requests they stored
(`llm_requests`, by key and team) and taken from the local buckets, so each
instance's buckets follow the one bucket all of them share; the error is what
the others admitted within one refresh and their flush. While no key or team
known here has a rate or a budget (or with `auth = "none"`) nothing is read;
the first one that does starts the reading again from the last minute's use.
Tokens are known only at a request's end and are charged then; a bucket may
go below zero, and the next request waits until it refills. Spend is the store's sum of `cost` for
the period plus what this instance journaled and has not yet stored.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.callers import Caller, Limits
from llmsvc.errors import BudgetExceeded, RateLimited
from llmsvc.follow import every
from llmsvc.logs import logger
from llmsvc.store.queries import spend_since, usage_since

log = logger(__name__)

SHARE_SECONDS = 0.2  # how often the other instances' use is read from the store
SPEND_SECONDS = 1.0  # and the period's spend
REBASE_SECONDS = 60.0  # the window of stored rows read is moved on this often
WINDOW_SECONDS = 120.0  # rows older than this at a rebase are not read again

Scope = tuple[str, uuid.UUID]  # ("key" | "team", id)


@dataclass(slots=True)
class Bucket:
    """A token bucket: `capacity` at most, refilled at `rate` a second; may go below zero."""

    capacity: float
    rate: float
    level: float
    at: float

    def refill(self, now: float) -> float:
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now
        return self.level

    def wait(self, need: float) -> float:
        """Seconds until `need` is in the bucket."""
        return max(0.0, (need - self.level) / self.rate)


@dataclass(slots=True)
class Spend:
    stored: float = 0.0  # the store's sum for the period, as last read
    pending: list[tuple[int, float]] = field(default_factory=list)  # (lsn, cost) not yet stored
    period_start: datetime | None = None

    def total(self) -> float:
        return self.stored + sum(cost for _, cost in self.pending)


def period_start(period: str, now: datetime) -> datetime:
    """The start, in UTC, of the day, week (Monday) or month `now` is in."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    return day


def duration(seconds: float) -> str:
    """A duration as OpenAI writes `x-ratelimit-reset-*`: `120ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest}s"


class Limiter:
    def __init__(
        self,
        engine: AsyncEngine | None,
        instance_id: uuid.UUID,
        flushed: Callable[[], int] = lambda: 0,
        known: Callable[[], bool] = lambda: False,
    ) -> None:
        self.engine = engine  # None: no store to share through (a gateway alone, in tests)
        self.instance_id = instance_id
        self.flushed = flushed  # the flusher's checkpoint: pending spend at or below it is stored
        self.known = known  # whether the key table holds a key or team with a rate or budget
        self.buckets: dict[tuple[Scope, str], Bucket] = {}
        self.limits: dict[Scope, Limits] = {}
        self.spend: dict[Scope, Spend] = {}
        # The others' rows read are those created since `base`: at first the last minute's,
        # so a new instance starts from what the others used.
        self.base = datetime.now(UTC) - timedelta(seconds=60)
        self.seen: dict[Scope, tuple[int, int]] = {}  # their (requests, tokens) since `base`
        self.rebased = time.monotonic()
        # What the others used, by the time it was read, for a minute: a bucket made here
        # later starts from it, not full.
        self.others: dict[tuple[Scope, str], deque[tuple[float, int]]] = {}

    def admit(self, caller: Caller) -> list[tuple[bytes, bytes]]:
        """Take one request from every bucket of the caller, or raise RateLimited (nothing taken)
        or BudgetExceeded; returns the `x-ratelimit-*` headers for the response."""
        now = time.monotonic()
        scopes = self._scopes(caller)
        for scope, limits in scopes:
            spend = self.spend.get(scope)
            if limits.budget is not None and spend is not None and spend.total() >= limits.budget:
                raise BudgetExceeded(
                    f"the {scope[0]}'s budget of {limits.budget:g} a {limits.budget_period} "
                    f"is spent ({spend.total():.6f}); it renews at the next period (UTC)",
                    kind="insufficient_quota",
                    headers=[],
                )
        for scope, limits in scopes:
            for kind, need in (("requests", 1.0), ("tokens", 1e-9)):
                bucket = self._bucket(scope, limits, kind, now)
                if bucket is not None and bucket.refill(now) < need:
                    wait = bucket.wait(need)
                    raise RateLimited(
                        f"rate limit reached for the {scope[0]} ({kind} per minute); "
                        f"retry in {duration(wait)}",
                        kind=kind,
                        headers=[
                            (b"retry-after", str(max(1, round(wait + 0.5))).encode()),
                            *self._headers(scopes, now),
                        ],
                    )
        for scope, limits in scopes:
            bucket = self._bucket(scope, limits, "requests", now)
            if bucket is not None:
                bucket.level -= 1
        return self._headers(scopes, now)

    def charge(self, caller: Caller, tokens: int, cost: float | None, lsn: int | None) -> None:
        """A request ended: its tokens leave the token buckets, its cost joins the spend."""
        now = time.monotonic()
        for scope, limits in self._scopes(caller):
            bucket = self._bucket(scope, limits, "tokens", now)
            if bucket is not None:
                bucket.refill(now)
                bucket.level -= tokens
            if cost and lsn is not None and limits.budget is not None:
                self.spend.setdefault(scope, Spend()).pending.append((lsn, cost))

    def _scopes(self, caller: Caller) -> list[tuple[Scope, Limits]]:
        scopes = [(("key", caller.key_id), caller.key_limits)]
        if caller.team_id is not None:
            scopes.append((("team", caller.team_id), caller.team_limits))
        for scope, limits in scopes:
            self.limits[scope] = limits
        return scopes

    def _bucket(self, scope: Scope, limits: Limits, kind: str, now: float) -> Bucket | None:
        rate, burst = (
            (limits.rpm, limits.rpm_burst)
            if kind == "requests"
            else (
                limits.tpm,
                limits.tpm_burst,
            )
        )
        if rate is None:
            return None
        capacity = float(burst or rate)
        bucket = self.buckets.get((scope, kind))
        if bucket is None:
            bucket = self.buckets[(scope, kind)] = self._new_bucket(
                scope, kind, capacity, rate, now
            )
        elif bucket.capacity != capacity or bucket.rate != rate / 60:  # limits changed
            bucket.capacity, bucket.rate = capacity, rate / 60
        return bucket

    def _new_bucket(
        self, scope: Scope, kind: str, capacity: float, rate: int, now: float
    ) -> Bucket:
        """Full a minute ago, less what the other instances used since (as it was read)."""
        bucket = Bucket(capacity, rate / 60, capacity, now - 60)
        for at, used in self.others.get((scope, kind), ()):
            bucket.refill(at)
            bucket.level -= used
        bucket.refill(now)
        return bucket

    def _headers(self, scopes: list[tuple[Scope, Limits]], now: float) -> list[tuple[bytes, bytes]]:
        """OpenAI's six headers, for the key's limit of each kind, else its team's."""
        headers: list[tuple[bytes, bytes]] = []
        for kind in ("requests", "tokens"):
            for scope, limits in scopes:
                bucket = self._bucket(scope, limits, kind, now)
                if bucket is None:
                    continue
                limit = int(bucket.rate * 60)
                remaining = max(0, int(bucket.refill(now)))
                reset = (bucket.capacity - bucket.level) / bucket.rate
                headers += [
                    (f"x-ratelimit-limit-{kind}".encode(), str(limit).encode()),
                    (f"x-ratelimit-remaining-{kind}".encode(), str(remaining).encode()),
                    (f"x-ratelimit-reset-{kind}".encode(), duration(reset).encode()),
                ]
                break
        return headers

    def limited(self) -> bool:
        """Whether any caller known here has a rate or a budget: else there is nothing to share."""
        return self.known() or any(
            limits.rpm is not None or limits.tpm is not None or limits.budget is not None
            for limits in self.limits.values()
        )

    async def share(self) -> None:
        """Take from the local buckets what the other instances admitted since the last read."""
        if self.engine is None:
            return
        if not self.limited():
            # Idle: when a limited caller comes, read again from the last minute's use,
            # as at the start (the counts since an old `base` would be taken twice).
            self.base = datetime.now(UTC) - timedelta(seconds=60)
            self.seen = {}
            self.rebased = time.monotonic()
            return
        if time.monotonic() - self.rebased >= REBASE_SECONDS:  # keep the rows read few
            self.base = datetime.now(UTC) - timedelta(seconds=WINDOW_SECONDS)
            self.seen = await usage_since(self.engine, self.instance_id, self.base)
            self.rebased = time.monotonic()
            return
        used = await usage_since(self.engine, self.instance_id, self.base)
        now = time.monotonic()
        for history in self.others.values():
            while history and history[0][0] < now - 60:
                history.popleft()
        for scope, (requests, tokens) in used.items():
            before = self.seen.get(scope, (0, 0))
            for kind, more in (("requests", requests - before[0]), ("tokens", tokens - before[1])):
                if more <= 0:
                    continue
                self.others.setdefault((scope, kind), deque()).append((now, more))
                bucket = self.buckets.get((scope, kind))
                if bucket is not None:
                    bucket.refill(now)
                    bucket.level -= more
        self.seen = used

    async def read_spend(self) -> None:
        """The period's stored spend of every caller with a budget seen here."""
        if self.engine is None:
            return
        now = datetime.now(UTC)
        for scope, limits in list(self.limits.items()):
            if limits.budget is None or limits.budget_period is None:
                continue
            spend = self.spend.setdefault(scope, Spend())
            start = period_start(limits.budget_period, now)
            flushed = self.flushed()  # before the read: what it covers is stored at least
            spend.stored = await spend_since(self.engine, scope[0], scope[1], start)
            spend.pending = [(lsn, c) for lsn, c in spend.pending if lsn > flushed]
            spend.period_start = start

    async def follow(self, stopping: asyncio.Event) -> None:
        """Share every SHARE_SECONDS and read spend every SPEND_SECONDS until `stopping`."""
        last_spend = 0.0

        async def read() -> None:
            nonlocal last_spend
            await self.share()
            if time.monotonic() - last_spend >= SPEND_SECONDS:
                last_spend = time.monotonic()
                await self.read_spend()

        await every(SHARE_SECONDS, stopping, read, "rate-limit use")
