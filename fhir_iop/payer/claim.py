"""Billable days → FHIR R4 Claim (profile iop-claim): one per client, coverage and program per billing period.

* ``use`` claim, ``status`` active, ``type`` claim-type#professional and ``priority``
  processpriority#normal (both cited to the R4 spec pages in ``data/cited-codes.json``).
* One item per billable day: ``productOrService`` the HCPCS per-diem code (H0015 / S9480),
  ``revenue`` the NUBC revenue code (0906 / 0905) — both from the payer rules, ``servicedDate``,
  ``quantity`` 1 (per diem), ``encounter`` the day's attended Encounters by the mapping's own ids
  (``MappingContext.rid``), and on a day attended by telehealth the fhir-iop ``session-modality``
  extension (telehealth-video / telehealth-phone): no place-of-service code, POS 02/10 are unconfirmed
  (domain-codes.md §3d).
* ``diagnosis``: the enrollment's ICD-10-CM codes, principal first; every item points to all of them.
* Billing vs rendering provider: ``provider`` (the billing provider) is the program's Organization;
  the counselors who ran the billed services (the facilitators of each attended group session, the
  counselor of each counselling session) are the rendering providers: ``careTeam`` entries with
  ``role`` claimcareteamrole#primary ("Primary provider"; THO CodeSystem claimcareteamrole, codes
  primary / assist / supervisor / other, hl7.org/fhir/R4/valueset-claim-careteamrole.html) and
  ``provider`` the counselor's Practitioner, in order of first appearance; each item names its day's
  counselors in ``careTeamSequence``.
* ``insurance``: the Coverage and its prior authorization (``preAuthRef``); ``billablePeriod`` the
  period; ``created`` its last day (deterministic output).
* Telehealth vs in person: besides the item extension, the supporting Encounters tell it by their
  ``class`` (v3-ActCode VR virtual vs AMB ambulatory, the mapping's session-modality ConceptMap).
* The 42 CFR Part 2 labels when the site is a Part 2 program, like every resource about a client.

Revenue codes belong on institutional (UB-04) claims; the Claim is typed professional as the brief
asks and carries the revenue code on each item for payers that want it.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import date

from fhir_iop.mapping.common import CANONICAL, HCPCS, ICD10CM, PART2_LABELS, MappingContext, cited, cited_codes, ext_url
from fhir_iop.payer.rollup import IN_PERSON, BillableLine, IopRecords, Rollup

NUBC_REVENUE = "https://www.nubc.org/CodeSystem/RevenueCodes"
PROFILE = f"{CANONICAL}/StructureDefinition/iop-claim"
TELEHEALTH_EXT = ext_url("session-modality")
_TYPE, _PRIORITY = cited("claim-type-professional"), cited("process-priority-normal")
_RENDERING = cited("claim-careteamrole-primary")


def _coding(system: str, code: str) -> dict:
    """A Coding for a rules code, with the display of its citation when it has one."""
    for c in cited_codes().values():
        if c["system"] == system and c["code"] == code:
            return {"system": system, "code": code, "display": c["display"]}
    return {"system": system, "code": code}


def claim_id(ctx: MappingContext, coverage_id: str, program_id: str, start: date, end: date) -> str:
    return ctx.rid("claim", f"{coverage_id}|{program_id}|{start}|{end}")


def encounter_ref(ctx: MappingContext, kind: str, key: str) -> dict:
    return {"reference": f"Encounter/{ctx.rid(kind, key)}"}


def _item(seq: int, line: BillableLine, ctx: MappingContext, n_diagnoses: int, team: list[int]) -> dict:
    item = {"sequence": seq}
    if line.telehealth:  # the modality of the day's first telehealth service (video or telephone)
        modality = next(s.modality for s in line.services if s.modality != IN_PERSON)
        item["extension"] = [ctx.ext_coding("session-modality", modality)]
    if team:
        item["careTeamSequence"] = team
    if n_diagnoses:
        item["diagnosisSequence"] = list(range(1, n_diagnoses + 1))
    item |= {"revenue": {"coding": [_coding(NUBC_REVENUE, line.revenue)]},
             "productOrService": {"coding": [_coding(HCPCS, line.hcpcs)]},
             "servicedDate": line.day.isoformat(), "quantity": {"value": 1},
             "encounter": [encounter_ref(ctx, s.kind, s.key) for s in line.services]}
    return item


def claims(r: Rollup, records: IopRecords, ctx: MappingContext) -> list[dict]:
    """The Claims of a rollup, in client, program and coverage order."""
    coverages = {c.coverage_id: c for c in records.coverages}
    facilitators = {s.session_id: s.facilitators for s in records.group_sessions}
    counselor_of = {c.counseling_session_id: c.counselor_id for c in records.counseling_sessions}

    def rendering(line: BillableLine) -> list[str]:
        """The counselors who ran the day's attended services, in order."""
        out: list[str] = []
        for s in line.services:
            ids = facilitators.get(s.key.split("/", 1)[0], ()) if s.kind == "attendance" \
                else [counselor_of[s.key]] if s.key in counselor_of else []
            out += [i for i in ids if i not in out]
        return out

    enrollments = {e.enrollment_id: e for e in records.enrollments}
    groups: dict[tuple[str, str, str], list[BillableLine]] = defaultdict(list)
    for line in r.lines:
        groups[(line.client_mrn, line.program_id, line.coverage_id)].append(line)
    meta = {"profile": [PROFILE]}  # common.PROFILES lists what the record mapping stamps; claims are not in it
    if ctx.settings.part2_program:
        meta["security"] = list(PART2_LABELS)
    out = []
    for (mrn, program_id, coverage_id), lines in sorted(groups.items()):
        lines.sort(key=lambda x: (x.day, x.enrollment_id))
        diagnoses: list[str] = []
        for line in lines:
            for code in enrollments[line.enrollment_id].diagnoses:
                if code not in diagnoses:
                    diagnoses.append(code)
        cov = coverages[coverage_id]
        insurance = {"sequence": 1, "focal": True,
                     "coverage": ctx.ref("Coverage", "coverage", coverage_id, ctx.systems.coverage)}
        if cov.prior_auth_number:
            insurance["preAuthRef"] = [cov.prior_auth_number]
        claim = {"resourceType": "Claim", "id": claim_id(ctx, coverage_id, program_id, r.start, r.end),
                 "meta": meta, "status": "active", "type": {"coding": [_TYPE]}, "use": "claim",
                 "patient": ctx.client_ref(mrn),
                 "billablePeriod": {"start": r.start.isoformat(), "end": r.end.isoformat()},
                 "created": r.end.isoformat(), "provider": ctx.program_ref(program_id),
                 "priority": {"coding": [_PRIORITY]}}
        team: list[str] = []
        for line in lines:
            team += [c for c in rendering(line) if c not in team]
        if team:
            claim["careTeam"] = [{"sequence": i, "provider": ctx.counselor_ref(c), "role": {"coding": [_RENDERING]}}
                                 for i, c in enumerate(team, 1)]
        if diagnoses:
            claim["diagnosis"] = [{"sequence": i, "diagnosisCodeableConcept": {
                "coding": [{"system": ICD10CM, "code": code}]}} for i, code in enumerate(diagnoses, 1)]
        claim["insurance"] = [insurance]
        claim["item"] = [_item(i, line, ctx, len(diagnoses), [team.index(c) + 1 for c in rendering(line)])
                         for i, line in enumerate(lines, 1)]
        out.append(claim)
    return out
