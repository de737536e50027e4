"""IOP → FHIR → IOP gives back the input: the example clinic, every encoding, and generated records."""

from __future__ import annotations

import io
from collections import defaultdict
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_iop import pipeline
from fhir_iop.fhir import r4
from fhir_iop.fhir.io import BundleWriter, NdjsonWriter
from fhir_iop.mapping.common import MappingContext
from fhir_iop.records.io import CsvRecordWriter, read_records
from fhir_iop.interpret import interpret
from fhir_iop.records.model import (RECORD_TYPES, Attendance, Client, CounselingSession, Counselor, Coverage,
                                    DrugScreen, Enrollment, GroupSession, LevelChange, MatMedication, Program,
                                    StatusChange, default_context)
from fhir_iop.terminology import load_terminology

CLINIC = Path(__file__).resolve().parents[1] / "examples" / "clinic"


def read_all(directory: Path, interpreted: bool = False) -> dict[type, list]:
    """Records of a directory; with ``interpreted``, drug screens carry the MAT-aware flags that
    fhir-iop fills in on the way to FHIR (the form they come back in)."""
    ctx = default_context()
    out = defaultdict(list)
    for f in pipeline.record_files([directory]):
        for item in read_records(f, ctx):
            assert not hasattr(item, "message"), str(item)
            out[type(item[1])].append(item[1])
    if interpreted:
        orders = defaultdict(list)
        for o in out[MatMedication]:
            orders[o.client_mrn].append(o)
        out[DrugScreen] = [interpret(s, orders[s.client_mrn], ctx["terminology"], ctx["tz"]) for s in out[DrugScreen]]
    return out


def by_type(items) -> dict[type, list]:
    out = defaultdict(list)
    for item in items:
        assert not hasattr(item, "message"), str(item)
        out[type(item)].append(item)
    return out


def write_bundle(resources, path: Path, encoding="json"):
    with open(path, "wb") as f:
        w = BundleWriter(f, "transaction", encoding)
        for r in resources:
            w.write(r)
        w.close()


def resources_of(directory: Path) -> list[dict]:
    items = list(pipeline.to_fhir([directory], strict=False))
    problems = [i for i in items if not isinstance(i, dict)]
    assert problems == [], [str(p) for p in problems[:5]]
    return items


def test_example_clinic_round_trip_json(tmp_path):
    original = read_all(CLINIC, interpreted=True)
    assert set(original) == set(RECORD_TYPES), "the example clinic has every record type"
    bundle = tmp_path / "clinic.json"
    write_bundle(resources_of(CLINIC), bundle)
    back = by_type(pipeline.from_fhir([bundle]))
    for model, records in original.items():
        assert back[model] == records, model.__name__


def test_example_clinic_round_trip_xml_and_ndjson(tmp_path):
    original = read_all(CLINIC, interpreted=True)
    resources = resources_of(CLINIC)
    write_bundle(resources, tmp_path / "clinic.xml", "xml")
    nd = NdjsonWriter(tmp_path / "nd")
    for r in resources:
        nd.write(r)
    nd.close()
    for inputs in ([tmp_path / "clinic.xml"], sorted((tmp_path / "nd").glob("*.ndjson"))):
        back = by_type(pipeline.from_fhir(inputs))
        for model, records in original.items():
            assert sorted(back[model], key=lambda r: r.key()) == sorted(records, key=lambda r: r.key()), \
                (inputs[0].suffix, model.__name__)


def test_example_clinic_records_round_trip_through_csv_writer(tmp_path):
    original = read_all(CLINIC)
    for model, records in original.items():
        buf = io.StringIO()
        w = CsvRecordWriter(buf, model)
        for r in records:
            w.write(r)
        path = tmp_path / f"{model.file_stem}.csv"
        path.write_text(buf.getvalue(), encoding="utf-8")
    assert read_all(tmp_path) == original


def test_mapping_twice_gives_the_same_resources():
    first = orjson.dumps(resources_of(CLINIC))
    second = orjson.dumps(resources_of(CLINIC))
    assert first == second
    ids = [(r["resourceType"], r["id"]) for r in orjson.loads(first)]
    assert len(ids) == len(set(ids)), "every resource has its own id"


def test_every_emitted_resource_is_valid_r4_and_profiled():
    resources = resources_of(CLINIC)
    assert len(resources) > 900
    for res in resources:
        assert r4.structure_errors(res) == [], (res["resourceType"], res["id"])
        assert res["meta"]["profile"][0].startswith("http://fhir-iop.org/fhir/StructureDefinition/iop-")


def test_part2_labels_on_every_resource_about_a_client():
    labelled = {"Patient", "Coverage", "EpisodeOfCare", "Condition", "CareTeam", "DiagnosticReport", "Observation",
                "Specimen", "MedicationRequest", "MedicationAdministration", "MedicationDispense", "CarePlan",
                "Goal", "Consent", "ServiceRequest", "MedicationStatement"}
    for res in resources_of(CLINIC):
        codes = {(s["system"].rsplit("/", 1)[-1], s["code"]) for s in res["meta"].get("security", ())}
        about_client = res["resourceType"] in labelled or (res["resourceType"] == "Encounter" and "subject" in res)
        if about_client:
            assert {("v3-Confidentiality", "R"), ("v3-ActCode", "42CFRPart2"), ("v3-ActCode", "SUD"),
                    ("v3-ActCode", "NORDSCLCD")} <= codes, (res["resourceType"], res["id"])
        else:
            assert codes == set(), (res["resourceType"], res["id"])


def test_absences_are_kept_as_cancelled_encounters():
    original = read_all(CLINIC)
    absent = [a for a in original[Attendance] if a.status in ("absent", "excused")]
    assert absent, "the example clinic has absences"
    encounters = {r["identifier"][0]["value"]: r for r in resources_of(CLINIC) if r["resourceType"] == "Encounter"}
    for a in absent:
        enc = encounters[f"{a.session_id}/{a.client_mrn}"]
        assert enc["status"] == "cancelled"
        assert "length" not in enc
        assert enc["partOf"]["identifier"]["value"] == a.session_id


# -- generated records (property-based) -------------------------------------------------------

TERMS = load_terminology()
TZ = timezone(timedelta(hours=-5))
ids = st.from_regex(r"[A-Z][A-Z0-9]{2,8}", fullmatch=True)
names = st.from_regex(r"[A-Z][a-z]{1,10}( [A-Z][a-z]{1,8})?", fullmatch=True)


def code(cs_id):
    return st.sampled_from(sorted(TERMS.codes(cs_id)))


days = st.dates(min_value=date(2024, 1, 1), max_value=date(2027, 12, 31))


@st.composite
def clinics(draw):
    """A small, consistent clinic: every reference resolves."""
    prog = Program(program_id=draw(ids), name=draw(names), kind=draw(code("program-kind")),
                   phone=draw(st.none() | st.just("555-0100")), city=draw(st.none() | names),
                   state=draw(st.none() | st.just("NJ")), postal_code=draw(st.none() | st.just("07001")))
    counselors = [Counselor(counselor_id=f"C{i}", family_name=draw(names), given_names=draw(st.lists(names, min_size=1, max_size=2)),
                            role=draw(code("counselor-role")), credentials=draw(st.none() | st.sampled_from(["LCSW", "LADC, CADC"])),
                            npi=draw(st.none() | st.just("1234567893")), email=draw(st.none() | st.just("c@example.org")))
                  for i in range(draw(st.integers(1, 3)))]
    staff = [c.counselor_id for c in counselors]
    clients, coverages, enrollments, sessions, attendance, counseling = [], [], [], [], [], []
    for i in range(draw(st.integers(1, 3))):
        mrn = f"M{i}"
        clients.append(Client(mrn=mrn, family_name=draw(names), given_names=draw(st.lists(names, min_size=1, max_size=3)),
                              birth_date=draw(st.dates(min_value=date(1940, 1, 1), max_value=date(2008, 1, 1))),
                              gender=draw(st.sampled_from(["male", "female", "other", "unknown"])),
                              phone=draw(st.none() | st.just("555-1234")), address_line=draw(st.none() | names),
                              emergency_contact_name=draw(st.none() | names)))
        if draw(st.booleans()):
            start = draw(days)
            coverages.append(Coverage(coverage_id=f"COV{i}", client_mrn=mrn, payer_id=draw(ids), payer_name=draw(names),
                                      member_id=draw(ids), start=start, end=draw(st.none() | st.just(start + timedelta(days=90))),
                                      subscriber_relationship=draw(st.sampled_from(["self", "spouse", "child"])),
                                      prior_auth_number=draw(st.none() | ids)))
        admitted = draw(days)
        n_status = draw(st.integers(1, 3))
        statuses = [StatusChange(status="referred", since=admitted - timedelta(days=draw(st.integers(0, 10))))]
        statuses += [StatusChange(status=draw(st.sampled_from(["active", "on-hold"])), since=admitted + timedelta(days=7 * k))
                     for k in range(n_status)]
        discharged = None
        if draw(st.booleans()):
            discharged = admitted + timedelta(days=7 * n_status + draw(st.integers(0, 20)))
            statuses.append(StatusChange(status=draw(st.sampled_from(["completed", "left-against-advice", "transferred", "stepped-down"])),
                                         since=discharged))
        levels = [LevelChange(level=draw(code("program-level")), since=admitted + timedelta(days=14 * k))
                  for k in range(draw(st.integers(1, 2)))]
        if discharged and levels[-1].since > discharged:
            levels = levels[:1]
        eid = f"E{i}"
        sched = draw(st.booleans())
        enrollments.append(Enrollment(
            enrollment_id=eid, client_mrn=mrn, program_id=prog.program_id,
            referral_source=draw(st.none() | code("referral-source")), status_history=statuses,
            level_history=levels, admitted_on=admitted, discharged_on=discharged,
            discharge_reason=draw(code("discharge-reason")) if discharged else None,
            diagnoses=draw(st.lists(st.sampled_from(["F11.20", "F10.20", "F12.10", "F99", "F19.20"]), unique=True, max_size=3)),
            primary_counselor=draw(st.none() | st.sampled_from(staff)),
            care_team=draw(st.lists(st.sampled_from(staff), unique=True)),
            schedule_days=draw(st.lists(st.sampled_from(["mon", "tue", "wed", "thu", "fri", "sat"]), unique=True)) if sched else [],
            schedule_start=time(9, 0) if sched else None, schedule_end=time(12, 0) if sched else None,
            track=draw(st.none() | code("schedule-track"))))
    for j in range(draw(st.integers(0, 3))):
        start = datetime.combine(draw(days), time(draw(st.integers(6, 18)), 0), TZ)
        sid = f"GS{j}"
        sessions.append(GroupSession(session_id=sid, program_id=prog.program_id, topic=draw(code("curriculum-topic")),
                                     kind=draw(code("session-kind")), facilitators=draw(st.lists(st.sampled_from(staff), min_size=1, unique=True)),
                                     start=start, end=start + timedelta(minutes=draw(st.integers(60, 240))),
                                     modality=draw(code("session-modality")), location=draw(st.none() | names)))
        for e in enrollments:
            status = draw(code("attendance-status"))
            attendance.append(Attendance(session_id=sid, client_mrn=e.client_mrn, enrollment_id=e.enrollment_id, status=status,
                                         minutes_attended=0 if status in ("absent", "excused") else draw(st.integers(1, 240))))
    for k, e in enumerate(enrollments):
        if draw(st.booleans()):
            start = datetime.combine(draw(days), time(10, 0), TZ)
            counseling.append(CounselingSession(
                counseling_session_id=f"CS{k}", client_mrn=e.client_mrn, enrollment_id=e.enrollment_id,
                kind=draw(code("counseling-kind")), status=draw(code("counseling-status")), counselor_id=draw(st.sampled_from(staff)),
                start=start, end=start + timedelta(minutes=draw(st.integers(5, 90))), modality=draw(code("session-modality"))))
    return {Program: [prog], Counselor: counselors, Client: clients, Coverage: coverages, Enrollment: enrollments,
            GroupSession: sessions, Attendance: attendance, CounselingSession: counseling}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clinics())
def test_generated_records_round_trip(tmp_path_factory, clinic):
    ctx = MappingContext()
    ctx.seen_types |= {m.file_stem for m in clinic}
    records = [r for model in clinic for r in clinic[model]]
    out = list(pipeline.map_records(records, ctx, strict=True))
    problems = [o for o in out if not isinstance(o, dict)]
    assert problems == []
    path = tmp_path_factory.mktemp("gen") / "bundle.json"
    write_bundle(out, path)
    back = by_type(pipeline.from_fhir([path]))
    for model, recs in clinic.items():
        assert back[model] == recs, model.__name__


def test_example_clinic_screens_are_read_against_mat():
    """The clinic's screens, read against its MAT orders, show all three findings."""
    from collections import Counter
    flags = Counter(r.flag for s in read_all(CLINIC, interpreted=True)[DrugScreen] for r in s.results)
    assert flags["expected"] > 10
    assert flags["unexpected"] >= 3
    assert flags["expected-not-detected"] >= 1
    encounters = [r for r in resources_of(CLINIC) if r["resourceType"] == "Observation"
                  and any(c["code"] == "A" for cc in r.get("interpretation", ()) for c in cc["coding"])]
    assert all(r.get("note") for r in encounters), "every abnormal MAT reading carries its note"
