"""Why each attempt stopped (issue 17): `finish_reason`, one of OpenAI's as the client was
told it, and `stop_reason`, the upstream's own word (Anthropic's `refusal` is told as
`content_filter`). A retrieved response is `incomplete` by the first; the second is kept
for the operator. Both are NULL on attempts from before, and on ones that got no reply.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("llm_attempts", sa.Column("finish_reason", sa.String(64)))
    op.add_column("llm_attempts", sa.Column("stop_reason", sa.String(64)))


def downgrade() -> None:
    op.drop_column("llm_attempts", "stop_reason")
    op.drop_column("llm_attempts", "finish_reason")
