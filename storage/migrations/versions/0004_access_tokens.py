"""access tokens: a developer's identity on a shared server, kept as a sha256

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 15:10:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "access_tokens",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("developer_id", sa.String(length=200), nullable=False),
        sa.Column("team_id", sa.String(length=64), nullable=True),
        sa.Column("label", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_access_tokens")),
    )
    op.create_index(op.f("ix_access_tokens_prefix"), "access_tokens", ["prefix"], unique=False)
    op.create_index(op.f("ix_access_tokens_developer_id"), "access_tokens", ["developer_id"], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index(op.f("ix_access_tokens_developer_id"), table_name="access_tokens")
    op.drop_index(op.f("ix_access_tokens_prefix"), table_name="access_tokens")
    op.drop_table("access_tokens")
