"""The APIs a request came in by, conversations a client can continue, and sessions.

`llm_requests.api` says which API a request came in by (`chat`, `responses`,
`messages`, `embeddings`); rows from before are chat completions (NULL).
`deleted_at` is set when a client deletes a response: it can no longer be
retrieved or continued, and its rows stay for the audit until retention
prunes them. `llm_sessions` holds the sessions clients create; a session's
messages are those of the requests that name it (`llm_requests.session_id`),
found by the new index.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("llm_requests", sa.Column("api", sa.String(16)))
    op.add_column("llm_requests", sa.Column("deleted_at", Timestamp))
    op.create_index("ix_llm_requests_session_created", "llm_requests", ["session_id", "created_at"])
    op.create_table(
        "llm_sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.Uuid),
        sa.Column("metadata", Json),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("expires_at", Timestamp),
    )
    op.create_index("ix_llm_sessions_expires_at", "llm_sessions", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_llm_sessions_expires_at", "llm_sessions")
    op.drop_table("llm_sessions")
    op.drop_index("ix_llm_requests_session_created", "llm_requests")
    with op.batch_alter_table("llm_requests") as batch:
        batch.drop_column("deleted_at")
        batch.drop_column("api")
