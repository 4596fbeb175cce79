"""completion facts: where each image lies, and when a series' association was released

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 07:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("orientation", sa.String(length=96), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("slice_position", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("images_in_acquisition", sa.Integer(), nullable=True))
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.add_column(sa.Column("released_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("complete_requested_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_column("complete_requested_at")
        batch_op.drop_column("released_at")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("images_in_acquisition")
        batch_op.drop_column("slice_position")
        batch_op.drop_column("orientation")
