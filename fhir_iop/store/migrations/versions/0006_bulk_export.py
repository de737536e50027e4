"""Bulk Data export jobs (owner: payer export engineer): the ``bulk_export_job`` table.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bulk_export_job",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("client", sa.String(255), nullable=False),
        sa.Column("access", sa.Text, nullable=False),
        sa.Column("request", sa.Text, nullable=False),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("progress", sa.String(255), nullable=True),
        sa.Column("files", sa.Text, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("transaction_time", sa.DateTime, nullable=True),
        sa.Column("created", sa.DateTime, nullable=False),
        sa.Column("heartbeat", sa.DateTime, nullable=True),
        sa.Column("expires", sa.DateTime, nullable=True),
    )
    op.create_index("ix_bulk_export_job_client", "bulk_export_job", ["client", "created"])


def downgrade() -> None:
    op.drop_index("ix_bulk_export_job_client", table_name="bulk_export_job")
    op.drop_table("bulk_export_job")
