"""llm_tool_calls: tool-call deltas as they were streamed, one row each.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "llm_tool_calls",
        sa.Column("attempt_id", sa.Uuid, primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("call_index", sa.Integer, nullable=False),
        sa.Column("call_id", sa.String(200)),
        sa.Column("name", sa.String(200)),
        sa.Column("arguments", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("llm_tool_calls")
