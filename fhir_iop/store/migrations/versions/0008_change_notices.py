"""Change notices for the read cache (PostgreSQL; ``fhir_iop.store.cache``): a trigger on
``resource`` sends ``NOTIFY fhir_iop_resource, '<schema>|<type>|<id>'`` for each row written, and
``'<schema>|*'`` on TRUNCATE, delivered when the writing transaction commits, whoever writes.
AuditEvents are left out (the cache never holds them; the audit shipper writes many). Nothing on SQLite.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("""
CREATE OR REPLACE FUNCTION fhir_iop_resource_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'TRUNCATE' THEN
    PERFORM pg_notify('fhir_iop_resource', TG_TABLE_SCHEMA || '|*');
    RETURN NULL;
  END IF;
  IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.type <> 'AuditEvent' THEN
    PERFORM pg_notify('fhir_iop_resource', TG_TABLE_SCHEMA || '|' || OLD.type || '|' || OLD.id);
  END IF;
  IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.type <> 'AuditEvent'
     AND (TG_OP = 'INSERT' OR NEW.type <> OLD.type OR NEW.id <> OLD.id) THEN
    PERFORM pg_notify('fhir_iop_resource', TG_TABLE_SCHEMA || '|' || NEW.type || '|' || NEW.id);
  END IF;
  RETURN NULL;
END $$""")
    op.execute("CREATE TRIGGER fhir_iop_resource_changed AFTER INSERT OR UPDATE OR DELETE ON resource "
               "FOR EACH ROW EXECUTE FUNCTION fhir_iop_resource_changed()")
    op.execute("CREATE TRIGGER fhir_iop_resource_truncated AFTER TRUNCATE ON resource "
               "FOR EACH STATEMENT EXECUTE FUNCTION fhir_iop_resource_changed()")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS fhir_iop_resource_truncated ON resource")
    op.execute("DROP TRIGGER IF EXISTS fhir_iop_resource_changed ON resource")
    op.execute("DROP FUNCTION IF EXISTS fhir_iop_resource_changed()")
