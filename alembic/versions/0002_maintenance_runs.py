"""maintenance_runs: every consistency check (and later every scheduled job), with what it found.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "maintenance_runs",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("job", sa.String(50), nullable=False),
        sa.Column("instance_id", sa.Uuid),
        sa.Column("started_at", Timestamp, nullable=False),
        sa.Column("finished_at", Timestamp, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("found", Json, nullable=False),
        sa.Column("repaired", Json, nullable=False),
        sa.Column("error", sa.Text),
    )
    op.create_index("ix_maintenance_runs_job_started", "maintenance_runs", ["job", "started_at"])


def downgrade() -> None:
    op.drop_table("maintenance_runs")
