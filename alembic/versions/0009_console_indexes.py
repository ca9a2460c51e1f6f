"""Indexes for the console's pages on a large store (issue 18: every page under 1 s).

Measured with benchmarks/bench_console.py on 1,000,000 requests and 50,000,000 token
rows (BENCHMARKS.md, "Console on a large store"); only what was slow there:

- a deep page of the request list (its keyset link) walked every newer row:
  `(created_at, id)`, which the list's row comparison starts at, replaces the index on
  created_at alone (it serves everything that one did);
- a filter on a model or a user that few requests have walked the whole table newest
  first: `(model, created_at)` and `(end_user, created_at)`;
- a provider that few attempts went to: the filter's EXISTS made PostgreSQL read every
  attempt; `llm_attempts (provider, request_id)` finds them;
- the same for a metadata pair (PostgreSQL only: a GIN index over `llm_requests.metadata`,
  which the filter's containment test uses; SQLite has no index for it);
- usage per day (PostgreSQL only): without statistics on the UTC date the planner took
  each row for a group of its own, sorted 1M rows on disk and compiled the plan (JIT);
  `llm_requests_usage_groups` tells it how many (date, model / key / team / user) groups
  there are, so it aggregates in a hash table instead: 30 days by model, 495 → 252 ms.

Building them locks `llm_requests` against writes (reads go on). On the 1M/50M store the
whole migration took 4.1 s (the ANALYZE included). A daemon migrates at boot, before it
serves; other instances on the same database keep serving (their records wait in their
WAL) while their flushers wait for the lock. CREATE INDEX CONCURRENTLY would spare them
those seconds, but it cannot run in the migration's transaction, which also holds the
lock that keeps several daemons from migrating at once, and a failed concurrent build
leaves an invalid index for an operator to find and drop. For a build of seconds the
plain lock is the simpler choice; a store a hundred times larger would want it
(a minute or more of writes held back), migrated by hand before the upgrade.

Revision ID: 0009
Revises: 0008
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# A request's UTC date exactly as llmsvc/store/attribution.py's usage query groups by it.
UTC_DATE = "to_char(timezone('UTC', created_at), 'YYYY-MM-DD')"


def upgrade() -> None:
    op.create_index("ix_llm_requests_created_id", "llm_requests", ["created_at", "id"])
    op.drop_index("ix_llm_requests_created_at", "llm_requests")
    op.create_index("ix_llm_requests_model_created", "llm_requests", ["model", "created_at"])
    op.create_index("ix_llm_requests_user_created", "llm_requests", ["end_user", "created_at"])
    op.create_index("ix_llm_attempts_provider_request", "llm_attempts", ["provider", "request_id"])
    if op.get_bind().dialect.name == "postgresql":
        op.create_index(
            "ix_llm_requests_metadata",
            "llm_requests",
            ["metadata"],
            postgresql_using="gin",
            postgresql_ops={"metadata": "jsonb_path_ops"},
        )
        op.execute(
            f"CREATE STATISTICS llm_requests_usage_groups (ndistinct) ON ({UTC_DATE}), "
            "model, key_id, team_id, end_user FROM llm_requests"
        )
        op.execute("ANALYZE llm_requests")  # extended statistics are made by ANALYZE


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP STATISTICS llm_requests_usage_groups")
        op.drop_index("ix_llm_requests_metadata", "llm_requests")
    op.drop_index("ix_llm_attempts_provider_request", "llm_attempts")
    op.drop_index("ix_llm_requests_user_created", "llm_requests")
    op.drop_index("ix_llm_requests_model_created", "llm_requests")
    op.create_index("ix_llm_requests_created_at", "llm_requests", ["created_at"])
    op.drop_index("ix_llm_requests_created_id", "llm_requests")
