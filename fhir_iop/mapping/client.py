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


# -- linked Patients: an EHR's record of one of our clients (fhir_iop.sync.pull links it) -------------
#
# A pulled Patient that carries a client's MRN is stored as the EHR's own resource with ``link``
# ``{other: Patient/<ours>, type: seealso}``. Reading back, it is not a client of its own: references to it
# resolve to the client it links to, and its demographics fill that client's empty fields (the program's
# own values win). A Patient recorded by another system (``meta.source``) that carries a client's MRN
# (the site's MRN system or ``mrn_match_systems``) but no link — pulled before the client was loaded — is
# read the same way when the client's own Patient is in the input.

LINK_TYPES = ("seealso",)
_LINKED, _PENDING, _OURS, _BY_MRN = "linked:", "pending:", "client:", "mrn:"


def index(pt: dict, ix: FhirIndex, refs: list[str], ctx: MappingContext) -> None:
    """First pass: remember where a Patient links to (or which client's MRN it carries), and its demographics."""
    for link in pt.get("link") or ():
        target = FhirIndex.ref_key(link.get("other"))
        if link.get("type") in LINK_TYPES and target and target not in refs:
            for r in refs:
                ix.patient_links[r] = target
            ix.facts.setdefault(_LINKED + target, []).append(_demographics(pt))
            return
    if not (pt.get("meta") or {}).get("source"):  # the program's own Patient (or one written through the API)
        ix.facts[_OURS + (mrn_of(pt, ctx) or "")] = refs[0]
        return
    systems = {ctx.systems.mrn, *ctx.settings.mrn_match_systems}
    mrn = next((i["value"] for i in pt.get("identifier") or () if i.get("system") in systems and i.get("value")), None)
    if mrn is not None:
        for r in refs:
            ix.patient_links[r] = _BY_MRN + mrn
        ix.facts[_PENDING + refs[0]] = _demographics(pt)


def resolve_links(ix: FhirIndex) -> None:
    """After the first pass: references to a linked Patient name the client it links to."""
    for ref, target in list(ix.patient_links.items()):
        if target.startswith(_BY_MRN):  # carries a client's MRN: linked if that client's Patient is here
            ours = ix.facts.get(_OURS + target[len(_BY_MRN):])
            if ours is None:
                del ix.patient_links[ref]
                continue
            ix.patient_links[ref] = target = ours
            if (demographics := ix.facts.pop(_PENDING + ref, None)) is not None:
                ix.facts.setdefault(_LINKED + ours, []).append(demographics)
        if target in ix.keys and target not in ix.patient_links:
            ix.keys[ref] = ix.keys[target]


def linked_to(pt: dict, full_url: str | None, ix: FhirIndex) -> str | None:
    """The Patient (of this input) that ``pt`` links to, if it is a linked record of that client."""
    target = ix.patient_links.get(f"Patient/{pt.get('id')}") or (full_url and ix.patient_links.get(full_url))
    return target if target and target in ix.keys and target not in ix.patient_links else None


def name_text(res: dict) -> str | None:
    """A person's current name as one string (Practitioner names for display-only references)."""
    n = current(res.get("name"))
    return n.get("text") or " ".join([*n.get("prefix", ()), *n.get("given", ()), n.get("family", "")]).strip() or None


def _demographics(pt: dict) -> dict:
    name = current(pt.get("name"))
    contact = next((c for c in pt.get("contact", ())
                    if any(x.get("code") == "C" for x in codings(c.get("relationship")))), None)
    cname = (contact or {}).get("name", {})
    return {"family_name": name.get("family"), "given_names": name.get("given") or None,
            "birth_date": pt.get("birthDate"), "gender": pt.get("gender"),
            "phone": telecom("phone", pt), "email": telecom("email", pt), **address_fields(pt),
            "emergency_contact_name": cname.get("text") or " ".join(
                [*cname.get("given", ()), cname.get("family", "")]).strip() or None if contact else None,
            "emergency_contact_phone": telecom("phone", contact) if contact else None}


_ADDRESS = ("address_line", "city", "state", "postal_code")
_CONTACT = ("emergency_contact_name", "emergency_contact_phone")


def _fill(data: dict, outside: dict) -> None:
    """Our empty fields from an outside record; an address or contact only as a whole."""
    for group in (*((k,) for k in outside if k not in _ADDRESS + _CONTACT), _ADDRESS, _CONTACT):
        if all(data.get(k) is None for k in group) and any(outside.get(k) is not None for k in group):
            data.update({k: outside.get(k) for k in group})


def from_fhir(pt: dict, ix: FhirIndex, ctx: MappingContext) -> dict:
    data = {"mrn": mrn_of(pt, ctx), **_demographics(pt)}
    for outside in ix.facts.get(f"{_LINKED}Patient/{pt.get('id')}", ()):
        _fill(data, outside)
    if not data["family_name"] or not data["given_names"]:
        raise Unmappable("an IOP client needs a family and a given name", "Patient.name")
    return data

