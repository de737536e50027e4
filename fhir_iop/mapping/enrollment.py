"""enrollment ⇄ EpisodeOfCare + one Condition per diagnosis + CareTeam.

Status history, level changes, referral source, discharge reason and the weekly schedule travel
in fhir-iop extensions, so nothing of the record is lost; the FHIR status comes from the
``enrollment-status-to-episodeofcare-status`` ConceptMap.
"""

from __future__ import annotations

from datetime import timedelta

from fhir_iop.errors import Problem
from fhir_iop.mapping.common import (client_of, ICD10CM, FhirIndex, MappingContext, Unmappable, cited, codings,
                                     date_part, ext_code, ext_url)
from fhir_iop.records.model import Enrollment
from fhir_iop.terminology import cs_url

STATUS_MAP = "enrollment-status-to-episodeofcare-status"
LEVEL_EXT = ext_url("level-of-care")
SCHEDULE_EXT = ext_url("weekly-schedule")
_DA = cited("episode-type-da")
_ACTIVE = cited("condition-active")
_PROBLEM = cited("condition-problem-list")
_SUD_KINDS = ("substance-use", "co-occurring")


def _episode_status(ctx: MappingContext, status: str) -> str:
    return ctx.terminology.translate(STATUS_MAP, "enrollment-status", status)[0].code


def _history_periods(items, last_end):
    """(item, start, end) with each entry ending the day before the next one starts."""
    for i, item in enumerate(items):
        end = items[i + 1].since - timedelta(days=1) if i + 1 < len(items) else last_end
        if end is not None and end < item.since:  # same-day change: a one-day period
            end = item.since
        yield item, item.since, end


def _period(start, end) -> dict:
    p = {"start": start.isoformat()}
    if end is not None:
        p["end"] = end.isoformat()
    return p


def condition_id(ctx: MappingContext, e: Enrollment, code: str) -> str:
    return ctx.rid("diagnosis", f"{e.enrollment_id}|{code}")


def to_fhir(e: Enrollment, ctx: MappingContext, problems: list[Problem]) -> list[dict]:
    where = f"enrollment {e.enrollment_id}"
    ctx.check_ref(where, "client_mrn", "clients", e.client_mrn, problems)
    ctx.check_ref(where, "program_id", "programs", e.program_id, problems)
    ctx.check_ref(where, "primary_counselor", "counselors", e.primary_counselor, problems)
    for c in e.care_team:
        ctx.check_ref(where, "care_team", "counselors", c, problems)
    t = ctx.terminology
    patient = ctx.client_ref(e.client_mrn)
    ext = []
    if e.referral_source:
        ext.append(ctx.ext_coding("referral-source", e.referral_source))
    for lvl, start, end in _history_periods(e.level_history, e.discharged_on):
        ext.append({"url": LEVEL_EXT, "extension": [
            {"url": "level", "valueCoding": t.coding("program-level", lvl.level)},
            {"url": "period", "valuePeriod": _period(start, end)}]})
    if e.discharge_reason:
        ext.append(ctx.ext_coding("discharge-reason", e.discharge_reason))
    if e.schedule_days or e.schedule_start or e.track:
        sched = [{"url": "day", "valueCode": d} for d in e.schedule_days]
        if e.schedule_start:
            sched += [{"url": "start", "valueTime": e.schedule_start.isoformat()},
                      {"url": "end", "valueTime": e.schedule_end.isoformat()}]
        if e.track:
            sched.append({"url": "track", "valueCoding": t.coding("schedule-track", e.track)})
        ext.append({"url": SCHEDULE_EXT, "extension": sched})
    types = [{"coding": [t.coding("program-level", e.level)]}]
    if ctx.programs.get(e.program_id) in _SUD_KINDS:
        types.insert(0, {"coding": [_DA]})
    eoc = {"resourceType": "EpisodeOfCare", "id": ctx.rid("enrollment", e.enrollment_id),
           "meta": ctx.meta("enrollment", True), "extension": ext,
           "identifier": [{"system": ctx.systems.enrollment, "value": e.enrollment_id}],
           "status": _episode_status(ctx, e.status),
           "statusHistory": [
               {"extension": [ctx.ext_coding("enrollment-status", s.status)],
                "status": _episode_status(ctx, s.status), "period": _period(start, end)}
               for s, start, end in _history_periods(e.status_history, e.discharged_on)],
           "type": types, "patient": patient,
           "managingOrganization": ctx.program_ref(e.program_id)}
    out = [eoc]
    if e.admitted_on:
        eoc["period"] = _period(e.admitted_on, e.discharged_on)
    if e.diagnoses:
        eoc["diagnosis"] = []
        for rank, code in enumerate(e.diagnoses, 1):
            cid = condition_id(ctx, e, code)
            eoc["diagnosis"].append({"condition": {"reference": f"Condition/{cid}"}, "rank": rank})
            coding = {"system": ICD10CM, "code": code}
            if display := t.value_set_display("sud-diagnoses", ICD10CM, code):
                coding["display"] = display
            cond = {"resourceType": "Condition", "id": cid, "meta": ctx.meta("diagnosis", True),
                    "clinicalStatus": {"coding": [_ACTIVE]},
                    "category": [{"coding": [_PROBLEM]}], "code": {"coding": [coding]},
                    "subject": patient}
            if e.admitted_on:
                cond["recordedDate"] = e.admitted_on.isoformat()
            out.append(cond)
    if e.primary_counselor:
        eoc["careManager"] = ctx.counselor_ref(e.primary_counselor)
    if e.care_team:
        team_id = ctx.rid("care_team", e.enrollment_id)
        eoc["team"] = [{"reference": f"CareTeam/{team_id}"}]
        participants = []
        for c in e.care_team:
            role = ctx.counselors.get(c)
            if role is None:
                problems.append(Problem(where, f"care team member {c!r} has no counselor record "
                                        "(its role is required)", field="care_team"))
                continue
            participants.append({"role": [{"coding": [t.coding("counselor-role", role)]}],
                                 "member": ctx.counselor_ref(c)})
        out.append({"resourceType": "CareTeam", "id": team_id, "meta": ctx.meta("care_team", True),
                    "status": "inactive" if e.discharged_on else "active",
                    "name": f"IOP care team for enrollment {e.enrollment_id}",
                    "subject": patient, "participant": participants,
                    "managingOrganization": [ctx.program_ref(e.program_id)]})
    return out


# -- from FHIR ------------------------------------------------------------------------------------

def from_fhir(eoc: dict, ix: FhirIndex, ctx: MappingContext) -> dict:
    t = ctx.terminology
    mrn = client_of(eoc, "patient", ix, ctx)
    org = eoc.get("managingOrganization")
    program_id = ix.resolve(org, ctx.systems.program)
    if program_id is None:
        raise Unmappable(f"managingOrganization {org.get('reference')!r} does not resolve to the program's "
                         "Organization in this input"
                         if org else "no managingOrganization: an enrollment belongs to a program",
                         "EpisodeOfCare.managingOrganization")
    levels = []
    for ext in eoc.get("extension", ()):
        if ext.get("url") == LEVEL_EXT:
            sub = {s.get("url"): s for s in ext.get("extension", ())}
            levels.append({"level": sub.get("level", {}).get("valueCoding", {}).get("code"),
                           "since": date_part(sub.get("period", {}).get("valuePeriod", {}).get("start"))})
    if not levels:
        level = next((c["code"] for c in codings(eoc.get("type"))
                      if c.get("system") == cs_url("program-level")), None)
        if level is None:
            raise Unmappable("no IOP level of care (program-level type or level-of-care extension)",
                             "EpisodeOfCare.type")
        levels = [{"level": level, "since": date_part(eoc.get("period", {}).get("start"))}]
    history = []
    for h in eoc.get("statusHistory", ()):
        status = ext_code(h, "enrollment-status") or t.reverse(STATUS_MAP, "http://hl7.org/fhir/episode-of-care-status", h.get("status"))
        history.append({"status": status, "since": date_part(h.get("period", {}).get("start"))})
    if not history:
        status = t.reverse(STATUS_MAP, "http://hl7.org/fhir/episode-of-care-status", eoc.get("status"))
        if status is None:
            raise Unmappable(f"status {eoc.get('status')!r} has no IOP enrollment status", "EpisodeOfCare.status")
        history = [{"status": status, "since": date_part(eoc.get("period", {}).get("start"))}]
    diagnoses = []
    for d in sorted(eoc.get("diagnosis", ()), key=lambda d: d.get("rank", 1 << 30)):
        key = FhirIndex.ref_key(d.get("condition"))
        code = ix.conditions.get(key)
        if code is None:
            raise Unmappable(f"diagnosis {d.get('condition', {}).get('reference')!r} is not a Condition "
                             "with an ICD-10-CM code in this input", "EpisodeOfCare.diagnosis.condition")
        ix.consumed.add(key)
        diagnoses.append(code)
    care_team = []
    for team in eoc.get("team", ()):
        key = FhirIndex.ref_key(team)
        if key not in ix.care_teams:
            raise Unmappable(f"team {team.get('reference')!r} is not a CareTeam in this input",
                             "EpisodeOfCare.team")
        ix.consumed.add(key)
        for member in ix.care_teams[key]:
            cid = ix.resolve(member, ctx.systems.counselor)
            if cid is None:
                raise Unmappable("a care team member does not resolve to a Practitioner",
                                 "CareTeam.participant.member")
            care_team.append(cid)
    sched = next((e for e in eoc.get("extension", ()) if e.get("url") == SCHEDULE_EXT), {})
    sub = sched.get("extension", ())
    one = {s.get("url"): s for s in sub}
    period = eoc.get("period", {})
    return {"enrollment_id": ix.key_of(eoc, ctx.systems.enrollment), "client_mrn": mrn,
            "program_id": program_id, "referral_source": ext_code(eoc, "referral-source"),
            "status_history": history, "level_history": levels,
            "admitted_on": date_part(period.get("start")), "discharged_on": date_part(period.get("end")),
            "discharge_reason": ext_code(eoc, "discharge-reason"), "diagnoses": diagnoses,
            "primary_counselor": ix.resolve(eoc.get("careManager"), ctx.systems.counselor),
            "care_team": care_team,
            "schedule_days": [s["valueCode"] for s in sub if s.get("url") == "day"],
            "schedule_start": one.get("start", {}).get("valueTime"),
            "schedule_end": one.get("end", {}).get("valueTime"),
            "track": one.get("track", {}).get("valueCoding", {}).get("code")}


def index(resource: dict, ix: FhirIndex, refs: list[str]) -> None:
    """First-pass facts: a Condition's ICD-10-CM code, a CareTeam's members."""
    if resource["resourceType"] == "Condition":
        code = next((c.get("code") for c in codings(resource.get("code"))
                     if c.get("system") == ICD10CM), None)
        for r in refs:
            ix.conditions[r] = code
    elif resource["resourceType"] == "CareTeam":
        members = [p["member"] for p in resource.get("participant", ()) if p.get("member")]
        for r in refs:
            ix.care_teams[r] = members
