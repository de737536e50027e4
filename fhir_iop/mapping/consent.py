"""consent ⇄ Consent: a client's written 42 CFR Part 2 consent to disclose to one recipient.

The shape follows reference §6c (domain-codes.md). What is standard and what is convention:

* Standard code systems (THO): ``scope`` consentscope#patient-privacy, ``category`` LOINC 59284-0,
  ``provision.type`` permit/deny, ``provision.action`` consentaction#disclose, ``provision.purpose``
  v3-ActReason, ``provision.actor.role`` v3-ParticipationType#IRCP, ``provision.securityLabel`` the
  Part 2 labels of §6a, ``provision.class`` FHIR resource types.
* **Convention, not a standard**: ``policyRule`` v3-ActCode#42CFRPart2 and ``policy.uri`` = the eCFR
  text of Part 2. No normative HL7 R4 Consent profile for Part 2 exists and consentpolicycodes has
  no Part 2 code (§6c, §9 item 6).
* Deny by default: the root provision is ``deny``; one nested ``permit`` per purpose of use names
  the recipient, the action (disclose), the purpose, the data (resource types through the
  ``consent-data-class-to-resource-type`` ConceptMap) and the Part 2 labels of the data it lets go.
* fhir-iop extensions: ``consent-revocation`` (valueDate, on the resource), ``recipient-kind`` (on
  each actor), ``consent-data-class`` (on each permit, so the classes read back exactly even if a
  site's ConceptMap makes two classes share a resource type), and ``recipient-id`` (the site's
  recipient identifier, on the actor's Reference when that Reference's identifier is the NPI).
* Revocation: the permit period stays ``start..end`` as signed; a revoked consent is ``inactive``
  and carries the revocation date in ``consent-revocation``. Disclosure stops *on* that day.

Reading FHIR written elsewhere never widens a consent: a permit limited to particular resources or
codes, a permit with exceptions (nested denies), permits that differ in data or period, or more than
one recipient are reported, not approximated. Resource types that make up only part of a data class
are left out (narrower). A permit without ``class`` covers every data class.
"""

from __future__ import annotations

from datetime import date

from fhir_iop.errors import Problem
from fhir_iop.mapping.common import (client_of, NPI, PART2_LABELS, FhirIndex, MappingContext, Unmappable, cited,
                                     date_part, ext_code, ext_url, ext_value)
from fhir_iop.records.model import Consent
from fhir_iop.terminology import cs_url

CLASS_MAP = "consent-data-class-to-resource-type"
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
POLICY_URI = "https://www.ecfr.gov/current/title-42/chapter-I/subchapter-A/part-2"
REVOCATION_EXT = ext_url("consent-revocation")
RECIPIENT_ID_EXT = ext_url("recipient-id")
_SCOPE, _CATEGORY = cited("consent-scope-privacy"), cited("consent-category-loinc")
_POLICY, _DISCLOSE, _IRCP = cited("policy-42cfrpart2"), cited("consent-action-disclose"), cited("participation-ircp")
_PART2 = (cited("label-42cfrpart2")["system"], cited("label-42cfrpart2")["code"])

#: Purposes of use (v3-ActReason) with their THO displays, as written in domain-codes.md §6a (row
#: "v3-ActReason (purpose of use)", source THO). The record model's ReasonCode lists the same codes.
PURPOSES = {"TREAT": "treatment", "ETREAT": "Emergency Treatment", "HPAYMT": "healthcare payment",
            "HOPERAT": "healthcare operations", "COC": "coordination of care", "CAREMGT": "care management",
            "PUBHLTH": "public health", "HRESCH": "healthcare research", "PATRQT": "patient requested"}


def covers(consent: Consent, recipient_id: str, purpose: str, data_class: str, on: date) -> bool:
    """Whether ``consent`` permits disclosing ``data_class`` to ``recipient_id`` for ``purpose`` on ``on``.

    Not yet revoked on that day (revocation takes effect on ``revoked_on``), within ``start..end``
    (both days included), and the recipient, purpose and data class all listed.
    """
    if consent.revoked_on is not None and on >= consent.revoked_on:
        return False
    if on < consent.start or (consent.end is not None and on > consent.end):
        return False
    return (recipient_id == consent.recipient_id and purpose in consent.purposes
            and data_class in consent.data_classes)


def _period(start: date, end: date | None) -> dict:
    return {"start": start.isoformat(), **({"end": end.isoformat()} if end else {})}


def _recipient(c: Consent, ctx: MappingContext) -> dict:
    """A logical reference: the NPI when there is one (and the site id in an extension), else the site id."""
    site_id = {"system": ctx.systems.recipient, "value": c.recipient_id}
    if c.recipient_npi:
        return {"extension": [{"url": RECIPIENT_ID_EXT, "valueIdentifier": site_id}],
                "identifier": {"system": NPI, "value": c.recipient_npi}, "display": c.recipient_name}
    return {"identifier": site_id, "display": c.recipient_name}


def _classes(ctx: MappingContext, data_class: str) -> list[dict]:
    return [t.coding() for t in ctx.terminology.translate(CLASS_MAP, "consent-data-class", data_class,
                                                          RESOURCE_TYPES)]


def to_fhir(c: Consent, ctx: MappingContext, problems: list[Problem]) -> list[dict]:
    where = f"consent {c.consent_id}"
    ctx.check_ref(where, "client_mrn", "clients", c.client_mrn, problems)
    ctx.check_ref(where, "program_id", "programs", c.program_id, problems)
    classes: list[dict] = []
    for dc in c.data_classes:
        targets = _classes(ctx, dc)
        if not targets:
            problems.append(Problem(where, f"data class {dc!r} has no resource type in the {CLASS_MAP} "
                                    "ConceptMap", field="data_classes"))
        classes += [t for t in targets if t not in classes]
    patient = ctx.client_ref(c.client_mrn)
    actor = {"extension": [ctx.ext_coding("recipient-kind", c.recipient_kind)],
             "role": {"coding": [_IRCP]}, "reference": _recipient(c, ctx)}
    permit = {"extension": [ctx.ext_coding("consent-data-class", dc) for dc in c.data_classes],
              "type": "permit", "period": _period(c.start, c.end), "actor": [actor],
              "action": [{"coding": [_DISCLOSE]}], "securityLabel": list(PART2_LABELS)}
    res = {"resourceType": "Consent", "id": ctx.rid("consent", c.consent_id), "meta": ctx.meta("consent", True),
           "identifier": [{"system": ctx.systems.consent, "value": c.consent_id}],
           "status": c.status, "scope": {"coding": [_SCOPE]}, "category": [{"coding": [_CATEGORY]}],
           "patient": patient, "dateTime": c.signed_on.isoformat(), "performer": [patient],
           "organization": [ctx.program_ref(c.program_id)], "policy": [{"uri": POLICY_URI}],
           "policyRule": {"coding": [_POLICY]},
           "provision": {"type": "deny", "provision": [
               {**permit, "purpose": [{"system": ACT_REASON, "code": p, "display": PURPOSES[p]}],
                "class": classes} for p in c.purposes]}}
    if c.revoked_on:
        res["extension"] = [{"url": REVOCATION_EXT, "valueDate": c.revoked_on.isoformat()}]
    return [res]


# -- from FHIR ------------------------------------------------------------------------------------

def _has(concepts, coding: dict) -> bool:
    return any(c.get("system") == coding["system"] and c.get("code") == coding["code"]
               for cc in concepts for c in cc.get("coding", ()))


def _disclosure_permits(res: dict) -> list[dict]:
    """The permit provisions that let data go to a named recipient (raises if they cannot map exactly)."""
    root = res.get("provision") or {}
    nested = root.get("provision", [])
    if any(p.get("provision") for p in nested):
        raise Unmappable("provisions nested more than one level deep", "Consent.provision.provision.provision")
    if root.get("type") == "permit" and any(p.get("type") == "deny" for p in nested):
        raise Unmappable("a nested deny carves an exception out of the permit, which an IOP consent cannot "
                         "carry (dropping it would widen the consent)", "Consent.provision.provision.type")
    permits = [p for p in ([root] if root.get("type") == "permit" else []) + nested
               if p.get("type") == "permit" and (not p.get("action") or _has(p["action"], _DISCLOSE))
               and any(_has([a.get("role") or {}], _IRCP) for a in p.get("actor", ()))]
    if not permits:
        raise Unmappable("no provision permits disclosure to a recipient (a permit with action disclose "
                         "and an actor in role IRCP)", "Consent.provision")
    for p in permits:
        if p.get("data") or p.get("code") or p.get("dataPeriod"):
            raise Unmappable("a permit limited to particular resources, codes or dates cannot be an IOP "
                             "consent without widening it", "Consent.provision.data")
        labels = {(s.get("system"), s.get("code")) for s in p.get("securityLabel", ())}
        if labels and _PART2 not in labels:
            raise Unmappable("the permit covers only data labelled " + ", ".join(sorted(c for _, c in labels))
                             + ", not 42 CFR Part 2 data", "Consent.provision.securityLabel")
    return permits


def _data_classes(p: dict, ctx: MappingContext) -> list[str]:
    own = [v["code"] for e in p.get("extension", ()) if e.get("url") == ext_url("consent-data-class")
           and (v := e.get("valueCoding", {})).get("system") == cs_url("consent-data-class")]
    if own:
        return own
    if not p.get("class"):
        return list(ctx.terminology.codes("consent-data-class"))  # no class: all data
    listed = [c.get("code") for c in p["class"] if c.get("system") == RESOURCE_TYPES]
    out = []
    for code in listed:  # a class is read back only when all of its resource types are listed
        dc = ctx.terminology.reverse(CLASS_MAP, RESOURCE_TYPES, code)
        if dc and dc not in out and all(t["code"] in listed for t in _classes(ctx, dc)):
            out.append(dc)
    if not out:
        raise Unmappable("class lists no complete IOP data class (resource types "
                         + ", ".join(f"{c.get('system')}|{c.get('code')}" for c in p["class"]) + ")",
                         "Consent.provision.class")
    return out


def _who(actor: dict) -> tuple:
    ref = actor.get("reference") or {}
    ident = ref.get("identifier") or {}
    return ident.get("system"), ident.get("value"), ref.get("reference")


def _recipient_of(permits: list[dict]) -> tuple[dict, dict]:
    actors = [a for p in permits for a in p["actor"] if _has([a.get("role") or {}], _IRCP)]
    if len({_who(a) for a in actors}) > 1:
        raise Unmappable("permits disclosure to more than one recipient; an IOP consent names one",
                         "Consent.provision.actor")
    return actors[0], actors[0].get("reference") or {}


def from_fhir(res: dict, ix: FhirIndex, ctx: MappingContext) -> dict:
    permits = _disclosure_permits(res)
    actor, ref = _recipient_of(permits)
    kind = ext_code(actor, "recipient-kind")
    if kind is None:
        raise Unmappable("the recipient's kind (ehr, payer, provider...) is not recorded: no recipient-kind "
                         "extension on the actor", "Consent.provision.actor.extension")
    ident = ref.get("identifier") or {}
    npi = ident.get("value") if ident.get("system") == NPI else None
    recipient_id = (ext_value(ref, RECIPIENT_ID_EXT) or {}).get("value") or ix.resolve(ref)
    name = ref.get("display") or ix.names.get(FhirIndex.ref_key(ref) or "")
    if not recipient_id or not name:
        raise Unmappable("the recipient has no identifier or no name (Reference.identifier, display)",
                         "Consent.provision.actor.reference")
    classes = [_data_classes(p, ctx) for p in permits]
    periods = [p.get("period") or (res.get("provision") or {}).get("period") or {} for p in permits]
    if any(c != classes[0] for c in classes) or any(p != periods[0] for p in periods):
        raise Unmappable("the permits differ in data or period; an IOP consent applies one set of data and "
                         "one period to all its purposes", "Consent.provision.provision")
    purposes = []
    for p in permits:
        for c in p.get("purpose", ()):
            if c.get("system") != ACT_REASON or c.get("code") not in PURPOSES:
                raise Unmappable(f"purpose {c.get('system')}|{c.get('code')} is not a v3-ActReason purpose of "
                                 "use an IOP consent records (" + ", ".join(PURPOSES) + ")",
                                 "Consent.provision.purpose")
            if c["code"] not in purposes:
                purposes.append(c["code"])
    if not purposes:
        raise Unmappable("no purpose of use: a Part 2 consent states what the disclosure is for",
                         "Consent.provision.purpose")
    revoked_on = date_part(ext_value(res, REVOCATION_EXT))
    if res.get("status") not in ("active", "inactive"):
        raise Unmappable(f"status {res.get('status')!r}: only an active or a revoked (inactive) consent is "
                         "one the client signed", "Consent.status")
    if res["status"] == "inactive" and revoked_on is None:
        raise Unmappable("an inactive consent without a revocation date (consent-revocation extension): "
                         "when disclosure stopped is unknown", "Consent.extension")
    signed_on = date_part(res.get("dateTime"))
    if signed_on is None:
        raise Unmappable("no dateTime: when the client signed is unknown", "Consent.dateTime")
    mrn = client_of(res, "patient", ix, ctx)
    orgs = res.get("organization") or [None]
    program_id = ix.resolve(orgs[0], ctx.systems.program)
    if program_id is None:
        raise Unmappable("organization does not name the disclosing program", "Consent.organization")
    return {"consent_id": ix.key_of(res, ctx.systems.consent), "client_mrn": mrn, "program_id": program_id,
            "recipient_id": recipient_id, "recipient_name": name, "recipient_kind": kind, "recipient_npi": npi,
            "purposes": purposes, "data_classes": classes[0], "signed_on": signed_on,
            "start": date_part(periods[0].get("start")) or signed_on, "end": date_part(periods[0].get("end")),
            "revoked_on": revoked_on}
