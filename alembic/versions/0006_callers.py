"""Callers: API keys and teams, and who sent each request.

Keys are stored by the SHA-256 of their secret only (a secret has 128+ random
bits, so a slow hash buys nothing). A request row records its key, team, end
user, client metadata, session and the deployment that served it, and how its
token counts were obtained (the provider's usage, a tokenizer, or the deltas).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Timestamp = sa.DateTime(timezone=True)


def _limits() -> list[sa.Column]:  # type: ignore[type-arg]
    return [
        sa.Column("rpm", sa.Integer),
        sa.Column("rpm_burst", sa.Integer),
        sa.Column("tpm", sa.Integer),
        sa.Column("tpm_burst", sa.Integer),
        sa.Column("budget", sa.Float),
        sa.Column("budget_period", sa.String(8)),
    ]


def upgrade() -> None:
    op.create_table(
        "teams",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("name", sa.String(100), nullable=False, unique=True),
        *_limits(),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("team_id", sa.Uuid, sa.ForeignKey("teams.id")),
        sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(24), nullable=False),
        *_limits(),
        sa.Column("models", Json),
        sa.Column("expires_at", Timestamp),
        sa.Column("revoked_at", Timestamp),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
    )
    op.create_index("ix_api_keys_updated_at", "api_keys", ["updated_at"])
    for column in (
        sa.Column("key_id", sa.Uuid),
        sa.Column("team_id", sa.Uuid),
        sa.Column("end_user", sa.String(256)),
        sa.Column("metadata", Json),
        sa.Column("session_id", sa.String(200)),
        sa.Column("environment", sa.String(100)),
        sa.Column("version", sa.String(100)),
        sa.Column("prompt_tokens_source", sa.String(16)),
        sa.Column("completion_tokens_source", sa.String(16)),
    ):
        op.add_column("llm_requests", column)
    op.create_index("ix_llm_requests_key_created", "llm_requests", ["key_id", "created_at"])
    op.create_index("ix_llm_requests_team_created", "llm_requests", ["team_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_llm_requests_team_created", "llm_requests")
    op.drop_index("ix_llm_requests_key_created", "llm_requests")
    with op.batch_alter_table("llm_requests") as batch:
        for name in (
            "completion_tokens_source",
            "prompt_tokens_source",
            "version",
            "environment",
            "session_id",
            "metadata",
            "end_user",
            "team_id",
            "key_id",
        ):
            batch.drop_column(name)
    op.drop_index("ix_api_keys_updated_at", "api_keys")
    op.drop_table("api_keys")
    op.drop_table("teams")
