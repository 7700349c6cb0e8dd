"""scope controls: recording paused per developer (nothing of their sessions is stored while it is)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 11:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema: every existing scope records, as before."""
    with op.batch_alter_table("scope_controls") as batch:
        batch.add_column(sa.Column("recording_paused", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("scope_controls") as batch:
        batch.drop_column("recording_paused")
