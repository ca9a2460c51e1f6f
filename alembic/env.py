"""Alembic environment: run by `llmsvc migrate`, the daemon at boot, or the `alembic` CLI.

The daemon passes its open connection in `config.attributes["connection"]`;
the `alembic` CLI instead connects with the URL from llmsvc's settings.
"""

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from llmsvc.store.schema import metadata


def run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


async def run_from_settings() -> None:
    from llmsvc.config import load_settings
    from llmsvc.store.engine import create_engine

    engine = create_engine(load_settings().database_url)
    async with engine.begin() as conn:
        await conn.run_sync(run)
    await engine.dispose()


connection = context.config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    asyncio.run(run_from_settings())
