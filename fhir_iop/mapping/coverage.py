"""coverage ⇄ Coverage (US Core Coverage), prior authorization in an extension."""

from __future__ import annotations

from fhir_iop.mapping.common import (client_of, FhirIndex, MappingContext, Unmappable, cited, codings, date_part,
                                     ext_url)
from fhir_iop.records.model import Coverage

_MB = cited("identifier-type-mb")
PRIOR_AUTH = ext_url("prior-authorization")


def _period(start, end) -> dict:
    return {k: v.isoformat() for k, v in (("start", start), ("end", end)) if v}


def to_fhir(c: Coverage, ctx: MappingContext, problems) -> list[dict]:
    ctx.check_ref(f"coverage {c.coverage_id}", "client_mrn", "clients", c.client_mrn, problems)
    cov = {"resourceType": "Coverage", "id": ctx.rid("coverage", c.coverage_id),
           "meta": ctx.meta("coverage", True),
           "identifier": [{"system": ctx.systems.coverage, "value": c.coverage_id},
                          {"type": {"coding": [_MB]}, "system": f"{ctx.systems.payer}/{c.payer_id}/member",
                           "value": c.member_id}],
           "status": c.status, "subscriberId": c.member_id,
           "beneficiary": ctx.client_ref(c.client_mrn),
           "relationship": {"coding": [cited(f"relationship-{c.subscriber_relationship}")]},
           "payor": [{"identifier": {"system": ctx.systems.payer, "value": c.payer_id},
                      "display": c.payer_name}]}
    if period := _period(c.start, c.end):
        cov["period"] = period
    if c.prior_auth_number:
        ext = [{"url": "number", "valueString": c.prior_auth_number}]
        if period := _period(c.prior_auth_start, c.prior_auth_end):
            ext.append({"url": "period", "valuePeriod": period})
        cov["extension"] = [{"url": PRIOR_AUTH, "extension": ext}]
    return [cov]


def from_fhir(cov: dict, ix: FhirIndex, ctx: MappingContext) -> dict:
    mrn = client_of(cov, "beneficiary", ix, ctx)
    payor = (cov.get("payor") or [None])[0]
    payer_id = ix.resolve(payor, ctx.systems.payer)
    if payer_id is None:
        raise Unmappable("payor does not resolve to a payer identifier", "Coverage.payor")
    payer_ref = FhirIndex.ref_key(payor)
    member = cov.get("subscriberId") or next(
        (i.get("value") for i in cov.get("identifier", ())
         if any(c.get("code") == "MB" for c in codings(i.get("type")))), None)
    rel = next((c.get("code") for c in codings(cov.get("relationship"))), "self")
    pa = next((e for e in cov.get("extension", ()) if e.get("url") == PRIOR_AUTH), {})
    sub = {e.get("url"): e for e in pa.get("extension", ())}
    pa_period = sub.get("period", {}).get("valuePeriod", {})
    period = cov.get("period", {})
    return {"coverage_id": ix.key_of(cov, ctx.systems.coverage), "client_mrn": mrn, "payer_id": payer_id,
            "payer_name": payor.get("display") or ix.names.get(payer_ref) or payer_id,
            "member_id": member, "status": cov.get("status"), "subscriber_relationship": rel,
            "start": date_part(period.get("start")), "end": date_part(period.get("end")),
            "prior_auth_number": sub.get("number", {}).get("valueString"),
            "prior_auth_start": date_part(pa_period.get("start")),
            "prior_auth_end": date_part(pa_period.get("end"))}
