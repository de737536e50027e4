"""Resources, their versions, and the search index tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
STATISTICS = {"search_token": ("type", "param", "code", "system"), "search_string": ("type", "param", "value"),
              "search_date": ("type", "param"),
              "search_reference": ("type", "param", "target_type", "target_id"),
              "search_quantity": ("type", "param", "system", "code")}


def _rid_fk():
    return sa.Column("rid", RowId, sa.ForeignKey("resource.rid", ondelete="CASCADE"), nullable=False)


def _index_table(name, *columns, value_index):
    op.create_table(name, _rid_fk(), sa.Column("type", sa.String(64), nullable=False),
                    sa.Column("param", sa.String(64), nullable=False), *columns)
    op.create_index(f"ix_{name}_value", name, ["type", "param", *value_index, "rid"])
    op.create_index(f"ix_{name}_rid", name, ["rid", "param"])


def upgrade() -> None:
    op.create_table(
        "resource",
        sa.Column("rid", RowId, primary_key=True, autoincrement=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("version_id", sa.Integer, nullable=False),
        sa.Column("last_updated", sa.DateTime, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("body", sa.Text, nullable=True),
        sa.UniqueConstraint("type", "id", name="uq_resource_type_id"),
    )
    op.create_index("ix_resource_type_updated", "resource", ["type", "last_updated"])
    op.create_table(
        "resource_version",
        sa.Column("rid", RowId, sa.ForeignKey("resource.rid", ondelete="CASCADE"), primary_key=True),
        sa.Column("version_id", sa.Integer, primary_key=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("last_updated", sa.DateTime, nullable=False),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("body", sa.Text, nullable=True),
    )
    op.create_index("ix_resource_version_type_updated", "resource_version", ["type", "last_updated"])
    op.create_index("ix_resource_version_updated", "resource_version", ["last_updated"])
    _index_table("search_token", sa.Column("system", sa.String(255), nullable=True),
                 sa.Column("code", sa.String(255), nullable=True), value_index=["code", "system"])
    _index_table("search_string", sa.Column("value", sa.String(255), nullable=False), value_index=["value"])
    _index_table("search_date", sa.Column("low", sa.DateTime, nullable=False),
                 sa.Column("high", sa.DateTime, nullable=False), value_index=["low", "high"])
    _index_table("search_reference", sa.Column("target_type", sa.String(64), nullable=True),
                 sa.Column("target_id", sa.String(64), nullable=True), sa.Column("url", sa.String(512), nullable=True),
                 value_index=["target_id", "target_type"])
    _index_table("search_quantity", sa.Column("value", sa.Float, nullable=False),
                 sa.Column("system", sa.String(255), nullable=True), sa.Column("code", sa.String(64), nullable=True),
                 value_index=["value"])
    if op.get_bind().dialect.name == "postgresql":
        # type, param and value columns are strongly correlated: without these statistics the planner
        # underestimates broad matches (code=X) by 10x and picks plans that read every match
        for table, columns in STATISTICS.items():
            op.execute(f"CREATE STATISTICS st_{table} (dependencies, mcv) ON {', '.join(columns)} FROM {table}")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in STATISTICS:
            op.execute(f"DROP STATISTICS IF EXISTS st_{table}")
    for name in ("search_quantity", "search_reference", "search_date", "search_string", "search_token",
                 "resource_version", "resource"):
        op.drop_table(name)
