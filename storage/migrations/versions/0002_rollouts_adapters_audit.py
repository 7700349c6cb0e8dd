"""rollouts, adapter versions, audit log

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 00:56:36.059070

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "adapter_versions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column(
            "scope_kind", sa.Enum("developer", "team", name="scope_kind", native_enum=False, length=24), nullable=False
        ),
        sa.Column("scope_id", sa.String(length=200), nullable=False),
        sa.Column("parent_id", sa.String(length=64), nullable=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("kl", sa.Float(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column(
            "status",
            sa.Enum("candidate", "active", "retired", "rejected", name="adapter_status", native_enum=False, length=24),
            nullable=False,
        ),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["adapter_versions.id"],
            name=op.f("fk_adapter_versions_parent_id_adapter_versions"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapter_versions")),
    )
    with op.batch_alter_table("adapter_versions", schema=None) as batch_op:
        batch_op.create_index("ix_adapter_versions_scope", ["scope_kind", "scope_id", "status"], unique=False)

    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("scope_kind", sa.String(length=16), nullable=True),
        sa.Column("scope_id", sa.String(length=200), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_log_at"), ["at"], unique=False)

    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("completion_id", sa.String(length=64), nullable=True),
        sa.Column("developer_id", sa.String(length=200), nullable=True),
        sa.Column(
            "scope_kind", sa.Enum("developer", "team", name="scope_kind", native_enum=False, length=24), nullable=False
        ),
        sa.Column("scope_id", sa.String(length=200), nullable=False),
        sa.Column("context", sa.Text(), nullable=False),
        sa.Column("response", sa.Text(), nullable=False),
        sa.Column("next_state", sa.Text(), nullable=True),
        sa.Column("signal", sa.String(length=32), nullable=True),
        sa.Column("rewards", sa.JSON(), nullable=False),
        sa.Column("judge_votes", sa.JSON(), nullable=False),
        sa.Column(
            "status",
            sa.Enum("pending", "trained", "discarded", name="rollout_status", native_enum=False, length=24),
            nullable=False,
        ),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("trained_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["completion_id"],
            ["completions.id"],
            name=op.f("fk_rollouts_completion_id_completions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["developer_id"], ["developers.id"], name=op.f("fk_rollouts_developer_id_developers"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollouts")),
    )
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rollouts_completion_id"), ["completion_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_rollouts_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_rollouts_developer_id"), ["developer_id"], unique=False)
        batch_op.create_index("ix_rollouts_scope_status", ["scope_kind", "scope_id", "status"], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    """Downgrade schema."""
    # ### commands auto generated by Alembic - please adjust! ###
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.drop_index("ix_rollouts_scope_status")
        batch_op.drop_index(batch_op.f("ix_rollouts_developer_id"))
        batch_op.drop_index(batch_op.f("ix_rollouts_created_at"))
        batch_op.drop_index(batch_op.f("ix_rollouts_completion_id"))

    op.drop_table("rollouts")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_log_at"))

    op.drop_table("audit_log")
    with op.batch_alter_table("adapter_versions", schema=None) as batch_op:
        batch_op.drop_index("ix_adapter_versions_scope")

    op.drop_table("adapter_versions")
    # ### end Alembic commands ###
