"""mat_medication ⇄ MedicationRequest; in-clinic doses ⇄ MedicationAdministration; take-homes ⇄ MedicationDispense.

The order's product is RxNorm through the ``mat-drug-to-rxnorm`` ConceptMap, with the fhir-iop
``mat-drug`` coding beside it (a translation in the same CodeableConcept) so the round trip is
exact; routes are SNOMED (where the reference confirms one) plus v3 RouteOfAdministration through
``mat-route-to-route``. The treatment period (start, end) is ``dosageInstruction.timing.repeat.
boundsPeriod``: it bounds when the doses are taken, which is what the record says;
``dispenseRequest.validityPeriod`` would instead say how long the prescription may be filled.
R4 MedicationRequest has no episodeOfCare element, so the enrollment travels in the fhir-iop
``enrollment`` extension. Administrations and dispenses repeat the order's product (looked up in
this run's orders) and point back to it through ``request`` / ``authorizingPrescription``.
"""

from __future__ import annotations

from fhir_iop.errors import Problem
from fhir_iop.mapping.common import (client_of, UCUM, FhirIndex, MappingContext, Unmappable, codings, date_part,
                                     ext_url, ext_value)
from fhir_iop.records.model import MatAdministration, MatDispense, MatMedication
from fhir_iop.terminology import cs_url

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
DRUG_MAP = "mat-drug-to-rxnorm"
ROUTE_MAP = "mat-route-to-route"
ENROLLMENT_EXT = ext_url("enrollment")
UCUM_UNITS = ("mg", "mL")                 # dose units the records use, all UCUM codes
COUNT_UNITS = ("tablet", "film")          # dispensed units without a UCUM code: unit text only
TIME_UNITS = {"d": "day", "wk": "week", "mo": "month"}
ORDER_STATUSES = ("active", "on-hold", "completed", "stopped")
NOT_ORDERS = ("proposal", "plan", "directive", "option")


# -- IOP → FHIR -------------------------------------------------------------------------------------

def medication(ctx: MappingContext, drug: str) -> dict:
    rx = [t.coding() for t in ctx.terminology.translate(DRUG_MAP, "mat-drug", drug, RXNORM)]
    mat = ctx.terminology.coding("mat-drug", drug)
    return {"coding": [*rx, mat], "text": mat["display"]}


def route(ctx: MappingContext, code: str) -> dict:
    return {"coding": [t.coding() for t in ctx.terminology.translate(ROUTE_MAP, "mat-route", code)],
            "text": ctx.terminology.codes("mat-route")[code]}


def quantity(value: float, unit: str) -> dict:
    if unit in COUNT_UNITS:
        return {"value": value, "unit": unit}
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def _amount(value: float) -> str:
    """A dose as written in a sentence: 16 (not 16.0), 0.5, never rounded."""
    return str(int(value)) if value == int(value) else repr(value)


def _how_often(count: int, period: int, unit: str) -> str:
    times = {1: "once", 2: "twice"}.get(count, f"{count} times")
    name = TIME_UNITS[unit]
    return f"{times} a {name}" if period == 1 else f"{times} every {period} {name}s"


def dosage_text(ctx: MappingContext, m: MatMedication) -> str:
    drug = ctx.terminology.codes("mat-drug")[m.drug]
    how = ctx.terminology.codes("mat-route")[m.route].lower()
    often = _how_often(m.frequency_count, m.frequency_period, m.frequency_unit)
    text = f"{drug}: {_amount(m.dose)} {m.dose_unit} {how}, {often}"
    return text + (f", from {m.start} to {m.end}" if m.end else f", from {m.start}")


def order_ref(ctx: MappingContext, mat_id: str) -> dict:
    return ctx.ref("MedicationRequest", "mat_medication", mat_id, ctx.systems.mat_medication)


def _check_enrollment(ctx: MappingContext, where: str, eid: str | None, mrn: str, problems: list[Problem]):
    ctx.check_ref(where, "enrollment_id", "enrollments", eid, problems)
    enrolled = ctx.enrollments.get(eid) if eid else None
    if enrolled and enrolled[0] != mrn:
        problems.append(Problem(where, f"enrollment {eid!r} belongs to another client", field="enrollment_id"))


def dosage_instruction(ctx: MappingContext, m: MatMedication) -> dict:
    bounds = {"start": m.start.isoformat()}
    if m.end:
        bounds["end"] = m.end.isoformat()
    return {"text": dosage_text(ctx, m),
            "timing": {"repeat": {"boundsPeriod": bounds, "frequency": m.frequency_count,
                                  "period": m.frequency_period, "periodUnit": m.frequency_unit}},
            "route": route(ctx, m.route), "doseAndRate": [{"doseQuantity": quantity(m.dose, m.dose_unit)}]}


def to_fhir(m: MatMedication, ctx: MappingContext, problems: list[Problem]) -> list[dict]:
    where = f"mat order {m.mat_id}"
    ctx.check_ref(where, "client_mrn", "clients", m.client_mrn, problems)
    ctx.check_ref(where, "prescriber_id", "counselors", m.prescriber_id, problems)
    _check_enrollment(ctx, where, m.enrollment_id, m.client_mrn, problems)
    req = {"resourceType": "MedicationRequest", "id": ctx.rid("mat_medication", m.mat_id),
           "meta": ctx.meta("mat_medication", True)}
    if m.enrollment_id:  # R4 MedicationRequest has no episodeOfCare element
        req["extension"] = [{"url": ENROLLMENT_EXT, "valueReference": ctx.enrollment_ref(m.enrollment_id)}]
    req.update({"identifier": [{"system": ctx.systems.mat_medication, "value": m.mat_id}],
                "status": m.status, "intent": "order", "medicationCodeableConcept": medication(ctx, m.drug),
                "subject": ctx.client_ref(m.client_mrn), "authoredOn": m.start.isoformat(),
                "requester": ctx.counselor_ref(m.prescriber_id),
                "dosageInstruction": [dosage_instruction(ctx, m)]})
    return [req]


def _order(ctx: MappingContext, where: str, rec, problems: list[Problem]) -> MatMedication | None:
    """The order an administration or dispense belongs to, or a problem saying why it is unknown."""
    order = ctx.mat_orders.get(rec.mat_id)
    if order is None:
        if "mat_medications" in ctx.seen_types:
            ctx.check_ref(where, "mat_id", "mat_medications", rec.mat_id, problems)
        else:
            problems.append(Problem(where, f"order {rec.mat_id!r} is unknown: mat_medications is not part of "
                                    "this run, and the resource needs the order's medication", field="mat_id"))
        return None
    if order.client_mrn != rec.client_mrn:
        problems.append(Problem(where, f"order {rec.mat_id!r} belongs to client {order.client_mrn!r}",
                                field="client_mrn"))
    return order


def administration_to_fhir(a: MatAdministration, ctx: MappingContext, problems: list[Problem]) -> list[dict]:
    where = f"mat administration {a.administration_id}"
    ctx.check_ref(where, "client_mrn", "clients", a.client_mrn, problems)
    ctx.check_ref(where, "performer_id", "counselors", a.performer_id, problems)
    order = _order(ctx, where, a, problems)
    if order is None:
        return []
    res = {"resourceType": "MedicationAdministration", "id": ctx.rid("mat_administration", a.administration_id),
           "meta": ctx.meta("mat_administration", True),
           "identifier": [{"system": ctx.systems.mat_administration, "value": a.administration_id}],
           "status": a.status, "medicationCodeableConcept": medication(ctx, order.drug),
           "subject": ctx.client_ref(a.client_mrn), "effectiveDateTime": a.administered_at.isoformat(),
           "request": order_ref(ctx, a.mat_id),
           "dosage": {"text": f"{_amount(a.dose)} {a.dose_unit} {ctx.terminology.codes('mat-route')[a.route].lower()}",
                      "route": route(ctx, a.route), "dose": quantity(a.dose, a.dose_unit)}}
    if order.enrollment_id:
        res["context"] = ctx.enrollment_ref(order.enrollment_id)
    if a.performer_id:
        res["performer"] = [{"actor": ctx.counselor_ref(a.performer_id)}]
    return [res]


def dispense_to_fhir(d: MatDispense, ctx: MappingContext, problems: list[Problem]) -> list[dict]:
    where = f"mat dispense {d.dispense_id}"
    ctx.check_ref(where, "client_mrn", "clients", d.client_mrn, problems)
    ctx.check_ref(where, "performer_id", "counselors", d.performer_id, problems)
    order = _order(ctx, where, d, problems)
    if order is None:
        return []
    res = {"resourceType": "MedicationDispense", "id": ctx.rid("mat_dispense", d.dispense_id),
           "meta": ctx.meta("mat_dispense", True),
           "identifier": [{"system": ctx.systems.mat_dispense, "value": d.dispense_id}],
           "status": d.status, "medicationCodeableConcept": medication(ctx, order.drug),
           "subject": ctx.client_ref(d.client_mrn),
           "authorizingPrescription": [order_ref(ctx, d.mat_id)],
           "quantity": quantity(d.quantity, d.quantity_unit),
           "daysSupply": {"value": d.days_supply, "unit": "days", "system": UCUM, "code": "d"},
           "whenHandedOver": d.dispensed_at.isoformat(),
           "dosageInstruction": [dosage_instruction(ctx, order)]}
    if order.enrollment_id:
        res["context"] = ctx.enrollment_ref(order.enrollment_id)
    if d.performer_id:
        res["performer"] = [{"actor": ctx.counselor_ref(d.performer_id)}]
    return [res]


# -- FHIR → IOP -------------------------------------------------------------------------------------

def _drug(res: dict, ctx: MappingContext) -> str:
    """The mat-drug code of a resource's medication[x], or Unmappable saying why it is not MAT."""
    rt = res["resourceType"]
    where = f"{rt}.medicationCodeableConcept"
    concept = res.get("medicationCodeableConcept")
    if "medicationReference" in res:
        ref = (res.get("medicationReference") or {}).get("reference") or ""
        med = next((c for c in res.get("contained") or () if isinstance(c, dict)
                    and c.get("resourceType") == "Medication" and f"#{c.get('id')}" == ref), None)
        if med is None:
            raise Unmappable(f"medicationReference to a Medication resource ({ref or 'no reference'}) is not "
                             "supported: MAT maps from medicationCodeableConcept or a contained Medication",
                             f"{rt}.medicationReference")
        concept, where = med.get("code"), f"{rt}.contained.code"
    t = ctx.terminology
    found = codings(concept)
    for c in found:
        if c.get("system") == cs_url("mat-drug") and c.get("code") in t.codes("mat-drug"):
            return c["code"]
    rx = [c.get("code") for c in found if c.get("system") == RXNORM]
    for code in rx:
        if drug := t.reverse(DRUG_MAP, RXNORM, code):
            return drug
    if rx:
        raise Unmappable(f"medication RxNorm {', '.join(map(str, rx))} is not a MAT product in ConceptMap "
                         f"{DRUG_MAP} (mappings/ConceptMap-{DRUG_MAP}.json)", where)
    given = ", ".join(f"{c.get('system', '?')}|{c.get('code')}" for c in found) or "none"
    raise Unmappable(f"medication has no RxNorm code (codings: {given}); MAT products are matched by RxNorm", where)


def _client(res: dict, ix: FhirIndex, ctx: MappingContext) -> str:
    mrn = client_of(res, "subject", ix, ctx)
    return mrn


def _counselor(ref: dict | None, ix: FhirIndex, ctx: MappingContext) -> str | None:
    """The counselor a Reference names, or None (absent, unresolved, or not a Practitioner)."""
    if not ref:
        return None
    r = ref.get("reference") or ""
    if "/" in r and not r.startswith("urn:") and r.rstrip("/").split("/")[-2] != "Practitioner":
        return None
    return ix.resolve(ref, ctx.systems.counselor)


def _route(concept: dict | None, ctx: MappingContext, where: str) -> str:
    found = codings(concept)
    for c in found:
        if code := ctx.terminology.reverse(ROUTE_MAP, c.get("system"), c.get("code")):
            return code
    given = ", ".join(f"{c.get('system', '?')}|{c.get('code')}" for c in found) or "none"
    raise Unmappable(f"route ({given}) is not a MAT route in ConceptMap {ROUTE_MAP}", where)


def _dose(q: dict | None, where: str) -> tuple[float, str]:
    if not q or q.get("value") is None:
        raise Unmappable("no dose quantity", where)
    if q.get("code") not in UCUM_UNITS or q.get("system", UCUM) != UCUM:
        raise Unmappable(f"dose unit {q.get('code') or q.get('unit')!r} is not UCUM mg or mL", where)
    return q["value"], q["code"]


def from_fhir(req: dict, ix: FhirIndex, ctx: MappingContext) -> dict:
    drug = _drug(req, ctx)
    if req.get("status") not in ORDER_STATUSES:
        raise Unmappable(f"status {req.get('status')!r} is not an order status fhir-iop keeps "
                         f"({', '.join(ORDER_STATUSES)})", "MedicationRequest.status")
    if req.get("intent") in NOT_ORDERS:
        raise Unmappable(f"intent {req.get('intent')!r} is not an order", "MedicationRequest.intent")
    mrn = _client(req, ix, ctx)
    prescriber = _counselor(req.get("requester"), ix, ctx)
    if prescriber is None:
        r = (req.get("requester") or {}).get("reference")
        raise Unmappable(f"requester {r!r} does not resolve to a Practitioner in this input" if r
                         else "no requester: a MAT order needs its prescriber", "MedicationRequest.requester")
    dosages = req.get("dosageInstruction") or [{}]
    d = dosages[0]
    repeat = (d.get("timing") or {}).get("repeat") or {}
    missing = [name for name, v in (("dose", (d.get("doseAndRate") or [{}])[0].get("doseQuantity")),
                                    ("route", d.get("route")), ("timing", repeat.get("period"))) if not v]
    if missing:
        raise Unmappable(f"no dosage {'/'.join(missing)} (a MAT order needs dose, route and timing "
                         "in dosageInstruction[0])", "MedicationRequest.dosageInstruction")
    if len(dosages) > 1:
        raise Unmappable("more than one dosageInstruction (a tapering or split dose) is not supported",
                         "MedicationRequest.dosageInstruction")
    dose, unit = _dose(d["doseAndRate"][0]["doseQuantity"], "MedicationRequest.dosageInstruction.doseAndRate")
    timing = "MedicationRequest.dosageInstruction.timing.repeat"
    if repeat.get("periodUnit") not in TIME_UNITS:
        raise Unmappable(f"timing period unit {repeat.get('periodUnit')!r} is not d, wk or mo", timing)
    if "frequencyMax" in repeat or "periodMax" in repeat or repeat["period"] != int(repeat["period"]):
        raise Unmappable("a timing range (frequencyMax/periodMax) or a fractional period is not supported", timing)
    bounds = repeat.get("boundsPeriod") or {}
    enrollment = ext_value(req, ENROLLMENT_EXT)
    return {"mat_id": ix.key_of(req, ctx.systems.mat_medication), "client_mrn": mrn,
            "enrollment_id": ix.resolve(enrollment, ctx.systems.enrollment) if enrollment else None,
            "drug": drug, "dose": dose, "dose_unit": unit,
            "route": _route(d["route"], ctx, "MedicationRequest.dosageInstruction.route"),
            "frequency_count": repeat.get("frequency", 1), "frequency_period": int(repeat["period"]),
            "frequency_unit": repeat["periodUnit"], "prescriber_id": prescriber,
            "start": date_part(bounds.get("start") or req.get("authoredOn")), "end": date_part(bounds.get("end")),
            "status": req["status"]}


def _order_of(ref: dict | None, ix: FhirIndex, ctx: MappingContext, where: str) -> str:
    if not ref:
        raise Unmappable("no reference to the MAT order (MedicationRequest)", where)
    mat_id = ix.resolve(ref, ctx.systems.mat_medication)
    if mat_id is None:
        raise Unmappable(f"{ref.get('reference')!r} does not resolve to a MedicationRequest in this input", where)
    return mat_id


def administration_from_fhir(res: dict, ix: FhirIndex, ctx: MappingContext) -> dict:
    _drug(res, ctx)  # a MAT product, or Unmappable
    if res.get("status") not in ("completed", "not-done"):
        raise Unmappable(f"status {res.get('status')!r} is neither completed nor not-done",
                         "MedicationAdministration.status")
    mat_id = _order_of(res.get("request"), ix, ctx, "MedicationAdministration.request")
    mrn = _client(res, ix, ctx)
    dosage = res.get("dosage") or {}
    dose, unit = _dose(dosage.get("dose"), "MedicationAdministration.dosage.dose")
    if not dosage.get("route"):
        raise Unmappable("no dosage.route", "MedicationAdministration.dosage.route")
    when = res.get("effectiveDateTime") or (res.get("effectivePeriod") or {}).get("start")
    performer = next((c for p in res.get("performer") or () if (c := _counselor(p.get("actor"), ix, ctx))), None)
    return {"administration_id": ix.key_of(res, ctx.systems.mat_administration), "mat_id": mat_id,
            "client_mrn": mrn, "administered_at": when, "dose": dose, "dose_unit": unit,
            "route": _route(dosage["route"], ctx, "MedicationAdministration.dosage.route"),
            "status": res["status"], "performer_id": performer}


def dispense_from_fhir(res: dict, ix: FhirIndex, ctx: MappingContext) -> dict:
    _drug(res, ctx)
    if res.get("status") not in ("completed", "cancelled"):
        raise Unmappable(f"status {res.get('status')!r} is neither completed nor cancelled",
                         "MedicationDispense.status")
    mat_id = _order_of((res.get("authorizingPrescription") or [None])[0], ix, ctx,
                       "MedicationDispense.authorizingPrescription")
    mrn = _client(res, ix, ctx)
    q = res.get("quantity") or {}
    if q.get("value") is None:
        raise Unmappable("no quantity", "MedicationDispense.quantity")
    if q.get("system") == UCUM and q.get("code") == "mL":
        unit = "mL"
    elif "code" not in q and q.get("unit") in COUNT_UNITS:
        unit = q["unit"]
    else:
        raise Unmappable(f"quantity unit {q.get('code') or q.get('unit')!r} is not mL (UCUM), tablet or film",
                         "MedicationDispense.quantity")
    days = res.get("daysSupply") or {}
    if days.get("value") is None or days.get("code") != "d" or days["value"] != int(days["value"]):
        raise Unmappable("no daysSupply in whole days (UCUM d)", "MedicationDispense.daysSupply")
    if not res.get("whenHandedOver"):
        raise Unmappable("no whenHandedOver", "MedicationDispense.whenHandedOver")
    performer = next((c for p in res.get("performer") or () if (c := _counselor(p.get("actor"), ix, ctx))), None)
    return {"dispense_id": ix.key_of(res, ctx.systems.mat_dispense), "mat_id": mat_id, "client_mrn": mrn,
            "dispensed_at": res["whenHandedOver"], "quantity": q["value"], "quantity_unit": unit,
            "days_supply": int(days["value"]), "status": res["status"], "performer_id": performer}
