"""outside_medication ⇄ MedicationStatement; an EHR's MedicationRequest → outside_medication.

To FHIR an outside medication is always a MedicationStatement (what the program knows the client takes):
``medicationCodeableConcept`` (RxNorm when known, the medication as written in ``text``), ``effectivePeriod``
(start, end), ``dateAsserted`` (when the outside provider recorded it), ``dosage[0].text`` and the
prescriber as a display-only ``informationSource`` (R4 MedicationStatement has no prescriber element; the
prescriber is where the information comes from).

From FHIR: every MedicationStatement, and a MedicationRequest recorded by another system — one with
``meta.source`` (the EHR it was pulled from, see :mod:`fhir_iop.sync.pull`) and without the site's MAT
order identifier (:func:`is_outside_request`). The program's own MedicationRequests stay MAT orders. The
request's statuses read as statement statuses (cancelled → stopped, draft → intended); its period is the
dosage's ``boundsPeriod``, else ``dispenseRequest.validityPeriod``, else from ``authoredOn``; its
prescriber is the ``requester``.

MAT from outside: an outside buprenorphine, methadone or naltrexone is listed with its RxNorm code and is
NOT taken into drug-screen interpretation, which reads only the site's own MAT orders
(:mod:`fhir_iop.interpret`): a detected buprenorphine is flagged as unexpected until a clinician has
reconciled the outside prescription into a mat_medication.
"""

from __future__ import annotations

from fhir_iop.errors import Problem
from fhir_iop.mapping.common import FhirIndex, MappingContext, Unmappable, client_of, codings, date_part, \
    identifier_value
from fhir_iop.records.model import OutsideMedication

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
STATUSES = ("active", "completed", "entered-in-error", "intended", "stopped", "on-hold", "unknown", "not-taken")
#: MedicationRequest status → MedicationStatement status (the same word where both have it)
FROM_REQUEST_STATUS = {"active": "active", "on-hold": "on-hold", "completed": "completed", "stopped": "stopped",
                       "entered-in-error": "entered-in-error", "unknown": "unknown", "cancelled": "stopped",
                       "draft": "intended"}


def to_fhir(m: OutsideMedication, ctx: MappingContext, problems: list[Problem]) -> list[dict]:
    ctx.check_ref(f"outside medication {m.outside_medication_id}", "client_mrn", "clients", m.client_mrn, problems)
    concept = {"text": m.medication}
    if m.rxnorm:
        concept = {"coding": [{"system": RXNORM, "code": m.rxnorm}], "text": m.medication}
    ms = {"resourceType": "MedicationStatement", "id": ctx.rid("outside_medication", m.outside_medication_id),
          "meta": ctx.meta("outside_medication", True),
          "identifier": [{"system": ctx.systems.outside_medication, "value": m.outside_medication_id}],
          "status": m.status, "medicationCodeableConcept": concept, "subject": ctx.client_ref(m.client_mrn)}
    if m.start or m.end:
        ms["effectivePeriod"] = {k: v.isoformat() for k, v in (("start", m.start), ("end", m.end)) if v}
    if m.recorded_on:
        ms["dateAsserted"] = m.recorded_on.isoformat()
    if m.prescriber:
        ms["informationSource"] = {"type": "Practitioner", "display": m.prescriber}
    if m.dosage:
        ms["dosage"] = [{"text": m.dosage}]
    return [ms]


# -- FHIR → IOP -------------------------------------------------------------------------------------

def is_outside_request(req: dict, ctx: MappingContext) -> bool:
    """A MedicationRequest another system recorded (pulled from an EHR), not a MAT order of the site."""
    return bool((req.get("meta") or {}).get("source")) and not identifier_value(req, ctx.systems.mat_medication)


def _medication(res: dict, ix: FhirIndex) -> tuple[str, str | None]:
    """(the medication as written, its RxNorm code)."""
    rt = res["resourceType"]
    concept = res.get("medicationCodeableConcept")
    ref = res.get("medicationReference")
    if ref is not None:
        r = ref.get("reference") or ""
        med = next((c for c in res.get("contained") or () if isinstance(c, dict)
                    and c.get("resourceType") == "Medication" and f"#{c.get('id')}" == r), None)
        concept = (med or {}).get("code") or {"text": ref.get("display")}
    found = codings(concept)
    rx = next((c.get("code") for c in found if c.get("system") == RXNORM and c.get("code")), None)
    text = (concept or {}).get("text") or next((c.get("display") for c in found if c.get("display")), None) \
        or (f"RxNorm {rx}" if rx else None)
    if not text:
        raise Unmappable("the medication has neither a text, a display nor an RxNorm code",
                         f"{rt}.medication")
    return text, rx


def _name(ref: dict | None, ix: FhirIndex) -> str | None:
    """A prescriber's name: a Practitioner, PractitionerRole or Organization (not the client reporting it)."""
    if not ref:
        return None
    key = FhirIndex.ref_key(ref) or ""
    if (ref.get("type") or key.split("/")[0]) in ("Patient", "RelatedPerson"):
        return None
    return ref.get("display") or ix.names.get(key)


def from_fhir(res: dict, ix: FhirIndex, ctx: MappingContext) -> dict:
    rt = res["resourceType"]
    text, rx = _medication(res, ix)
    mrn = client_of(res, "subject", ix, ctx)
    dosage = next((d.get("text") for d in res.get("dosage" if rt == "MedicationStatement" else "dosageInstruction")
                   or () if d.get("text")), None)
    if rt == "MedicationStatement":
        status = res.get("status")
        period = res.get("effectivePeriod") or {}
        start, end = period.get("start") or res.get("effectiveDateTime"), period.get("end")
        recorded, prescriber = res.get("dateAsserted"), _name(res.get("informationSource"), ix)
    else:
        status = FROM_REQUEST_STATUS.get(res.get("status"))
        bounds = next(((d.get("timing") or {}).get("repeat", {}).get("boundsPeriod") for d in
                       res.get("dosageInstruction") or () if (d.get("timing") or {}).get("repeat", {}).get(
                           "boundsPeriod")), None) or (res.get("dispenseRequest") or {}).get("validityPeriod") or {}
        start, end = bounds.get("start") or res.get("authoredOn"), bounds.get("end")
        recorded, prescriber = res.get("authoredOn"), _name(res.get("requester"), ix)
    if status not in STATUSES:
        raise Unmappable(f"status {res.get('status')!r} is not a medication status fhir-iop reads",
                         f"{rt}.status")
    return {"outside_medication_id": ix.key_of(res, ctx.systems.outside_medication), "client_mrn": mrn,
            "medication": text, "rxnorm": rx, "status": status, "start": date_part(start), "end": date_part(end),
            "dosage": dosage, "prescriber": prescriber, "recorded_on": date_part(recorded)}
