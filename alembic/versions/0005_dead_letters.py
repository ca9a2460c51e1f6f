"""llm_dead_letters: records the database refused, kept whole; tool-call ids and names as text.

A record the database refuses (a value past a column's range, a character it
cannot store) is stored in a form it takes, or set aside here, so one record
never holds back the ones after it. Tool-call ids and names come from
upstreams unchecked, so they lose their 200-character limit (a catalogue-only
change on PostgreSQL, no table rewrite).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "llm_dead_letters",
        sa.Column("instance_id", sa.Uuid, primary_key=True),
        sa.Column("lsn", sa.BigInteger, primary_key=True),
        sa.Column("record_type", sa.String(32), nullable=False),
        sa.Column("request_id", sa.Uuid),
        sa.Column("attempt_id", sa.Uuid),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True)),
    )
    with op.batch_alter_table("llm_tool_calls") as batch:
        batch.alter_column("call_id", type_=sa.Text, existing_type=sa.String(200))
        batch.alter_column("name", type_=sa.Text, existing_type=sa.String(200))


def downgrade() -> None:
    with op.batch_alter_table("llm_tool_calls") as batch:
        batch.alter_column("name", type_=sa.String(200), existing_type=sa.Text)
        batch.alter_column("call_id", type_=sa.String(200), existing_type=sa.Text)
    op.drop_table("llm_dead_letters")
