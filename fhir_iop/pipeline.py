"""The two directions, end to end: IOP record files → FHIR resources, and FHIR files → IOP records.

Both stream: memory grows with the small indexes (programs, counselors, clients, enrollments,
group sessions on the way in; their FHIR counterparts on the way back), not with the number of
records. A record that fails is reported as a :class:`Problem` and produces nothing; the rest
still map.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import ValidationError

from fhir_iop.errors import InputError, Problem
from fhir_iop.fhir import r4
from fhir_iop.fhir.io import read_fhir
from fhir_iop.mapping import (care_plan, client, consent, counseling_session, counselor, coverage, drug_screen,
                              enrollment, group_session, mat_medication, outside_medication, program, referral)
from fhir_iop.mapping.common import KEY_SYSTEMS, FhirIndex, MappingContext, Unmappable, codings
from fhir_iop.records.io import read_records, record_type_for
from fhir_iop.records.model import (RECORD_TYPES, Attendance, CarePlan, CarePlanGoal, Client, Consent,
                                    CounselingSession, Counselor, Coverage, DrugScreen, Enrollment, GroupSession,
                                    MatAdministration, MatDispense, MatMedication, OutsideMedication, Program, Record,
                                    Referral)

TO_FHIR = {
    Program: program.to_fhir, Counselor: counselor.to_fhir, Client: client.to_fhir,
    Coverage: coverage.to_fhir, Enrollment: enrollment.to_fhir, GroupSession: group_session.to_fhir,
    Attendance: group_session.attendance_to_fhir, CounselingSession: counseling_session.to_fhir,
    MatMedication: mat_medication.to_fhir, MatAdministration: mat_medication.administration_to_fhir,
    MatDispense: mat_medication.dispense_to_fhir, DrugScreen: drug_screen.to_fhir,
    CarePlan: care_plan.to_fhir, CarePlanGoal: care_plan.goal_to_fhir, Consent: consent.to_fhir,
    Referral: referral.to_fhir, OutsideMedication: outside_medication.to_fhir,
}

#: resource type -> (record type, mapper) for resources that are records of their own
FROM_FHIR = {
    "Patient": (Client, client.from_fhir), "Practitioner": (Counselor, counselor.from_fhir),
    "Organization": (Program, program.from_fhir), "Coverage": (Coverage, coverage.from_fhir),
    "EpisodeOfCare": (Enrollment, enrollment.from_fhir),
    "MedicationRequest": (MatMedication, mat_medication.from_fhir),
    "MedicationAdministration": (MatAdministration, mat_medication.administration_from_fhir),
    "MedicationDispense": (MatDispense, mat_medication.dispense_from_fhir),
    "DiagnosticReport": (DrugScreen, drug_screen.from_fhir),
    "CarePlan": (CarePlan, care_plan.from_fhir), "Goal": (CarePlanGoal, care_plan.goal_from_fhir),
    "Consent": (Consent, consent.from_fhir),
    "ServiceRequest": (Referral, referral.from_fhir),
    "MedicationStatement": (OutsideMedication, outside_medication.from_fhir),
}
#: resource types that map only as parts of another record, and what they are part of
PARTS = {"Condition": "the diagnosis of an enrollment (EpisodeOfCare.diagnosis) or the reason for a referral "
                      "(ServiceRequest.reasonReference)",
         "CareTeam": "the care team of an enrollment (EpisodeOfCare.team)",
         "Observation": "a result of a drug screen (DiagnosticReport.result)",
         "Specimen": "the specimen of a drug screen (DiagnosticReport.specimen)"}
#: first-pass indexers per resource type
INDEXERS = {"Condition": (enrollment.index, referral.index), "CareTeam": (enrollment.index,),
            "Observation": (drug_screen.index,), "Specimen": (drug_screen.index,), "CarePlan": (care_plan.index,)}


def record_files(inputs: Iterable[Path]) -> list[Path]:
    """Input files in dependency order (programs first, attendance after group sessions)."""
    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            files += [f for f in sorted(p.iterdir()) if f.is_file() and record_type_for(f)]
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"{p}: no such file or directory")
    order = {t: i for i, t in enumerate(RECORD_TYPES)}
    return sorted(files, key=lambda f: order.get(record_type_for(f), len(order)))


def _remember(rec: Record, ctx: MappingContext) -> None:
    if isinstance(rec, Program):
        ctx.programs[rec.program_id] = rec.kind
    elif isinstance(rec, Counselor):
        ctx.counselors[rec.counselor_id] = rec.role
    elif isinstance(rec, Client):
        ctx.clients.add(rec.mrn)
    elif isinstance(rec, Enrollment):
        ctx.enrollments[rec.enrollment_id] = (rec.client_mrn, rec.program_id, tuple(rec.diagnoses))
    elif isinstance(rec, MatMedication):
        ctx.mat_orders[rec.mat_id] = rec
        ctx.mat_by_client.setdefault(rec.client_mrn, []).append(rec.mat_id)
    elif isinstance(rec, CarePlan):
        ctx.plans[rec.plan_id] = (rec.client_mrn, tuple(rec.goal_ids))


def map_records(records: Iterable[Record], ctx: MappingContext, where: str = "",
                strict: bool = False) -> Iterator[dict | Problem]:
    """Records (already validated) → resources; a record with a problem yields only the problem."""
    for rec in records:
        problems: list[Problem] = []
        resources = TO_FHIR[type(rec)](rec, ctx, problems)
        if strict and not problems:
            for res in resources:
                for loc, msg in r4.structure_errors(res):
                    problems.append(Problem(f"{where}{res['resourceType']}/{res['id']}",
                                            f"fhir-iop emitted an invalid resource: {msg}", field=loc,
                                            code="exception"))
        if problems:
            for p in problems:
                yield p if not where or p.where.startswith(where) else \
                    Problem(f"{where.rstrip(': ')} ({p.where})", p.message, p.field, p.severity, p.code)
            continue
        _remember(rec, ctx)
        yield from resources


def to_fhir(inputs: Iterable[Path], ctx: MappingContext | None = None, record_context: dict | None = None,
            strict: bool = False) -> Iterator[dict | Problem]:
    """IOP record files (CSV or NDJSON, one per record type) → FHIR resources and problems."""
    from fhir_iop.records.model import default_context
    ctx = ctx or MappingContext()
    record_context = record_context or default_context(ctx.settings.timezone, ctx.terminology)
    files = record_files(inputs)
    ctx.seen_types |= {t.file_stem for f in files if (t := record_type_for(f))}
    for path in files:
        for item in read_records(path, record_context):
            if isinstance(item, Problem):
                yield item
                continue
            line, rec = item
            yield from map_records((rec,), ctx, f"{path}:{line}: ", strict)


# -- from FHIR ----------------------------------------------------------------------------------

def _refs(resource: dict, full_url: str | None) -> list[str]:
    refs = [f"{resource['resourceType']}/{resource.get('id')}"]
    if full_url:
        refs.append(full_url)
    return refs


def _index(resources: Iterable, ix: FhirIndex, ctx: MappingContext,
           invalid: dict[str, list[Problem]], checked: bool = False) -> None:
    """Pass 1: structure-check each resource (fhir.resources R4B; not when ``checked``), then index the valid ones."""
    systems = ctx.systems
    for item in resources:
        if isinstance(item, Problem):
            continue
        where, res, full_url = item
        errors = [] if checked else r4.structure_errors(res)
        if errors:
            invalid[where] = [Problem(where, f"not valid R4: {msg}", field=f"{res.get('resourceType')}.{loc}"
                                      if not loc.startswith(str(res.get("resourceType"))) else loc,
                                      code="structure") for loc, msg in errors]
            continue
        rt = res["resourceType"]
        refs = _refs(res, full_url)
        attr = KEY_SYSTEMS.get(rt)
        if rt == "Patient":
            key = client.mrn_of(res, ctx)
        elif attr is not None:
            key = ix.key_of(res, getattr(systems, attr))
        elif rt == "Encounter" and not res.get("subject"):
            key = ix.key_of(res, systems.group_session)
        else:
            key = None
        if key is not None:
            for r in refs:
                ix.keys[r] = key
        if rt == "Organization" and res.get("name"):
            for r in refs:
                ix.names[r] = res["name"]
        if rt == "Organization" and _is_program(res):
            for r in refs:
                ix.facts[r] = "program"
        if rt == "Practitioner" and (name := client.name_text(res)):
            for r in refs:
                ix.names[r] = name
        if rt == "Patient":
            client.index(res, ix, refs, ctx)
        for indexer in INDEXERS.get(rt, ()):
            indexer(res, ix, refs)
        if rt == "Coverage":
            for p in res.get("payor", ()):
                if k := FhirIndex.ref_key(p):
                    ix.consumed.add(k)


def _classify(res: dict, ctx: MappingContext):
    """(record type, mapper) for one resource, or raise Unmappable with the reason."""
    rt = res["resourceType"]
    if rt == "MedicationRequest" and outside_medication.is_outside_request(res, ctx):
        return OutsideMedication, outside_medication.from_fhir
    if rt in FROM_FHIR:
        return FROM_FHIR[rt]
    if rt == "Encounter":
        if not res.get("subject"):
            if group_session.is_group_service(res):
                return GroupSession, group_session.from_fhir
            raise Unmappable("an Encounter without subject is an IOP group session only when typed as "
                             "group psychotherapy (CPT 90853 / HCPCS H0005)", "Encounter.type")
        if res.get("partOf") and (group_session.is_attendance(res) or group_session.is_group_service(res)):
            return Attendance, group_session.attendance_from_fhir
        if counseling_session.kind_of(res, ctx):
            return CounselingSession, counseling_session.from_fhir
        types = ", ".join(f"{c.get('system', '?')}|{c.get('code')}" for c in codings(res.get("type"))) or "none"
        raise Unmappable(f"not an IOP service: type ({types}) is not group, individual or family "
                         "psychotherapy", "Encounter.type")
    raise Unmappable(f"{rt} carries no concept of IOP records", rt)


def _clean(data: dict) -> dict:
    return {k: v for k, v in data.items() if v is not None and v != []}


def from_fhir(inputs: Iterable[Path], ctx: MappingContext | None = None,
              record_context: dict | None = None, checked: bool = False) -> Iterator[Record | Problem]:
    """FHIR files (Bundle, resource, NDJSON; JSON or XML) → IOP records and problems.

    ``checked``: the input was structure-checked already (the FHIR store validates every write), so
    the fhir.resources check of pass 1 — most of the time of a run — is skipped.

    Two passes per run: the first indexes what references point to, the second maps.
    """
    from fhir_iop.records.model import default_context
    ctx = ctx or MappingContext()
    record_context = record_context or default_context(ctx.settings.timezone, ctx.terminology)
    paths = list(inputs)
    for p in paths:
        if not p.is_file():
            raise InputError(f"{p}: no such file")
    ix = FhirIndex()
    invalid: dict[str, list[Problem]] = {}
    for p in paths:
        _index(read_fhir(p), ix, ctx, invalid, checked)
    client.resolve_links(ix)
    parts: dict[str, tuple[str, list[str]]] = {}  # PARTS resources: key -> (where, refs)
    for p in paths:
        for item in read_fhir(p):
            if isinstance(item, Problem):
                yield item
                continue
            where, res, full_url = item
            if where in invalid:
                yield from invalid[where]
                continue
            rt = res["resourceType"]
            if rt in PARTS:
                parts[_refs(res, full_url)[0]] = (where, _refs(res, full_url))
                continue
            if rt == "Patient" and (linked := client.linked_to(res, full_url, ix)):
                yield Problem(where, f"linked (Patient.link seealso) to {linked} of this input: mapped as that "
                              "client, whose empty fields it fills", field="Patient.link", severity="information",
                              code="informational")
                continue
            try:
                model, mapper = _classify(res, ctx)
                if rt == "Organization" and not _is_program(res) and \
                        any(r in ix.consumed for r in _refs(res, full_url)):
                    continue  # a payer: mapped as part of each Coverage
                data = mapper(res, ix, ctx)
            except Unmappable as e:
                yield Problem(where, str(e), field=e.field, severity="warning", code="not-supported")
                continue
            try:
                yield model.model_validate(_clean(data), context=record_context)
            except ValidationError as e:
                for err in e.errors(include_url=False):
                    loc = ".".join(str(x) for x in err["loc"]) or None
                    yield Problem(where, "the IOP record would be invalid: "
                                  + err["msg"].removeprefix("Value error, "), field=loc)
    for where, refs in parts.values():
        if not any(r in ix.consumed for r in refs):
            rt = refs[0].split("/", 1)[0]
            if rt == "Observation" and not drug_screen.is_drug_result(ix.facts.get(refs[0]), ctx):
                yield Problem(where, "not an IOP concept: an Observation maps to IOP records only as a result of a "
                              "drug screen (a drug-analyte code), and this one is none; kept in the store",
                              field="Observation.code", severity="warning", code="not-supported")
                continue
            yield Problem(where, f"not mapped: this {rt} maps to IOP records only as {PARTS[rt]}, and no "
                          "record mapped from this input includes it", severity="warning", code="not-supported")


def _is_program(res: dict) -> bool:
    from fhir_iop.mapping.common import ext_code
    return ext_code(res, "program-kind") is not None
