"""client ⇄ Patient (US Core Patient)."""

from __future__ import annotations

from fhir_iop.mapping.common import FhirIndex, MappingContext, Unmappable, cited, codings
from fhir_iop.mapping.program import address, address_fields, current, telecom
from fhir_iop.records.model import Client

_MR = cited("identifier-type-mr")
_EMERGENCY = cited("contact-emergency")


def to_fhir(c: Client, ctx: MappingContext, problems) -> list[dict]:
    pt = {"resourceType": "Patient", "id": ctx.rid("client", c.mrn), "meta": ctx.meta("client", True),
          "identifier": [{"use": "usual", "type": {"coding": [_MR]}, "system": ctx.systems.mrn,
                          "value": c.mrn}],
          "name": [{"use": "official", "family": c.family_name, "given": list(c.given_names)}],
          "birthDate": c.birth_date.isoformat()}
    if c.gender:
        pt["gender"] = c.gender
    tel = [t for t in ({"system": "phone", "value": c.phone, "use": "home"} if c.phone else None,
                       {"system": "email", "value": c.email} if c.email else None) if t]
    if tel:
        pt["telecom"] = tel
    if addr := address(c):
        pt["address"] = addr
    if c.emergency_contact_name:
        contact = {"relationship": [{"coding": [_EMERGENCY]}], "name": {"text": c.emergency_contact_name}}
        if c.emergency_contact_phone:
            contact["telecom"] = [{"system": "phone", "value": c.emergency_contact_phone}]
        pt["contact"] = [contact]
    return [pt]


def mrn_of(pt: dict, ctx: MappingContext) -> str | None:
    """The MRN: the site's MRN identifier, else one typed MR, else the first identifier."""
    idents = pt.get("identifier", ())
    for pred in (lambda i: i.get("system") == ctx.systems.mrn,
                 lambda i: any(c.get("code") == "MR" for c in codings(i.get("type"))),
                 lambda i: True):
        for i in idents:
            if i.get("value") and pred(i):
                return i["value"]
    return pt.get("id")


def from_fhir(pt: dict, ix: FhirIndex, ctx: MappingContext) -> dict:
    name = current(pt.get("name"))
    if not name.get("family") or not name.get("given"):
        raise Unmappable("an IOP client needs a family and a given name", "Patient.name")
    contact = next((c for c in pt.get("contact", ())
                    if any(x.get("code") == "C" for x in codings(c.get("relationship")))), None)
    cname = (contact or {}).get("name", {})
    return {"mrn": mrn_of(pt, ctx), "family_name": name.get("family"), "given_names": name.get("given"),
            "birth_date": pt.get("birthDate"), "gender": pt.get("gender"),
            "phone": telecom("phone", pt), "email": telecom("email", pt), **address_fields(pt),
            "emergency_contact_name": cname.get("text") or " ".join(
                [*cname.get("given", ()), cname.get("family", "")]).strip() or None if contact else None,
            "emergency_contact_phone": telecom("phone", contact) if contact else None}
