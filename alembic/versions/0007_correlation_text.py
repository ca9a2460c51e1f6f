"""llm_requests.correlation_id as text: the client's X-Correlation-ID as sent, indexed.

It was a UUID, so ids applications already send (`req_…`, decimal trace ids, a
W3C trace id) were refused. Existing values are kept, in the UUID's canonical
form (`8-4-4-4-12` lowercase hex), the form the gateway journals and echoes.
On PostgreSQL the column becomes varchar(128) (a table rewrite, under a lock
held while it runs). SQLite does not enforce a column's type or length, and
recreating this table would break its attempts' foreign keys, so there only
the stored values change: SQLAlchemy kept a UUID as 32 hex digits. The index
lets `llmsvc status --correlation-id` find a request without a scan.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# A 32-hex-digit value (SQLite's stored UUID) in the canonical 8-4-4-4-12 form.
_HYPHENATED = (
    "lower(substr(correlation_id, 1, 8) || '-' || substr(correlation_id, 9, 4) || '-' || "
    "substr(correlation_id, 13, 4) || '-' || substr(correlation_id, 17, 4) || '-' || "
    "substr(correlation_id, 21, 12))"
)
_UUID_TEXT = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column(
            "llm_requests",
            "correlation_id",
            type_=sa.String(128),
            existing_type=sa.Uuid,
            existing_nullable=False,
            postgresql_using="correlation_id::text",
        )
    else:
        op.execute(
            f"UPDATE llm_requests SET correlation_id = {_HYPHENATED} "
            "WHERE length(correlation_id) = 32"
        )
    op.create_index("ix_llm_requests_correlation_id", "llm_requests", ["correlation_id"])


def downgrade() -> None:
    """Back to a UUID column, if every stored id is one; otherwise refused, nothing changed."""
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        others = bind.execute(
            sa.text("SELECT count(*) FROM llm_requests WHERE correlation_id !~ :uuid"),
            {"uuid": _UUID_TEXT},
        ).scalar_one()
    else:
        others = bind.execute(
            sa.text(
                "SELECT count(*) FROM llm_requests WHERE length(correlation_id) != 36 "
                "OR lower(correlation_id) GLOB '*[^0-9a-f-]*'"
            )
        ).scalar_one()
    if others:
        raise RuntimeError(
            f"{others} requests have a correlation id that is not a UUID, which revision 0006 "
            "cannot store; delete or change them first"
        )
    op.drop_index("ix_llm_requests_correlation_id", "llm_requests")
    if bind.dialect.name == "postgresql":
        op.alter_column(
            "llm_requests",
            "correlation_id",
            type_=sa.Uuid,
            existing_type=sa.String(128),
            existing_nullable=False,
            postgresql_using="correlation_id::uuid",
        )
    else:
        op.execute(
            "UPDATE llm_requests SET correlation_id = lower(replace(correlation_id, '-', ''))"
        )
