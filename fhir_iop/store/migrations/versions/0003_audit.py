"""Audit (owner: audit engineer): AuditEvents are append-only in the database itself.

AuditEvents are stored by ``fhir_iop.audit`` as rows of the ``resource`` table (type
``AuditEvent``) with search index rows, so they need no table of their own. This revision adds
triggers that refuse any UPDATE or DELETE of such a row, whoever issues it (the API already answers
405/403; this also stops a bug or a hand-written statement from rewriting the trail). The triggers
test ``OLD.type`` only, so other resources' writes pay one comparison.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

import sqlalchemy as sa  # noqa: F401
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

MESSAGE = "AuditEvents are append-only"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"""
            CREATE FUNCTION fhir_iop_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION '{MESSAGE}' USING ERRCODE = 'integrity_constraint_violation';
            END $$""")
        op.execute("CREATE TRIGGER audit_event_append_only BEFORE UPDATE OR DELETE ON resource FOR EACH ROW "
                   "WHEN (OLD.type = 'AuditEvent') EXECUTE FUNCTION fhir_iop_audit_append_only()")
    else:
        for event in ("UPDATE", "DELETE"):
            op.execute(f"CREATE TRIGGER audit_event_no_{event.lower()} BEFORE {event} ON resource "
                       f"FOR EACH ROW WHEN OLD.type = 'AuditEvent' BEGIN SELECT RAISE(ABORT, '{MESSAGE}'); END")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_event_append_only ON resource")
        op.execute("DROP FUNCTION IF EXISTS fhir_iop_audit_append_only()")
    else:
        for event in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS audit_event_no_{event}")
