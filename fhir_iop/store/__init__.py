"""The FHIR store: resources, every version, and search indexes in SQLite or PostgreSQL.

    from fhir_iop.store import Store
    store = Store("sqlite:///var/fhir-iop.sqlite")      # migrates on open
    with store.transaction() as tx:                     # one database transaction
        written = tx.create({"resourceType": "Patient", ...})
"""

from fhir_iop.store.engine import DEFAULT_DATABASE_URL, upgrade
from fhir_iop.store.errors import Conflict, Gone, Invalid, NotFound, PreconditionFailed, StoreError, UnknownParameter
from fhir_iop.store.repository import Store, Stored, Tx, Written

__all__ = ["DEFAULT_DATABASE_URL", "Conflict", "Gone", "Invalid", "NotFound", "PreconditionFailed", "Store",
           "StoreError", "Stored", "Tx", "UnknownParameter", "Written", "upgrade"]
