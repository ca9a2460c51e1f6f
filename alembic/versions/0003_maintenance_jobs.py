"""Scheduled maintenance: slot claims, run figures, and a token log partitioned by day.

On PostgreSQL `llm_token_log` becomes range-partitioned on `created_at`, one
partition per UTC day plus a default partition, so retention drops whole days
instead of deleting rows. Existing rows are copied into the new table.

Revision ID: 0003
Revises: 0002
"""

from datetime import UTC, date, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime(timezone=True)
AHEAD_DAYS = 14  # the daemon keeps creating partitions ahead from here on


def upgrade() -> None:
    with op.batch_alter_table("maintenance_runs") as batch:
        batch.add_column(sa.Column("slot_at", Timestamp))
        batch.add_column(sa.Column("rows_affected", sa.BigInteger))
        batch.add_column(sa.Column("bytes_affected", sa.BigInteger))
    op.create_table(
        "maintenance_slots",
        sa.Column("job", sa.String(50), primary_key=True),
        sa.Column("slot_at", Timestamp, primary_key=True),
        sa.Column("instance_id", sa.Uuid, nullable=False),
        sa.Column("claimed_at", Timestamp, nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":
        _partition_token_log()


def _partition_token_log() -> None:
    conn = op.get_bind()
    op.execute("ALTER TABLE llm_token_log RENAME TO llm_token_log_unpartitioned")
    op.execute(
        "ALTER TABLE llm_token_log_unpartitioned "
        "RENAME CONSTRAINT llm_token_log_pkey TO llm_token_log_unpartitioned_pkey"
    )
    op.execute(
        """
        CREATE TABLE llm_token_log (
            attempt_id uuid NOT NULL,
            seq integer NOT NULL,
            text text NOT NULL,
            created_at timestamptz NOT NULL,
            CONSTRAINT llm_token_log_pkey PRIMARY KEY (attempt_id, seq, created_at)
        ) PARTITION BY RANGE (created_at)
        """
    )
    op.execute("CREATE TABLE llm_token_log_default PARTITION OF llm_token_log DEFAULT")
    oldest = conn.scalar(
        sa.text("SELECT min(created_at) FROM llm_token_log_unpartitioned")
    )  # timestamptz: aware
    today = datetime.now(UTC).date()
    first = min(oldest.astimezone(UTC).date(), today) if oldest else today
    day = first
    while day <= today + timedelta(days=AHEAD_DAYS):
        op.execute(_partition_ddl(day))
        day += timedelta(days=1)
    op.execute("INSERT INTO llm_token_log SELECT * FROM llm_token_log_unpartitioned")
    op.execute("DROP TABLE llm_token_log_unpartitioned")


def _partition_ddl(day: date) -> str:
    start, end = day.isoformat(), (day + timedelta(days=1)).isoformat()
    return (
        f"CREATE TABLE llm_token_log_p{day:%Y%m%d} PARTITION OF llm_token_log "
        f"FOR VALUES FROM ('{start} 00:00:00+00') TO ('{end} 00:00:00+00')"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE llm_token_log RENAME TO llm_token_log_partitioned")
        op.execute(
            "ALTER TABLE llm_token_log_partitioned "
            "RENAME CONSTRAINT llm_token_log_pkey TO llm_token_log_partitioned_pkey"
        )
        op.execute(
            """
            CREATE TABLE llm_token_log (
                attempt_id uuid NOT NULL,
                seq integer NOT NULL,
                text text NOT NULL,
                created_at timestamptz NOT NULL,
                CONSTRAINT llm_token_log_pkey PRIMARY KEY (attempt_id, seq)
            )
            """
        )
        op.execute(
            "INSERT INTO llm_token_log SELECT * FROM llm_token_log_partitioned "
            "ON CONFLICT DO NOTHING"
        )
        op.execute("DROP TABLE llm_token_log_partitioned CASCADE")
    op.drop_table("maintenance_slots")
    with op.batch_alter_table("maintenance_runs") as batch:
        batch.drop_column("bytes_affected")
        batch.drop_column("rows_affected")
        batch.drop_column("slot_at")
