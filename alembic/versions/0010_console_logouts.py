"""Console sessions ended by logging out (issue 18): refused by every worker from then on.

The console's session is a signed cookie that every worker checks alike, so forgetting
it in one process's memory would not end it in the others that share the port.
`console_logouts` holds a row per ended session, keyed by the SHA-256 of the cookie's
random nonce (never the cookie), with the time the cookie would have expired; after
that the signature check refuses it anyway, and the row is deleted at the next logout.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "console_logouts",
        sa.Column("nonce_hash", sa.String(64), primary_key=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_console_logouts_expires_at", "console_logouts", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_console_logouts_expires_at", "console_logouts")
    op.drop_table("console_logouts")
