"""The PostgreSQL client tools (pg_dump, pg_restore, psql): found, started, checked.

The newest installed server version's tool is preferred, since it can dump
older servers too. A tool pointed at the store gets its password in its
environment, never on its command line, and inherits no other `PG*` variable.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.errors import BackupError


def pg_tool(name: str) -> str:
    """The newest installed server version's tool (it can dump older servers), else PATH's."""
    versions = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    if versions:
        return max(versions, key=lambda p: int(Path(p).parts[-3]))
    found = shutil.which(name)
    if found is None:
        raise BackupError(f"{name} not found: install the PostgreSQL client tools")
    return found


async def run(tool: str, engine: AsyncEngine | None, *args: str) -> str:
    """Run a PostgreSQL tool to its end; its output, or BackupError with its last message."""
    proc = await start(tool, engine, *args)
    out, err = await proc.communicate()
    check_exit(tool, proc, err)
    return out.decode(errors="replace")


async def start(
    tool: str, engine: AsyncEngine | None, *args: str, stdin: int = asyncio.subprocess.DEVNULL
) -> asyncio.subprocess.Process:
    """Start a PostgreSQL tool, pointed at the store if given; the password only in its env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    argv = [pg_tool(tool), *args]
    if engine is not None:
        url = engine.url
        if url.password:
            env["PGPASSWORD"] = str(url.password)
        argv += [f"--dbname={url.database}", f"--host={url.host or 'localhost'}"]
        argv += [f"--port={url.port or 5432}", f"--username={url.username or 'postgres'}"]
        argv.append("--no-password")
    return await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


def check_exit(tool: str, proc: asyncio.subprocess.Process, err: bytes) -> None:
    """BackupError with the tool's last message, unless it exited 0."""
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines() or ["(no message)"]
        raise BackupError(f"{tool} exited {proc.returncode}: {lines[-1]}")
