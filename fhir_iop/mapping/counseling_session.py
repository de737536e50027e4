"""counseling_session (individual and family) ⇄ Encounter (US Core Encounter).

Type: CPT 90832/90834/90837 by the minutes actually spent, 90846/90847 for family sessions, through
the ``counseling-kind-to-encounter-type`` ConceptMap.
"""

from __future__ import annotations

from fhir_iop.errors import Problem
from fhir_iop.mapping.common import client_of, CPT, FhirIndex, MappingContext, Unmappable, codings, ext_code
from fhir_iop.mapping.group_session import ENCOUNTER_STATUS, _modality, encounter_class, minutes_length
from fhir_iop.records.model import CounselingSession

TYPE_MAP = "counseling-kind-to-encounter-type"
STATUS_MAP = "counseling-status-to-encounter-status"


def to_fhir(s: CounselingSession, ctx: MappingContext, problems: list[Problem]) -> list[dict]:
    where = f"counseling session {s.counseling_session_id}"
    ctx.check_ref(where, "client_mrn", "clients", s.client_mrn, problems)
    ctx.check_ref(where, "enrollment_id", "enrollments", s.enrollment_id, problems)
    ctx.check_ref(where, "counselor_id", "counselors", s.counselor_id, problems)
    t = ctx.terminology
    minutes = s.minutes
    targets = t.translate(TYPE_MAP, "counseling-kind", s.kind, minutes=str(minutes))
    text = t.codes("counseling-kind")[s.kind]
    enc = {"resourceType": "Encounter", "id": ctx.rid("counseling_session", s.counseling_session_id),
           "meta": ctx.meta("counseling_session", True),
           "extension": [ctx.ext_coding("counseling-kind", s.kind),
                         ctx.ext_coding("counseling-status", s.status),
                         ctx.ext_coding("session-modality", s.modality)],
           "identifier": [{"system": ctx.systems.counseling_session, "value": s.counseling_session_id}],
           "status": t.translate(STATUS_MAP, "counseling-status", s.status)[0].code,
           "class": encounter_class(ctx, s.modality),
           "type": [{"coding": [x.coding() for x in targets], "text": text} if targets else {"text": text}],
           "subject": ctx.client_ref(s.client_mrn),
           "episodeOfCare": [ctx.enrollment_ref(s.enrollment_id)],
           "participant": [{"individual": ctx.counselor_ref(s.counselor_id)}],
           "period": {"start": s.start.isoformat(), "end": s.end.isoformat()}}
    if s.status == "completed":
        enc["length"] = minutes_length(minutes)
    if s.location:
        enc["location"] = [{"location": {"display": s.location}}]
    if enrolled := ctx.enrollments.get(s.enrollment_id):
        if enrolled[0] != s.client_mrn:
            problems.append(Problem(where, f"enrollment {s.enrollment_id!r} belongs to another client",
                                    field="enrollment_id"))
        enc["serviceProvider"] = ctx.program_ref(enrolled[1])
    return [enc]


def kind_of(enc: dict, ctx: MappingContext) -> str | None:
    kind = ext_code(enc, "counseling-kind")
    if kind:
        return kind
    for c in codings(enc.get("type")):
        if c.get("system") == CPT and (k := ctx.terminology.reverse(TYPE_MAP, CPT, c.get("code"))):
            return k
    return None


def from_fhir(enc: dict, ix: FhirIndex, ctx: MappingContext) -> dict:
    kind = kind_of(enc, ctx)
    if kind is None:
        raise Unmappable("type is not individual or family psychotherapy", "Encounter.type")
    mrn = client_of(enc, "subject", ix, ctx)
    episodes = enc.get("episodeOfCare") or []
    enrollment_id = ix.resolve(episodes[0], ctx.systems.enrollment) if episodes else None
    if enrollment_id is None:
        raise Unmappable("no episodeOfCare: a counselling session belongs to an enrollment",
                         "Encounter.episodeOfCare")
    counselor = next((ix.resolve(p.get("individual"), ctx.systems.counselor)
                      for p in enc.get("participant", ()) if p.get("individual")), None)
    if counselor is None:
        raise Unmappable("no participant resolves to a counselor", "Encounter.participant")
    status = ext_code(enc, "counseling-status") or ctx.terminology.reverse(
        STATUS_MAP, ENCOUNTER_STATUS, enc.get("status"))
    if status is None:
        raise Unmappable(f"status {enc.get('status')!r} is not a counselling session status", "Encounter.status")
    period = enc.get("period", {})
    return {"counseling_session_id": ix.key_of(enc, ctx.systems.counseling_session), "client_mrn": mrn,
            "enrollment_id": enrollment_id, "kind": kind, "status": status, "counselor_id": counselor,
            "start": period.get("start"), "end": period.get("end"),
            "modality": ext_code(enc, "session-modality") or _modality(enc, ctx),
            "location": (enc.get("location") or [{}])[0].get("location", {}).get("display")}
