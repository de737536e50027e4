"""Part 2 access index (owner: disclosure engineer): the Part 2-labelled resources and the grants of
the Consents, kept by ``fhir_iop.disclosure`` through a store write hook. Upgrading a store that
already holds resources indexes them here, so nothing labelled is served unindexed.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "part2_resource",
        sa.Column("rid", RowId, sa.ForeignKey("resource.rid", ondelete="CASCADE"), primary_key=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=True),
    )
    op.create_index("ix_part2_resource_patient", "part2_resource", ["patient_id"])
    op.create_table(
        "part2_grant",
        sa.Column("consent_rid", RowId, sa.ForeignKey("resource.rid", ondelete="CASCADE"), nullable=False),
        sa.Column("consent_id", sa.String(64), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("recipient_id", sa.String(255), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("start_on", sa.Date, nullable=False),
        sa.Column("end_on", sa.Date, nullable=True),
        sa.Column("revoked_on", sa.Date, nullable=True),
    )
    op.create_index("ix_part2_grant_lookup", "part2_grant", ["patient_id", "recipient_id", "purpose", "resource_type"])
    op.create_index("ix_part2_grant_consent", "part2_grant", ["consent_rid"])
    from fhir_iop.disclosure.index import reindex_all
    reindex_all(op.get_bind())


def downgrade() -> None:
    op.drop_table("part2_grant")
    op.drop_table("part2_resource")
