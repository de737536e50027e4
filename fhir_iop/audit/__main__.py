"""python -m fhir_iop.audit: regenerate the packaged AuditEvent search parameters from node_modules."""

from fhir_iop.audit import DEFINITIONS, package_definitions

data = package_definitions()
DEFINITIONS.write_bytes(data)
print(f"wrote {DEFINITIONS} ({len(data)} bytes)")
