"""counselor ⇄ Practitioner."""

from __future__ import annotations

from fhir_iop.mapping.common import NPI, FhirIndex, MappingContext, Unmappable, ext_code, identifier_value
from fhir_iop.mapping.program import telecom
from fhir_iop.records.model import Counselor


def to_fhir(c: Counselor, ctx: MappingContext, problems) -> list[dict]:
    ident = [{"system": ctx.systems.counselor, "value": c.counselor_id}]
    if c.npi:
        ident.append({"system": NPI, "value": c.npi})
    pr = {"resourceType": "Practitioner", "id": ctx.rid("counselor", c.counselor_id),
          "meta": ctx.meta("counselor", False),
          "extension": [ctx.ext_coding("counselor-role", c.role)],
          "identifier": ident, "active": True,
          "name": [{"family": c.family_name, "given": list(c.given_names)}]}
    tel = [{"system": s, "value": v, "use": "work"} for s, v in (("phone", c.phone), ("email", c.email)) if v]
    if tel:
        pr["telecom"] = tel
    if c.credentials:
        pr["qualification"] = [{"code": {"text": c.credentials}}]
    return [pr]


def from_fhir(pr: dict, ix: FhirIndex, ctx: MappingContext) -> dict:
    role = ext_code(pr, "counselor-role")
    if role is None:
        raise Unmappable("no counselor-role extension: an IOP staff record needs the person's role",
                         "Practitioner.extension")
    name = (pr.get("name") or [{}])[0]
    quals = [q.get("code", {}).get("text") for q in pr.get("qualification", ())]
    return {"counselor_id": ix.key_of(pr, ctx.systems.counselor), "family_name": name.get("family"),
            "given_names": name.get("given"), "role": role,
            "credentials": next((q for q in quals if q), None), "npi": identifier_value(pr, NPI),
            "phone": telecom("phone", pr), "email": telecom("email", pr)}
