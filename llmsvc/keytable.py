"""Callers' keys in memory: how a request is authenticated without a database round trip.

The table is loaded at boot from the copy beside the WAL (`llmsvc.local`),
then from the database, and followed every REFRESH_SECONDS by reading the
rows whose `updated_at` moved, so a revocation, rotation or team change made
through any instance is in force on every instance within 2 s. While the
database is away the last table read stays in force, and the local copy is
what a restart during the outage knows.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.callers import Caller, Limits
from llmsvc.errors import InvalidApiKey, ServiceUnavailable
from llmsvc.follow import every
from llmsvc.local import read_keys, write_keys
from llmsvc.logs import logger
from llmsvc.store.keys import LIMITS, changed_since, secret_hash, utc

log = logger(__name__)

REFRESH_SECONDS = 1.0  # a change made elsewhere is followed here within this plus one read
# Rows re-read on each refresh: a change committed late, or stamped by a host whose clock is
# behind, is still seen. Every FULL_EVERY refreshes the whole table is read, bounding a
# larger skew's delay to about a minute.
OVERLAP = timedelta(seconds=60)
FULL_EVERY = 60


@dataclass(frozen=True, slots=True)
class Entry:
    secret_hash: str
    caller: Caller
    revoked: bool
    expires: float | None  # Unix time


class KeyTable:
    def __init__(self, engine: AsyncEngine, wal_dir: Path) -> None:
        self.engine = engine
        self.wal_dir = wal_dir
        self.keys: dict[str, dict[str, Any]] = {}  # by id: each key's row, JSON-ready, no secret
        self.teams: dict[str, dict[str, Any]] = {}  # by id
        self.by_hash: dict[str, Entry] = {}
        self.seen: datetime | None = None  # the newest `updated_at` read
        self.reads = 0
        self.limited = False  # whether any key or team has a rate or a budget

    def load_local(self) -> None:
        """At boot, before the database answers: the keys as this instance last knew them."""
        stored = read_keys(self.wal_dir)
        self.keys = {k["id"]: k for k in stored.get("keys", [])}
        self.teams = {t["id"]: t for t in stored.get("teams", [])}
        self._index()
        log.info("boot: keys from the local copy", count=len(self.keys))

    def authenticate(self, headers: dict[bytes, bytes]) -> Caller:
        """The caller of a request's `Authorization: Bearer` or `x-api-key`; 401 otherwise.

        Looked up by the secret's SHA-256 and compared in constant time; the error never
        repeats what was sent.
        """
        given = headers.get(b"x-api-key")
        if given is None:
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer":
                given = b""
        secret = given.strip().decode("latin-1")
        if not secret:
            raise InvalidApiKey(
                "no API key: send it as Authorization: Bearer <key> (the openai SDK's "
                "api_key) or as x-api-key; `llmsvc keys create` makes one"
            )
        digest = secret_hash(secret)
        entry = self.by_hash.get(digest)
        if entry is None or not hmac.compare_digest(entry.secret_hash, digest):
            if self.reads == 0:  # not read yet: perhaps a key made since the last run
                raise ServiceUnavailable(
                    "llmsvc has not read its keys from the database since it started; "
                    "try again shortly"
                )
            raise InvalidApiKey("the API key is not known here (mistyped, or rotated)")
        if entry.revoked:
            raise InvalidApiKey(f"the API key {entry.caller.key_name!r} is revoked")
        if entry.expires is not None and entry.expires <= time.time():
            raise InvalidApiKey(f"the API key {entry.caller.key_name!r} has expired")
        return entry.caller

    async def read(self) -> None:
        """The rows changed since the last read (all of them at first and now and then)."""
        full = self.seen is None or self.reads % FULL_EVERY == 0
        found_teams, found_keys = await changed_since(
            self.engine, None if full or self.seen is None else self.seen - OVERLAP
        )
        self.reads += 1
        teams = {} if full else dict(self.teams)
        keys = {} if full else dict(self.keys)
        for row in found_teams:
            teams[str(row["id"])] = _team(row)
        for row in found_keys:
            keys[str(row["id"])] = _key(row)
        for row in (*found_teams, *found_keys):
            stamp = utc(row["updated_at"])
            if self.seen is None or (stamp is not None and stamp > self.seen):
                self.seen = stamp
        if (teams, keys) != (self.teams, self.keys):
            self.teams, self.keys = teams, keys
            self._index()
            write_keys(self.wal_dir, list(keys.values()), list(teams.values()))
            log.info("keys read", count=len(keys), teams=len(teams))

    async def follow(self, stopping: asyncio.Event) -> None:
        """Read every REFRESH_SECONDS until `stopping`; a failed read keeps the table as it is."""
        await every(REFRESH_SECONDS, stopping, self.read, "keys")

    def _index(self) -> None:
        index: dict[str, Entry] = {}
        for key in self.keys.values():
            team = self.teams.get(key["team_id"] or "")
            caller = Caller(
                key_id=uuid.UUID(key["id"]),
                key_name=key["name"],
                team_id=uuid.UUID(team["id"]) if team else None,
                team_name=team["name"] if team else None,
                models=frozenset(key["models"]) if key["models"] is not None else None,
                key_limits=_limits(key),
                team_limits=_limits(team) if team else Limits(),
            )
            index[key["secret_hash"]] = Entry(
                key["secret_hash"], caller, key["revoked"], key["expires"]
            )
        self.by_hash = index
        self.limited = any(
            limits.rpm is not None or limits.tpm is not None or limits.budget is not None
            for entry in index.values()
            for limits in (entry.caller.key_limits, entry.caller.team_limits)
        )


def _key(row: dict[str, Any]) -> dict[str, Any]:
    expires = utc(row["expires_at"])
    return {
        "id": str(row["id"]),
        "name": row["name"],
        "team_id": str(row["team_id"]) if row["team_id"] else None,
        "secret_hash": row["secret_hash"],
        "models": row["models"],
        "expires": expires.timestamp() if expires else None,
        "revoked": row["revoked_at"] is not None,
        **{name: row[name] for name in LIMITS},
    }


def _team(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": str(row["id"]), "name": row["name"], **{name: row[name] for name in LIMITS}}


def _limits(row: dict[str, Any]) -> Limits:
    return Limits(**{name: row[name] for name in LIMITS})
