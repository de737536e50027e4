"""SMART clients and keys (owner: auth engineer).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "smart_client",
        sa.Column("client_id", sa.String(128), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("jwks", sa.Text, nullable=True),
        sa.Column("jwks_uri", sa.String(1024), nullable=True),
        sa.Column("scopes", sa.Text, nullable=False),
        sa.Column("recipient", sa.String(128), nullable=True),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("emergency_allowed", sa.Boolean, nullable=False),
        sa.Column("admin", sa.Boolean, nullable=False),
        sa.Column("created", sa.DateTime, nullable=False),
        sa.Column("disabled", sa.DateTime, nullable=True),
        sa.UniqueConstraint("name", name="uq_smart_client_name"),
    )
    op.create_table(
        "smart_assertion_jti",
        sa.Column("client_id", sa.String(128), primary_key=True),
        sa.Column("jti", sa.String(255), primary_key=True),
        sa.Column("exp", sa.DateTime, nullable=False),
    )
    op.create_index("ix_smart_assertion_jti_exp", "smart_assertion_jti", ["exp"])
    op.create_table(
        "smart_server_key",
        sa.Column("kid", sa.String(64), primary_key=True),
        sa.Column("alg", sa.String(16), nullable=False),
        sa.Column("private_pem", sa.Text, nullable=False),
        sa.Column("created", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("smart_server_key")
    op.drop_index("ix_smart_assertion_jti_exp", table_name="smart_assertion_jti")
    op.drop_table("smart_assertion_jti")
    op.drop_table("smart_client")
