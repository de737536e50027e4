"""EHR sync cursors, outbox and dead letters (owner: sync engineers).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "sync_outbox",
        sa.Column("id", RowId, primary_key=True, autoincrement=True),
        sa.Column("connection", sa.String(64), nullable=False),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.String(64), nullable=False),
        sa.Column("version_id", sa.Integer, nullable=False),
        sa.Column("operation", sa.String(8), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("lease_expires", sa.DateTime, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.DateTime, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.Column("sent_at", sa.DateTime, nullable=True),
        sa.Column("remote_location", sa.String(512), nullable=True),
        sa.Column("remote_version", sa.String(64), nullable=True),
        sa.Column("consent", sa.String(128), nullable=True),
    )
    op.create_index("ix_sync_outbox_claim", "sync_outbox", ["state", "next_attempt_at"])
    op.create_index("ix_sync_outbox_resource", "sync_outbox", ["connection", "resource_type", "resource_id"])
    op.create_table(
        "sync_state",
        sa.Column("connection", sa.String(64), primary_key=True),
        sa.Column("resource_type", sa.String(64), primary_key=True),
        sa.Column("cursor", sa.String(64), nullable=True),
        sa.Column("next_url", sa.Text, nullable=True),
        sa.Column("bulk_status_url", sa.Text, nullable=True),
        sa.Column("bulk_transaction_time", sa.String(64), nullable=True),
        sa.Column("bulk_state", sa.String(16), nullable=True),
        sa.Column("bulk_files_done", sa.Text, nullable=True),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "sync_run",
        sa.Column("id", RowId, primary_key=True, autoincrement=True),
        sa.Column("connection", sa.String(64), nullable=False),
        sa.Column("direction", sa.String(8), nullable=False),
        sa.Column("worker", sa.String(128), nullable=True),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("ended_at", sa.DateTime, nullable=True),
        sa.Column("counts", sa.Text, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
    )
    op.create_index("ix_sync_run_connection", "sync_run", ["connection", "started_at"])


def downgrade() -> None:
    op.drop_index("ix_sync_run_connection", table_name="sync_run")
    op.drop_table("sync_run")
    op.drop_table("sync_state")
    op.drop_index("ix_sync_outbox_resource", table_name="sync_outbox")
    op.drop_index("ix_sync_outbox_claim", table_name="sync_outbox")
    op.drop_table("sync_outbox")
