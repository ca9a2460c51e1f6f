"""What a restore keeps of the store it replaces: provider switches, keys and teams.

They are operational state, not data: a provider enabled since the backup
must stay enabled, and a key revoked or rotated since must not come back to
life. The rows in force are read before the restore and written back over
the backup's right after it, before requests resume; rows only the backup has
stay (the store being replaced may have lost them). What the backup held
otherwise is reported, so an operator sees what a plain restore would have
changed.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from llmsvc.store.engine import describe_error
from llmsvc.store.schema import api_keys, provider_status, teams

log = logging.getLogger(__name__)

KEPT = (teams, api_keys, provider_status)  # teams before the keys that name them

Rows = dict[str, dict[Any, dict[str, Any]]]  # table -> primary key -> row


async def read(engine: AsyncEngine) -> Rows | str:
    """The rows in force now; a store that cannot be read (why restore it?) gives the reason."""
    try:
        async with engine.connect() as conn:
            return await _rows(conn)
    except (sa.exc.SQLAlchemyError, OSError) as exc:
        reason = describe_error(exc)
        log.warning(
            "restore: the provider switches, keys and teams in force could not be read, so "
            "the backup's will be: %s",
            reason,
        )
        return reason


async def write_back(engine: AsyncEngine, kept: Rows | str) -> dict[str, Any]:
    """Put the rows read before the restore back over the backup's; say what differed."""
    if isinstance(kept, str):
        return {
            "kept": f"nothing: the store could not be read before the restore ({kept}); "
            "the backup's provider switches, keys and teams are in force, review them"
        }
    async with engine.begin() as conn:
        restored = await _rows(conn)
        dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
        for table in KEPT:
            rows = list(kept[table.name].values())
            if not rows:
                continue
            (key,) = table.primary_key.columns
            stmt = dialect.insert(table)
            stmt = stmt.on_conflict_do_update(
                index_elements=[key],
                set_={c.name: stmt.excluded[c.name] for c in table.columns if c is not key},
            )
            await conn.execute(stmt, rows)
    differed = _differences(kept, restored)
    if differed:
        log.info(
            "restore: kept the provider switches, keys and teams in force; the backup had %s",
            ", ".join(f"{what} {how}" for what, how in differed.items()),
        )
    found: dict[str, Any] = {
        "kept": "the provider switches, keys and teams in force before the restore"
    }
    if differed:
        found["backup_had"] = differed
    return found


async def _rows(conn: AsyncConnection) -> Rows:
    found: Rows = {}
    for table in KEPT:
        (key,) = table.primary_key.columns
        rows = await conn.execute(sa.select(table))
        found[table.name] = {row._mapping[key.name]: dict(row._mapping) for row in rows}
    return found


def _differences(kept: Rows, restored: Rows) -> dict[str, str]:
    """What the backup said otherwise, in words: `{"provider openai": "disabled", ...}`."""
    differed: dict[str, str] = {}
    for name, row in kept["provider_status"].items():
        before = restored["provider_status"].get(name)
        if before is None or before["enabled"] != row["enabled"]:
            differed[f"provider {name}"] = (
                "no switch" if before is None else "enabled" if before["enabled"] else "disabled"
            )
    for key_id, row in kept["api_keys"].items():
        before = restored["api_keys"].get(key_id)
        label = f"key {row['name']} ({key_id})"
        if before is None:
            differed[label] = "no such key (created since)"
        elif row["revoked_at"] is not None and before["revoked_at"] is None:
            differed[label] = "not revoked (revoked since)"
        elif row["secret_hash"] != before["secret_hash"]:
            differed[label] = "its old secret (rotated since)"
        elif row != before:
            differed[label] = "other settings"
    for team_id, row in kept["teams"].items():
        before = restored["teams"].get(team_id)
        if before is None:
            differed[f"team {row['name']}"] = "no such team (created since)"
        elif row != before:
            differed[f"team {row['name']}"] = "other limits"
    return differed
