"""referral ⇄ ServiceRequest (a referral of a client to the site, typically pulled from an EHR).

- ``code``: SNOMED 1254709001 "Referral to substance use disorder treatment program" (reference §4), or
  the SNOMED code the referrer used (``service_snomed``), plus the fhir-iop ``program-level`` coding of
  the level of care requested.
- ``requester``: the referring practitioner, else the referring organization, as a display-only
  reference typed Practitioner or Organization; with both, the organization travels in the fhir-iop
  ``referring-organization`` extension (R4 ServiceRequest has one requester). Reading back, a reference to a
  Practitioner or Organization of the same input gives its name, and a contained PractitionerRole (as
  EHRs write a practitioner at an organization) gives both.
- ``reasonCode``: one CodeableConcept per ICD-10-CM or SNOMED code, and the reason in words as a
  text-only CodeableConcept. Reading back, ``reasonReference`` to a Condition of the same input gives its
  ICD-10-CM / SNOMED codes (the Condition then maps as part of the referral), to anything else its
  display is added to the reason text.
- ``performer``: the program referred to.

Which ServiceRequests are referrals (:func:`is_referral`): one with the site's referral identifier, a
``program-level`` coding, or a SNOMED code of SUD treatment listed in reference §4 (the referral concept
and the SUD therapy and counselling concepts: an EHR's order for "alcoholism counseling" sent here is a
referral to the IOP). Any other ServiceRequest (a lab order, an X-ray) is not an IOP concept.
"""

from __future__ import annotations

from typing import NamedTuple

from fhir_iop.errors import Problem
from fhir_iop.mapping.common import (ICD10CM, FhirIndex, MappingContext, Unmappable, cited, client_of, codings,
                                     date_part, ext_url, ext_value, identifier_value)
from fhir_iop.records.model import Referral
from fhir_iop.terminology import cs_url

SNOMED = "http://snomed.info/sct"
_REFERRAL = cited("referral-sud-program")
#: SNOMED codes of SUD treatment that make a ServiceRequest a referral here (domain-codes.md §4, VSAC
#: Substance Use Disorder Treatment and the referral concept 1254709001)
SUD_SERVICES = frozenset({"1254709001", "266707007", "385989002", "310653000", "792901003", "792902005", "60112009",
                          "313071005", "24165007", "720177001", "720176005", "20093000", "56876005", "23915005"})
STATUSES = ("draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown")
ORGANIZATION_EXT = ext_url("referring-organization")


def to_fhir(r: Referral, ctx: MappingContext, problems: list[Problem]) -> list[dict]:
    where = f"referral {r.referral_id}"
    ctx.check_ref(where, "client_mrn", "clients", r.client_mrn, problems)
    ctx.check_ref(where, "program_id", "programs", r.program_id, problems)
    code = [_REFERRAL] if r.service_snomed in (None, _REFERRAL["code"]) else [{"system": SNOMED,
                                                                                 "code": r.service_snomed}]
    if r.level:
        code.append(ctx.terminology.coding("program-level", r.level))
    sr = {"resourceType": "ServiceRequest", "id": ctx.rid("referral", r.referral_id),
          "meta": ctx.meta("referral", True)}
    if r.referring_practitioner and r.referring_organization:
        sr["extension"] = [{"url": ORGANIZATION_EXT, "valueReference": {"type": "Organization",
                                                                        "display": r.referring_organization}}]
    sr |= {"identifier": [{"system": ctx.systems.referral, "value": r.referral_id}],
           "status": r.status, "intent": "order", "code": {"coding": code},
           "subject": ctx.client_ref(r.client_mrn), "authoredOn": r.requested_on.isoformat()}
    if r.referring_practitioner:
        sr["requester"] = {"type": "Practitioner", "display": r.referring_practitioner}
    elif r.referring_organization:
        sr["requester"] = {"type": "Organization", "display": r.referring_organization}
    if r.program_id:
        sr["performer"] = [ctx.program_ref(r.program_id)]
    reasons = [{"coding": [{"system": ICD10CM, "code": c}]} for c in r.reason_icd10cm]
    reasons += [{"coding": [{"system": SNOMED, "code": c}]} for c in r.reason_snomed]
    if r.reason_text:
        reasons.append({"text": r.reason_text})
    if reasons:
        sr["reasonCode"] = reasons
    if r.note:
        sr["note"] = [{"text": r.note}]
    return [sr]


# -- FHIR → IOP -------------------------------------------------------------------------------------

class ConditionFacts(NamedTuple):
    """A Condition's codes, as read in the first pass (for referrals whose reasonReference names it)."""
    icd10cm: tuple[str, ...]
    snomed: tuple[str, ...]
    text: str | None


def index(res: dict, ix: FhirIndex, refs: list[str]) -> None:
    """First-pass facts: a Condition's codes (a referral's reason), a program Organization."""
    if res["resourceType"] == "Condition":
        found = codings(res.get("code"))
        facts = ConditionFacts(tuple(c["code"] for c in found if c.get("system") == ICD10CM and c.get("code")),
                               tuple(c["code"] for c in found if c.get("system") == SNOMED and c.get("code")),
                               (res.get("code") or {}).get("text"))
        for r in refs:
            ix.facts[r] = facts


def is_referral(sr: dict, ctx: MappingContext) -> bool:
    if identifier_value(sr, ctx.systems.referral):
        return True
    return any(c.get("system") == cs_url("program-level") or (c.get("system") == SNOMED and c.get("code") in
                                                                SUD_SERVICES) for c in codings(sr.get("code")))


def _requester(sr: dict, ix: FhirIndex) -> tuple[str | None, str | None]:
    """(practitioner, organization) names of the requester."""
    req = sr.get("requester") or {}
    ref = req.get("reference") or ""
    if ref.startswith("#"):
        role = next((c for c in sr.get("contained") or () if isinstance(c, dict) and f"#{c.get('id')}" == ref), {})
        if role.get("resourceType") == "PractitionerRole":
            return _name(role.get("practitioner"), ix), _name(role.get("organization"), ix)
        return None, None
    kind = req.get("type") or (ref.rstrip("/").split("/")[-2] if ref.count("/") >= 1 else None)
    name = _name(req, ix)
    organization = _name(ext_value(sr, ORGANIZATION_EXT), ix)
    if kind == "Organization":
        return None, name or organization
    return name, organization  # a Practitioner, a PractitionerRole, or untyped: a person's name


def _name(ref: dict | None, ix: FhirIndex) -> str | None:
    if not ref:
        return None
    return ref.get("display") or ix.names.get(FhirIndex.ref_key(ref) or "")


def from_fhir(sr: dict, ix: FhirIndex, ctx: MappingContext) -> dict:
    if not is_referral(sr, ctx):
        given = ", ".join(f"{c.get('system', '?')}|{c.get('code')}" for c in codings(sr.get("code"))) or "none"
        raise Unmappable(f"not an IOP concept: code ({given}) is not a referral to substance use disorder "
                         "treatment (SNOMED codes of reference §4, a program-level coding, or the site's referral "
                         "identifier); kept in the store", "ServiceRequest.code")
    if sr.get("status") not in STATUSES:
        raise Unmappable(f"status {sr.get('status')!r} is not a request status", "ServiceRequest.status")
    mrn = client_of(sr, "subject", ix, ctx)
    requested = sr.get("authoredOn") or sr.get("occurrenceDateTime") or (sr.get("occurrencePeriod") or {}).get("start")
    if not requested:
        raise Unmappable("no date (authoredOn or occurrence)", "ServiceRequest.authoredOn")
    found = codings(sr.get("code"))
    level = next((c.get("code") for c in found if c.get("system") == cs_url("program-level")), None)
    service = next((c.get("code") for c in found if c.get("system") == SNOMED and c.get("code")
                    and c.get("code") != _REFERRAL["code"]), None)
    icd, snomed, texts = [], [], []
    for concept in sr.get("reasonCode") or ():
        cs = concept.get("coding") or ()
        icd += [c["code"] for c in cs if c.get("system") == ICD10CM and c.get("code")]
        snomed += [c["code"] for c in cs if c.get("system") == SNOMED and c.get("code")]
        if concept.get("text") and not cs:
            texts.append(concept["text"])
    for ref in sr.get("reasonReference") or ():
        key = FhirIndex.ref_key(ref)
        facts = ix.facts.get(key) if key else None
        if isinstance(facts, ConditionFacts):
            icd += facts.icd10cm
            snomed += facts.snomed
            if not facts.icd10cm and not facts.snomed and facts.text:
                texts.append(facts.text)
            ix.consumed.add(key)
        elif ref.get("display"):
            texts.append(ref["display"])
    program = None
    for p in sr.get("performer") or ():
        ident = p.get("identifier") or {}
        if ident.get("system") == ctx.systems.program or ix.facts.get(FhirIndex.ref_key(p) or "") == "program":
            program = ix.resolve(p, ctx.systems.program)
            break
    practitioner, organization = _requester(sr, ix)
    notes = [n["text"] for n in sr.get("note") or () if n.get("text")]
    return {"referral_id": ix.key_of(sr, ctx.systems.referral), "client_mrn": mrn, "status": sr["status"],
            "requested_on": date_part(requested), "program_id": program, "level": level, "service_snomed": service,
            "referring_practitioner": practitioner, "referring_organization": organization,
            "reason_icd10cm": list(dict.fromkeys(icd)), "reason_snomed": list(dict.fromkeys(snomed)),
            "reason_text": "; ".join(dict.fromkeys(texts)) or None, "note": "\n".join(notes) or None}
