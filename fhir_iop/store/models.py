"""The store's tables (SQLAlchemy Core). The Alembic migrations in ``migrations/`` create them.

``resource`` holds the current version of each resource (a deleted one keeps its row, flagged);
``resource_version`` every version ever written; the ``search_*`` tables the values of the FHIR
search parameters of the current version (none for a deleted resource), rewritten in the same
transaction as the resource.
Resource bodies are stored as the JSON text that is served (``meta`` included), so a read sends
the stored bytes.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

#: an integer primary key that autoincrements on SQLite (INTEGER) and PostgreSQL (BIGINT)
RowId = BigInteger().with_variant(Integer(), "sqlite")

resource = Table(
    "resource", metadata,
    Column("rid", RowId, primary_key=True, autoincrement=True),
    Column("type", String(64), nullable=False),
    Column("id", String(64), nullable=False),
    Column("version_id", Integer, nullable=False),
    Column("last_updated", DateTime, nullable=False),  # UTC, naive
    Column("deleted", Boolean, nullable=False, default=False),
    Column("body", Text, nullable=True),  # null once deleted
    UniqueConstraint("type", "id", name="uq_resource_type_id"),
)
Index("ix_resource_type_updated", resource.c.type, resource.c.last_updated)

resource_version = Table(
    "resource_version", metadata,
    Column("rid", RowId, ForeignKey("resource.rid", ondelete="CASCADE"), primary_key=True),
    Column("version_id", Integer, primary_key=True),
    Column("type", String(64), nullable=False),
    Column("id", String(64), nullable=False),
    Column("last_updated", DateTime, nullable=False),
    Column("method", String(8), nullable=False),  # POST, PUT or DELETE
    Column("deleted", Boolean, nullable=False, default=False),
    Column("body", Text, nullable=True),
)
Index("ix_resource_version_type_updated", resource_version.c.type, resource_version.c.last_updated)
Index("ix_resource_version_updated", resource_version.c.last_updated)


def _index_table(name: str, *columns: Column, value_index: tuple[str, ...]) -> Table:
    t = Table(name, metadata,
              Column("rid", RowId, ForeignKey("resource.rid", ondelete="CASCADE"), nullable=False),
              Column("type", String(64), nullable=False),  # the resource's type, so a search starts here
              Column("param", String(64), nullable=False),
              *columns)
    Index(f"ix_{name}_value", t.c.type, t.c.param, *(t.c[c] for c in value_index), t.c.rid)
    Index(f"ix_{name}_rid", t.c.rid, t.c.param)
    return t


#: token and uri parameters: Coding, CodeableConcept, Identifier, ContactPoint, code, boolean, uri
search_token = _index_table("search_token", Column("system", String(255), nullable=True),
                            Column("code", String(255), nullable=True), value_index=("code", "system"))
#: string parameters, normalized (case-folded, accents removed)
search_string = _index_table("search_string", Column("value", String(255), nullable=False),
                             value_index=("value",))
#: date parameters as the UTC range they cover (inclusive bounds)
search_date = _index_table("search_date", Column("low", DateTime, nullable=False),
                           Column("high", DateTime, nullable=False), value_index=("low", "high"))
#: reference parameters: local targets as type + id, anything else as the full reference in url
search_reference = _index_table("search_reference", Column("target_type", String(64), nullable=True),
                                Column("target_id", String(64), nullable=True),
                                Column("url", String(512), nullable=True), value_index=("target_id", "target_type"))
#: quantity and number parameters
search_quantity = _index_table("search_quantity", Column("value", Float, nullable=False),
                               Column("system", String(255), nullable=True), Column("code", String(64), nullable=True),
                               value_index=("value",))

INDEX_TABLES = {"token": search_token, "uri": search_token, "string": search_string, "date": search_date,
                "reference": search_reference, "quantity": search_quantity, "number": search_quantity}

# -- tables of the features below; each section is owned by one module and created by its migration --

# Part 2 access index (migration 0002; written by fhir_iop.disclosure through a write hook)

#: every resource ever stored with the 42 CFR Part 2 label (v3-ActCode#42CFRPart2 in meta.security),
#: with its type and the Patient it is about (None: no Patient, never disclosed outside the program).
#: A row stays when a later version drops the label or the resource is deleted: its history is Part 2.
part2_resource = Table(
    "part2_resource", metadata,
    Column("rid", RowId, ForeignKey("resource.rid", ondelete="CASCADE"), primary_key=True),
    Column("type", String(64), nullable=False),
    Column("patient_id", String(64), nullable=True),
)
Index("ix_part2_resource_patient", part2_resource.c.patient_id)

#: what the current version of each Consent lets go: one row per (purpose, resource type), with the
#: consent's period and revocation day (``fhir_iop.mapping.consent.covers`` semantics)
part2_grant = Table(
    "part2_grant", metadata,
    Column("consent_rid", RowId, ForeignKey("resource.rid", ondelete="CASCADE"), nullable=False),
    Column("consent_id", String(64), nullable=False),
    Column("patient_id", String(64), nullable=False),
    Column("recipient_id", String(255), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("resource_type", String(64), nullable=False),
    Column("start_on", Date, nullable=False),
    Column("end_on", Date, nullable=True),
    Column("revoked_on", Date, nullable=True),
)
Index("ix_part2_grant_lookup", part2_grant.c.patient_id, part2_grant.c.recipient_id, part2_grant.c.purpose,
      part2_grant.c.resource_type)
Index("ix_part2_grant_consent", part2_grant.c.consent_rid)

# Audit (migration 0003; fhir_iop.audit)

# SMART clients and keys (migration 0004; fhir_iop.security)
#: registered backend clients: keys (JWKS inline or jwks_uri), allowed scopes, who they act for, why
smart_client = Table(
    "smart_client", metadata,
    Column("client_id", String(128), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("jwks", Text, nullable=True),  # a JWKS as JSON text
    Column("jwks_uri", String(1024), nullable=True),
    Column("scopes", Text, nullable=False),  # allowed scopes, space-separated
    Column("recipient", String(128), nullable=True),  # NULL = the program itself
    Column("purpose", String(32), nullable=False),  # v3-ActReason purpose of use
    Column("emergency_allowed", Boolean, nullable=False, default=False),
    Column("admin", Boolean, nullable=False, default=False),
    Column("created", DateTime, nullable=False),  # UTC, naive
    Column("disabled", DateTime, nullable=True),  # when it was disabled; NULL = active
    UniqueConstraint("name", name="uq_smart_client_name"),
)
#: client assertion ids seen, kept until the assertion expires, so an assertion is used only once
smart_assertion_jti = Table(
    "smart_assertion_jti", metadata,
    Column("client_id", String(128), primary_key=True),
    Column("jti", String(255), primary_key=True),
    Column("exp", DateTime, nullable=False),
)
Index("ix_smart_assertion_jti_exp", smart_assertion_jti.c.exp)
#: the server's own token-signing keys (generated on first start; the oldest active one signs)
smart_server_key = Table(
    "smart_server_key", metadata,
    Column("kid", String(64), primary_key=True),
    Column("alg", String(16), nullable=False),
    Column("private_pem", Text, nullable=False),
    Column("created", DateTime, nullable=False),
)

# EHR sync: cursors, outbox, dead letters (migration 0005; fhir_iop.sync)
#: one message per resource change to send to one EHR connection (the transactional outbox; written
#: by the fhir_iop.sync.outbox write hook in the transaction of the change). ``state``: pending ->
#: inflight (claimed: lease_owner until lease_expires) -> sent | dead | withheld (the Part 2 gate
#: refused it; back to pending when a Consent is written, or by replay). ``last_error`` holds the
#: EHR's reason (status and OperationOutcome text, ids only).
sync_outbox = Table(
    "sync_outbox", metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("connection", String(64), nullable=False),
    Column("resource_type", String(64), nullable=False),
    Column("resource_id", String(64), nullable=False),
    Column("version_id", Integer, nullable=False),
    Column("operation", String(8), nullable=False),  # PUT (conditional update by identifier) or DELETE
    Column("state", String(16), nullable=False),
    Column("lease_owner", String(128), nullable=True),
    Column("lease_expires", DateTime, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Column("sent_at", DateTime, nullable=True),
    Column("remote_location", String(512), nullable=True),
    Column("remote_version", String(64), nullable=True),
    Column("consent", String(128), nullable=True),  # "Consent/<id>" that allowed the disclosure
)
Index("ix_sync_outbox_claim", sync_outbox.c.state, sync_outbox.c.next_attempt_at)
Index("ix_sync_outbox_resource", sync_outbox.c.connection, sync_outbox.c.resource_type, sync_outbox.c.resource_id)

#: pull state per connection and resource type ("*" for a system-level bulk export): the
#: incremental cursor (the EHR's meta.lastUpdated / Bundle.meta.lastUpdated, as sent), the next
#: page link of an interrupted paging, and a Bulk Data export job in progress (kick-off status URL,
#: its transactionTime, state and the output files already imported, a JSON list).
sync_state = Table(
    "sync_state", metadata,
    Column("connection", String(64), primary_key=True),
    Column("resource_type", String(64), primary_key=True),
    Column("cursor", String(64), nullable=True),
    Column("next_url", Text, nullable=True),
    Column("bulk_status_url", Text, nullable=True),
    Column("bulk_transaction_time", String(64), nullable=True),
    Column("bulk_state", String(16), nullable=True),
    Column("bulk_files_done", Text, nullable=True),
    Column("updated_at", DateTime, nullable=False),
)

#: one pull or push run: when, counts (a JSON object), the last error
sync_run = Table(
    "sync_run", metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("connection", String(64), nullable=False),
    Column("direction", String(8), nullable=False),  # pull or push
    Column("worker", String(128), nullable=True),
    Column("started_at", DateTime, nullable=False),
    Column("ended_at", DateTime, nullable=True),
    Column("counts", Text, nullable=True),
    Column("last_error", Text, nullable=True),
)
Index("ix_sync_run_connection", sync_run.c.connection, sync_run.c.started_at)

# Bulk Data export jobs (migration 0006; server bulk export)

#: one FHIR Bulk Data $export: who asked (``client``, the Access as JSON), what (the kick-off URL and its
#: parameters), where it is (``state`` queued/running/completed/failed/cancelled, ``progress``,
#: ``heartbeat`` of the worker), its output (``files``: JSON [{type, name, count, bytes}]) and ``error``.
bulk_export_job = Table(
    "bulk_export_job", metadata,
    Column("id", String(64), primary_key=True),
    Column("client", String(255), nullable=False),
    Column("access", Text, nullable=False),
    Column("request", Text, nullable=False),
    Column("params", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("progress", String(255), nullable=True),
    Column("files", Text, nullable=True),
    Column("error", Text, nullable=True),
    Column("transaction_time", DateTime, nullable=True),  # UTC, naive
    Column("created", DateTime, nullable=False),
    Column("heartbeat", DateTime, nullable=True),
    Column("expires", DateTime, nullable=True),
)
Index("ix_bulk_export_job_client", bulk_export_job.c.client, bulk_export_job.c.created)
