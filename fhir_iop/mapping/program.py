"""program ⇄ Organization."""

from __future__ import annotations

from fhir_iop.mapping.common import NPI, FhirIndex, MappingContext, Unmappable, ext_code, identifier_value
from fhir_iop.records.model import Program


def address(r) -> list[dict]:
    a = {k: v for k, v in (("line", [r.address_line] if r.address_line else None), ("city", r.city),
                           ("state", r.state), ("postalCode", r.postal_code)) if v}
    return [a] if a else []


def current(items: list[dict] | None) -> dict:
    """The entry in use now: not ``old``, no ended period; official/home first."""
    live = [i for i in items or () if i.get("use") != "old" and not i.get("period", {}).get("end")]
    for use in ("official", "usual", "home"):
        for i in live:
            if i.get("use") == use:
                return i
    return live[0] if live else {}


def address_fields(resource: dict) -> dict:
    a = current(resource.get("address"))
    return {"address_line": (a.get("line") or [None])[0], "city": a.get("city"),
            "state": a.get("state"), "postal_code": a.get("postalCode")}


def telecom(system: str, resource: dict) -> str | None:
    for t in resource.get("telecom", ()):
        if t.get("system") == system:
            return t.get("value")
    return None


def to_fhir(p: Program, ctx: MappingContext, problems) -> list[dict]:
    ident = [{"system": ctx.systems.program, "value": p.program_id}]
    if p.npi:
        ident.append({"system": NPI, "value": p.npi})
    org = {"resourceType": "Organization", "id": ctx.rid("program", p.program_id),
           "meta": ctx.meta("program", False),
           "extension": [ctx.ext_coding("program-kind", p.kind)],
           "identifier": ident, "active": True, "name": p.name}
    if p.phone:
        org["telecom"] = [{"system": "phone", "value": p.phone, "use": "work"}]
    if addr := address(p):
        org["address"] = addr
    return [org]


def from_fhir(org: dict, ix: FhirIndex, ctx: MappingContext) -> dict:
    kind = ext_code(org, "program-kind")
    if kind is None:
        raise Unmappable("not an IOP program: no program-kind extension (payer and other "
                         "organisations map only as parts of the records that point to them)",
                         "Organization.extension")
    return {"program_id": ix.key_of(org, ctx.systems.program), "name": org.get("name"), "kind": kind,
            "npi": identifier_value(org, NPI), "phone": telecom("phone", org), **address_fields(org)}
