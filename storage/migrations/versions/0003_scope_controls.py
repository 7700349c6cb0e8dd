"""scope controls: training paused per scope by a guard or an admin

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 05:10:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "scope_controls",
        sa.Column(
            "scope_kind", sa.Enum("developer", "team", name="scope_kind", native_enum=False, length=24), nullable=False
        ),
        sa.Column("scope_id", sa.String(length=200), nullable=False),
        sa.Column("training_paused", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("scope_kind", "scope_id", name=op.f("pk_scope_controls")),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("scope_controls")
