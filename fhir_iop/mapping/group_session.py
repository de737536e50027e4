"""group_session + attendance ⇄ a session-level Encounter and one Encounter per client.

The session-level Encounter (no subject: it is the group's) carries the topic, kind, facilitators
and modality. Each client's Encounter is ``partOf`` it, linked to the client's EpisodeOfCare,
typed CPT 90853 (and HCPCS H0005 in substance-use programs) through the
``session-kind-to-encounter-type`` ConceptMap, and keeps absences as cancelled Encounters.
"""

from __future__ import annotations

from fhir_iop.errors import Problem
from fhir_iop.mapping.common import (client_of, CPT, HCPCS, UCUM, FhirIndex, MappingContext, SessionInfo,
                                     Unmappable, codings, ext_code)
from fhir_iop.records.model import Attendance, GroupSession

TYPE_MAP = "session-kind-to-encounter-type"
CLASS_MAP = "session-modality-to-encounter-class"
ATTENDANCE_MAP = "attendance-status-to-encounter-status"
ENCOUNTER_STATUS = "http://hl7.org/fhir/encounter-status"
GROUP_CODES = {(CPT, "90853"), (HCPCS, "H0005")}


def encounter_class(ctx: MappingContext, modality: str) -> dict:
    return ctx.terminology.translate(CLASS_MAP, "session-modality", modality)[0].coding()


def session_types(ctx: MappingContext, kind: str, program_kind: str | None) -> list[dict]:
    targets = ctx.terminology.translate(TYPE_MAP, "session-kind", kind, program_kind=program_kind or "")
    text = ctx.terminology.codes("session-kind")[kind]
    return [{"coding": [t.coding()], "text": text} for t in targets] or [{"text": text}]


def minutes_length(minutes: int) -> dict:
    return {"value": minutes, "unit": "min", "system": UCUM, "code": "min"}


def to_fhir(s: GroupSession, ctx: MappingContext, problems: list[Problem]) -> list[dict]:
    where = f"group session {s.session_id}"
    ctx.check_ref(where, "program_id", "programs", s.program_id, problems)
    for f in s.facilitators:
        ctx.check_ref(where, "facilitators", "counselors", f, problems)
    start, end = s.start.isoformat(), s.end.isoformat()
    ctx.sessions[s.session_id] = SessionInfo(s.program_id, s.kind, s.modality, start, end)
    enc = {"resourceType": "Encounter", "id": ctx.rid("group_session", s.session_id),
           "meta": ctx.meta("group_session", False),
           "extension": [ctx.ext_coding("session-kind", s.kind), ctx.ext_coding("curriculum-topic", s.topic),
                         ctx.ext_coding("session-modality", s.modality)],
           "identifier": [{"system": ctx.systems.group_session, "value": s.session_id}],
           "status": "finished", "class": encounter_class(ctx, s.modality),
           "type": session_types(ctx, s.kind, ctx.programs.get(s.program_id)),
           "participant": [{"individual": ctx.counselor_ref(f)} for f in s.facilitators],
           "period": {"start": start, "end": end},
           "serviceProvider": ctx.program_ref(s.program_id)}
    if s.location:
        enc["location"] = [{"location": {"display": s.location}}]
    return [enc]


def attendance_to_fhir(a: Attendance, ctx: MappingContext, problems: list[Problem]) -> list[dict]:
    where = f"attendance {a.session_id}/{a.client_mrn}"
    session = ctx.sessions.get(a.session_id)
    if session is None:
        problems.append(Problem(where, f"group session {a.session_id!r} is not in this run's "
                                "group_sessions", field="session_id"))
        return []
    ctx.check_ref(where, "client_mrn", "clients", a.client_mrn, problems)
    ctx.check_ref(where, "enrollment_id", "enrollments", a.enrollment_id, problems)
    enrolled = ctx.enrollments.get(a.enrollment_id)
    if enrolled and enrolled[0] != a.client_mrn:
        problems.append(Problem(where, f"enrollment {a.enrollment_id!r} belongs to another client",
                                field="enrollment_id"))
    key = f"{a.session_id}/{a.client_mrn}"
    status = ctx.terminology.translate(ATTENDANCE_MAP, "attendance-status", a.status)[0].code
    enc = {"resourceType": "Encounter", "id": ctx.rid("attendance", key),
           "meta": ctx.meta("attendance", True),
           "extension": [ctx.ext_coding("attendance-status", a.status)],
           "identifier": [{"system": ctx.systems.attendance, "value": key}],
           "status": status, "class": encounter_class(ctx, session.modality),
           "type": session_types(ctx, session.kind, ctx.programs.get(session.program_id)),
           "subject": ctx.client_ref(a.client_mrn),
           "episodeOfCare": [ctx.enrollment_ref(a.enrollment_id)],
           "period": {"start": session.start, "end": session.end},
           "partOf": ctx.session_ref(a.session_id),
           "serviceProvider": ctx.program_ref(session.program_id)}
    if a.minutes_attended:
        enc["length"] = minutes_length(a.minutes_attended)
    return [enc]


# -- from FHIR ------------------------------------------------------------------------------------

def is_group_service(enc: dict) -> bool:
    return ext_code(enc, "session-kind") is not None or any(
        (c.get("system"), c.get("code")) in GROUP_CODES for c in codings(enc.get("type")))


def is_attendance(enc: dict) -> bool:
    return ext_code(enc, "attendance-status") is not None


def from_fhir(enc: dict, ix: FhirIndex, ctx: MappingContext) -> dict:
    kind = ext_code(enc, "session-kind")
    if kind is None:
        raise Unmappable("a group session's kind (process, psychoeducation...) is not recorded: "
                         "no session-kind extension", "Encounter.extension")
    topic = ext_code(enc, "curriculum-topic")
    if topic is None:
        raise Unmappable("no curriculum-topic extension", "Encounter.extension")
    program_id = ix.resolve(enc.get("serviceProvider"), ctx.systems.program)
    if program_id is None:
        raise Unmappable("serviceProvider does not name the program", "Encounter.serviceProvider")
    period = enc.get("period", {})
    return {"session_id": ix.key_of(enc, ctx.systems.group_session), "program_id": program_id,
            "topic": topic, "kind": kind,
            "facilitators": [ix.resolve(p.get("individual"), ctx.systems.counselor)
                             for p in enc.get("participant", ()) if p.get("individual")],
            "start": period.get("start"), "end": period.get("end"),
            "modality": ext_code(enc, "session-modality") or _modality(enc, ctx),
            "location": (enc.get("location") or [{}])[0].get("location", {}).get("display")}


def _modality(enc: dict, ctx: MappingContext) -> str | None:
    c = enc.get("class") or {}
    return ctx.terminology.reverse(CLASS_MAP, c.get("system"), c.get("code"))


def attendance_from_fhir(enc: dict, ix: FhirIndex, ctx: MappingContext) -> dict:
    session_id = ix.resolve(enc.get("partOf"), ctx.systems.group_session)
    if session_id is None:
        raise Unmappable("partOf does not resolve to a group session Encounter", "Encounter.partOf")
    mrn = client_of(enc, "subject", ix, ctx)
    episodes = enc.get("episodeOfCare") or []
    enrollment_id = ix.resolve(episodes[0], ctx.systems.enrollment) if episodes else None
    if enrollment_id is None:
        raise Unmappable("episodeOfCare does not name the client's enrollment", "Encounter.episodeOfCare")
    status = ext_code(enc, "attendance-status") or ctx.terminology.reverse(
        ATTENDANCE_MAP, ENCOUNTER_STATUS, enc.get("status"))
    if status is None:
        raise Unmappable(f"status {enc.get('status')!r} is not an attendance", "Encounter.status")
    length = enc.get("length") or {}
    minutes = length.get("value", 0) if length.get("code", "min") == "min" else None
    if minutes is None:
        raise Unmappable("length is not in minutes", "Encounter.length")
    return {"session_id": session_id, "client_mrn": mrn, "enrollment_id": enrollment_id,
            "status": status, "minutes_attended": int(minutes)}
