"""training status: the round a worker trains now for a scope, and how its last round ended

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 21:40:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "training_status",
        sa.Column(
            "scope_kind", sa.Enum("developer", "team", name="scope_kind", native_enum=False, length=24), nullable=False
        ),
        sa.Column("scope_id", sa.String(length=200), nullable=False),
        sa.Column("phase", sa.String(length=32), nullable=True),
        sa.Column("step", sa.Integer(), nullable=True),
        sa.Column("steps", sa.Integer(), nullable=True),
        sa.Column("rollouts", sa.Integer(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_status", sa.String(length=32), nullable=True),
        sa.Column("last_reason", sa.Text(), nullable=True),
        sa.Column("last_version", sa.String(length=64), nullable=True),
        sa.Column("last_finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("scope_kind", "scope_id", name=op.f("pk_training_status")),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("training_status")
