"""Table definitions as the code sees them; Alembic migrations create and change them.

Keep this file and the newest migration in step: `tests/store/test_schema.py`
compares them on SQLite and PostgreSQL.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

metadata = sa.MetaData()

Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Timestamp = sa.DateTime(timezone=True)

llm_requests = sa.Table(
    "llm_requests",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("instance_id", sa.Uuid, nullable=False),
    # The client's X-Correlation-ID as sent, or the id made for it (migration 0007: was a UUID).
    sa.Column("correlation_id", sa.String(128), nullable=False),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("stream", sa.Boolean, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("messages", Json, nullable=False),
    sa.Column("params", Json, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("ended_at", Timestamp),
    sa.Column("prompt_tokens", sa.Integer),
    sa.Column("completion_tokens", sa.Integer),
    sa.Column("cost", sa.Float),
    sa.Column("provider", sa.String(100)),
    sa.Column("error", sa.Text),
    # Who sent it (migration 0006): the caller's key and team, the OpenAI `user`, the client's
    # metadata and session, and the deployment that served it.
    sa.Column("key_id", sa.Uuid),
    sa.Column("team_id", sa.Uuid),
    sa.Column("end_user", sa.String(256)),
    sa.Column("metadata", Json),
    sa.Column("session_id", sa.String(200)),
    sa.Column("environment", sa.String(100)),
    sa.Column("version", sa.String(100)),
    # How prompt_tokens / completion_tokens were obtained: `provider` (its usage),
    # `tokenizer` (counted by llmsvc from the text), `estimate` (a prompt to a model without a
    # vocabulary here, counted with OpenAI's newest) or `deltas` (one per delta).
    sa.Column("prompt_tokens_source", sa.String(16)),
    sa.Column("completion_tokens_source", sa.String(16)),
    # The API it came in by (migration 0008): chat, responses, messages or embeddings; NULL
    # in rows from before, all chat completions. `deleted_at`: a client deleted the response.
    sa.Column("api", sa.String(16)),
    sa.Column("deleted_at", Timestamp),
)


def _limits() -> list[sa.Column[Any]]:
    """A key's or team's limits: per-minute rates with their bursts, and a budget per period."""
    return [
        sa.Column("rpm", sa.Integer),
        sa.Column("rpm_burst", sa.Integer),
        sa.Column("tpm", sa.Integer),
        sa.Column("tpm_burst", sa.Integer),
        sa.Column("budget", sa.Float),
        sa.Column("budget_period", sa.String(8)),  # day, week or month
    ]


teams = sa.Table(
    "teams",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("name", sa.String(100), nullable=False, unique=True),
    *_limits(),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
)

# A caller's key: only the SHA-256 of its secret is kept; `prefix` is the secret's first
# characters, shown so an operator can tell keys apart. `updated_at` moves on every change,
# so instances follow revocations and rotations by reading the rows changed since last time.
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("team_id", sa.Uuid, sa.ForeignKey("teams.id")),
    sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("prefix", sa.String(24), nullable=False),
    *_limits(),
    sa.Column("models", Json),  # the models it may use; NULL: all
    sa.Column("expires_at", Timestamp),
    sa.Column("revoked_at", Timestamp),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
)

llm_attempts = sa.Table(
    "llm_attempts",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("request_id", sa.Uuid, sa.ForeignKey("llm_requests.id"), nullable=False),
    sa.Column("attempt_no", sa.Integer, nullable=False),
    sa.Column("provider", sa.String(100), nullable=False),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("started_at", Timestamp, nullable=False),
    sa.Column("first_token_at", Timestamp),
    sa.Column("ended_at", Timestamp),
    sa.Column("http_status", sa.Integer),
    sa.Column("error_code", sa.String(100)),
    sa.Column("error_message", sa.Text),
    sa.Column("prompt_tokens", sa.Integer),
    sa.Column("completion_tokens", sa.Integer),
    sa.Column("token_count", sa.Integer),
    sa.Column("finish_reason", sa.String(64)),  # one of OpenAI's, as the client was told
    sa.Column("stop_reason", sa.String(64)),  # the upstream's own word (migration 0011)
)

# On PostgreSQL this table is range-partitioned by `created_at`, one partition a day
# (migration 0003), and its primary key adds `created_at`, as partitioning demands;
# the rows of one (attempt_id, seq) are still written once, with the WAL record's time.
llm_token_log = sa.Table(
    "llm_token_log",
    metadata,
    sa.Column("attempt_id", sa.Uuid, primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
)

# Tool calls as they were streamed: one row per delta, in a seq space of their own per
# attempt; a call is its rows of one `index`, `arguments` concatenated in seq order.
llm_tool_calls = sa.Table(
    "llm_tool_calls",
    metadata,
    sa.Column("attempt_id", sa.Uuid, primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("call_index", sa.Integer, nullable=False),
    sa.Column("call_id", sa.Text),
    sa.Column("name", sa.Text),
    sa.Column("arguments", sa.Text, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
)

# Records the database refused as journaled (migration 0005), kept whole: `outcome` says
# whether the record was stored in a form the database takes (`sanitised`) or not at
# all (`set_aside`). `llmsvc check` reports them until an operator acknowledges them.
llm_dead_letters = sa.Table(
    "llm_dead_letters",
    metadata,
    sa.Column("instance_id", sa.Uuid, primary_key=True),
    sa.Column("lsn", sa.BigInteger, primary_key=True),
    sa.Column("record_type", sa.String(32), nullable=False),
    sa.Column("request_id", sa.Uuid),
    sa.Column("attempt_id", sa.Uuid),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("acknowledged_at", Timestamp),
)

# Sessions clients create (migration 0008); a session's messages are those of the requests
# naming it in `llm_requests.session_id`. `key_id`: the key that created it, the only one
# that may use it (NULL without keys). Expired sessions are pruned by the scheduler.
llm_sessions = sa.Table(
    "llm_sessions",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("key_id", sa.Uuid),
    sa.Column("metadata", Json),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("expires_at", Timestamp),
)

# Console sessions ended by logging out (migration 0010): the SHA-256 of the cookie's nonce,
# never the cookie, until the cookie would have expired anyway; every worker refuses them.
console_logouts = sa.Table(
    "console_logouts",
    metadata,
    sa.Column("nonce_hash", sa.String(64), primary_key=True),
    sa.Column("expires_at", Timestamp, nullable=False),
)

provider_status = sa.Table(
    "provider_status",
    metadata,
    sa.Column("provider", sa.String(100), primary_key=True),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("circuit_state", sa.String(16), nullable=False),
    sa.Column("failure_count", sa.Integer, nullable=False),
    sa.Column("last_error", sa.Text),
    sa.Column("updated_at", Timestamp, nullable=False),
)

wal_checkpoints = sa.Table(
    "wal_checkpoints",
    metadata,
    sa.Column("instance_id", sa.Uuid, primary_key=True),
    sa.Column("lsn", sa.BigInteger, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
)

maintenance_runs = sa.Table(
    "maintenance_runs",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("job", sa.String(50), nullable=False),
    sa.Column("instance_id", sa.Uuid),
    sa.Column("started_at", Timestamp, nullable=False),
    sa.Column("finished_at", Timestamp, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("found", Json, nullable=False),
    sa.Column("repaired", Json, nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("slot_at", Timestamp),  # the scheduled time this run was for; NULL when run by hand
    sa.Column("rows_affected", sa.BigInteger),
    sa.Column("bytes_affected", sa.BigInteger),
)

# One row per scheduled run of a job, claimed by the instance that runs it: with
# several daemons on one database each slot runs once (INSERT … ON CONFLICT DO NOTHING).
maintenance_slots = sa.Table(
    "maintenance_slots",
    metadata,
    sa.Column("job", sa.String(50), primary_key=True),
    sa.Column("slot_at", Timestamp, primary_key=True),
    sa.Column("instance_id", sa.Uuid, nullable=False),
    sa.Column("claimed_at", Timestamp, nullable=False),
)

sa.Index("ix_llm_requests_created_id", llm_requests.c.created_at, llm_requests.c.id)
sa.Index("ix_llm_requests_status", llm_requests.c.status)
sa.Index("ix_llm_requests_correlation_id", llm_requests.c.correlation_id)
sa.Index("ix_llm_requests_model_created", llm_requests.c.model, llm_requests.c.created_at)
sa.Index("ix_llm_requests_user_created", llm_requests.c.end_user, llm_requests.c.created_at)
# PostgreSQL only (migration 0009): what the metadata filter's containment test uses.
sa.Index(
    "ix_llm_requests_metadata",
    llm_requests.c["metadata"],
    postgresql_using="gin",
    postgresql_ops={"metadata": "jsonb_path_ops"},
).ddl_if(dialect="postgresql")
sa.Index("ix_llm_requests_key_created", llm_requests.c.key_id, llm_requests.c.created_at)
sa.Index("ix_llm_requests_team_created", llm_requests.c.team_id, llm_requests.c.created_at)
sa.Index("ix_llm_requests_session_created", llm_requests.c.session_id, llm_requests.c.created_at)
sa.Index("ix_llm_sessions_expires_at", llm_sessions.c.expires_at)
sa.Index("ix_console_logouts_expires_at", console_logouts.c.expires_at)
sa.Index("ix_api_keys_updated_at", api_keys.c.updated_at)
sa.Index("ix_llm_attempts_request_id", llm_attempts.c.request_id)
sa.Index("ix_llm_attempts_provider_request", llm_attempts.c.provider, llm_attempts.c.request_id)
sa.Index("ix_maintenance_runs_job_started", maintenance_runs.c.job, maintenance_runs.c.started_at)
