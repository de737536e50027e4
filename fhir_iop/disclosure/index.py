"""The Part 2 access index: which stored resources are 42 CFR Part 2 data, whose they are, and what
each Consent lets go, kept in the writing transaction by a store write hook.

* ``part2_resource``: one row per resource that was ever stored with v3-ActCode#42CFRPart2 in
  ``meta.security``: its type and the Patient it is about (:data:`PATIENT_PATHS`; the R4 Patient
  compartment's "about" element for each type fhir-iop stores). The row stays when a later version
  drops the label or the resource is deleted, so its older versions stay protected in history.
* ``part2_grant``: for the current version of each Consent, one row per (purpose, resource type)
  it permits disclosing to its recipient, with the consent's period and revocation day. A Consent
  written, revoked or deleted rewrites its rows in the same transaction, so the next request sees it.

Only the program's own writes of a Consent grant (:func:`grants_from`): not one an outside recipient
writes through the API, nor one pulled from an EHR.

The Consent is read with :func:`fhir_iop.mapping.consent.from_fhir`, the same reading the mapping
uses: a Consent it cannot map exactly (nested denies, limits to particular resources, several
recipients, a status other than active/inactive...) grants nothing, never more than was signed.
The recipient is the actor's identifier in the site's recipient system (``recipient-id`` extension
when the identifier is the NPI); for a payer that is its payer id, as in the payer export.
The data classes become resource types through the ``consent-data-class-to-resource-type`` ConceptMap.
"""

from __future__ import annotations

import logging
from datetime import date
from functools import lru_cache

import orjson
from sqlalchemy import delete, insert, select, update

from fhir_iop.mapping import consent as consent_mapping
from fhir_iop.mapping.common import FhirIndex, MappingContext, Unmappable, ext_value
from fhir_iop.store.models import part2_grant, part2_resource, resource, resource_version

log = logging.getLogger(__name__)

V3_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"

#: the element naming the Patient a resource is about, per stored type (R4 CompartmentDefinition
#: "patient": Coverage by beneficiary, EpisodeOfCare/Consent by patient, the clinical types by
#: subject); Patient is about itself; Practitioner and Organization are about no patient.
PATIENT_PATHS: dict[str, str | None] = {
    "Patient": None, "Coverage": "beneficiary", "EpisodeOfCare": "patient", "Condition": "subject",
    "CareTeam": "subject", "Encounter": "subject", "DiagnosticReport": "subject", "Observation": "subject",
    "Specimen": "subject", "MedicationRequest": "subject", "MedicationAdministration": "subject",
    "MedicationDispense": "subject", "CarePlan": "subject", "Goal": "subject", "Consent": "patient",
}


def labelled(res: dict) -> bool:
    """Whether ``res`` carries v3-ActCode#42CFRPart2 in ``meta.security``."""
    meta = res.get("meta") if isinstance(res, dict) else None
    if not isinstance(meta, dict):
        return False
    return any(isinstance(s, dict) and s.get("system") == V3_ACT_CODE and s.get("code") == "42CFRPart2"
               for s in meta.get("security") or ())


def patient_of(res: dict) -> str | None:
    """The id of the (local) Patient ``res`` is about, or None."""
    rt = res.get("resourceType")
    if rt == "Patient":
        return res.get("id")
    path = PATIENT_PATHS.get(rt)
    ref = res.get(path) if path else None
    target = ref.get("reference") if isinstance(ref, dict) else None
    if not isinstance(target, str):
        return None
    parts = target.split("?", 1)[0].rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
        return parts[-1]
    if len(parts) >= 4 and parts[-4] == "Patient" and parts[-2] == "_history":  # Patient/x/_history/n
        return parts[-3]
    return None


@lru_cache(maxsize=1)
def context() -> MappingContext:
    """Site settings and terminology (``FHIR_IOP_MAPPINGS`` or the packaged mappings)."""
    return MappingContext()


def _day(value) -> date | None:
    return value if value is None or isinstance(value, date) else date.fromisoformat(str(value)[:10])


def _site_recipient(ref: dict, ctx: MappingContext) -> str | None:
    system = ctx.systems.recipient
    for ident in ((ext_value(ref, consent_mapping.RECIPIENT_ID_EXT) or {}), ref.get("identifier") or {}):
        if isinstance(ident, dict) and ident.get("system") == system and ident.get("value"):
            return ident["value"]
    return None


def grants(res: dict, ctx: MappingContext | None = None) -> list[dict]:
    """The ``part2_grant`` rows (without ``consent_rid``) of a Consent; [] when it grants nothing."""
    ctx = ctx or context()
    patient = patient_of(res)
    if patient is None or not res.get("id"):
        return []
    ix = FhirIndex()
    ix.keys[FhirIndex.ref_key(res.get("patient")) or ""] = patient
    for org in res.get("organization") or ():
        if key := FhirIndex.ref_key(org):
            ix.keys[key] = key
    try:
        rec = consent_mapping.from_fhir(res, ix, ctx)
        _actor, ref = consent_mapping._recipient_of(consent_mapping._disclosure_permits(res))
    except Unmappable as e:
        log.info("Consent/%s grants nothing: %s", res.get("id"), e.args[0] if e.args else "unmappable")
        return []
    except Exception as e:  # malformed input: grant nothing rather than fail the write
        log.warning("Consent/%s grants nothing: %s", res.get("id"), type(e).__name__)
        return []
    recipient = _site_recipient(ref, ctx)
    if recipient is None:
        log.info("Consent/%s grants nothing: the recipient has no identifier in the site recipient system",
                 res.get("id"))
        return []
    types = []
    for dc in rec["data_classes"]:
        types += [c["code"] for c in consent_mapping._classes(ctx, dc) if c["code"] not in types]
    return [{"consent_id": res["id"], "patient_id": patient, "recipient_id": recipient, "purpose": purpose,
             "resource_type": t, "start_on": _day(rec["start"]), "end_on": _day(rec["end"]),
             "revoked_on": _day(rec["revoked_on"])}
            for purpose in rec["purposes"] for t in types]


def _label(conn, rid_pk: int, rt: str, res: dict) -> None:
    values = {"type": rt, "patient_id": patient_of(res)}
    if conn.execute(update(part2_resource).where(part2_resource.c.rid == rid_pk).values(**values)).rowcount == 0:
        conn.execute(insert(part2_resource).values(rid=rid_pk, **values))


def _grant(conn, rid_pk: int, res: dict | None) -> None:
    conn.execute(delete(part2_grant).where(part2_grant.c.consent_rid == rid_pk))
    rows = grants(res) if res is not None else []
    if rows:
        conn.execute(insert(part2_grant), [{"consent_rid": rid_pk, **r} for r in rows])


def grants_from(tx) -> bool:
    """Whether Consents written in ``tx`` may grant: only the program's own writes. A Consent an outside
    recipient writes through the API (it could name itself) or one pulled from an EHR (``sync:``
    origin) grants nothing, whatever it says, until the program writes it itself."""
    if (tx.origin or "").startswith("sync:"):
        return False
    gate = getattr(tx, "gate", None)
    return gate is None or getattr(gate.access, "recipient", None) is None


def hook(tx, rid_pk: int, rt: str, rid: str, res: dict | None) -> None:
    """The store write hook (``fhir_iop.store.repository.WRITE_HOOKS``)."""
    if res is not None and labelled(res):
        _label(tx.conn, rid_pk, rt, res)
    if rt == "Consent":
        trusted = grants_from(tx)
        if res is not None and not trusted:
            log.info("Consent/%s grants nothing: written by %s, not by the program", rid,
                     "an EHR sync" if (tx.origin or "").startswith("sync:") else "an outside recipient")
        _grant(tx.conn, rid_pk, res if trusted else None)


def reindex_all(conn) -> None:
    """Index every stored version and the current Consents (migration 0002 on a store with data)."""
    versions = select(resource_version.c.rid, resource_version.c.type, resource_version.c.body) \
        .where(resource_version.c.deleted.is_(False)) \
        .order_by(resource_version.c.rid, resource_version.c.version_id)
    for r in conn.execute(versions).all():
        res = orjson.loads(r.body)
        if labelled(res):
            _label(conn, r.rid, r.type, res)
    consents = select(resource.c.rid, resource.c.body).where(resource.c.type == "Consent",
                                                             resource.c.deleted.is_(False))
    for r in conn.execute(consents).all():
        _grant(conn, r.rid, orjson.loads(r.body))
