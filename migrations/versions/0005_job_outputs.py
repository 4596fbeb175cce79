"""job outputs: which objects a job writes (SEG, RTSTRUCT, SR, overlay), one delivery per object

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 08:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("outputs", sa.JSON(), nullable=False, server_default='["seg"]'))
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("output", sa.String(length=16), nullable=False, server_default="seg"))


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("output")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("outputs")
