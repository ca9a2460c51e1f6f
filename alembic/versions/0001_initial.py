"""The first schema: requests, attempts, the token log, provider status, WAL checkpoints.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "llm_requests",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("instance_id", sa.Uuid, nullable=False),
        sa.Column("correlation_id", sa.Uuid, nullable=False),
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
    )
    op.create_index("ix_llm_requests_created_at", "llm_requests", ["created_at"])
    op.create_index("ix_llm_requests_status", "llm_requests", ["status"])
    op.create_table(
        "llm_attempts",
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
    )
    op.create_index("ix_llm_attempts_request_id", "llm_attempts", ["request_id"])
    op.create_table(
        "llm_token_log",
        sa.Column("attempt_id", sa.Uuid, primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
    )
    op.create_table(
        "provider_status",
        sa.Column("provider", sa.String(100), primary_key=True),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("circuit_state", sa.String(16), nullable=False),
        sa.Column("failure_count", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("updated_at", Timestamp, nullable=False),
    )
    op.create_table(
        "wal_checkpoints",
        sa.Column("instance_id", sa.Uuid, primary_key=True),
        sa.Column("lsn", sa.BigInteger, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
    )


def downgrade() -> None:
    for table in ("wal_checkpoints", "provider_status", "llm_token_log", "llm_attempts"):
        op.drop_table(table)
    op.drop_table("llm_requests")
