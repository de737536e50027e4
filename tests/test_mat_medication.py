"""MAT: orders ⇄ MedicationRequest, in-clinic doses ⇄ MedicationAdministration, take-homes ⇄ MedicationDispense."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from datetime import date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_iop import pipeline
from fhir_iop.errors import Problem
from fhir_iop.fhir import r4
from fhir_iop.fhir.io import BundleWriter, NdjsonWriter
from fhir_iop.mapping.common import PART2_LABELS, PROFILES, UCUM, MappingContext, ext_url
from fhir_iop.records.model import (Client, Counselor, Enrollment, LevelChange, MatAdministration, MatDispense,
                                    MatMedication, Program, StatusChange)
from fhir_iop.terminology import CANONICAL, cs_url, load_terminology
from test_codes import allowed_codes, walk_codings

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"shared FHIR fixtures not found at {FIXTURES}")
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
MAT_TYPES = (MatMedication, MatAdministration, MatDispense)
NY = ZoneInfo("America/New_York")
TERMS = load_terminology()


# -- helpers (as in test_roundtrip) ------------------------------------------------------------------

def by_type(items) -> dict[type, list]:
    out = defaultdict(list)
    for item in items:
        assert not isinstance(item, Problem), str(item)
        out[type(item)].append(item)
    return out


def write_bundle(resources, path: Path, encoding="json") -> Path:
    with open(path, "wb") as f:
        w = BundleWriter(f, "transaction", encoding)
        for r in resources:
            w.write(r)
        w.close()
    return path


def map_clean(records) -> list[dict]:
    ctx = MappingContext()
    ctx.seen_types |= {type(r).file_stem for r in records}
    out = list(pipeline.map_records(records, ctx, strict=True))
    problems = [o for o in out if not isinstance(o, dict)]
    assert problems == [], [str(p) for p in problems]
    return out


def mat_resources(resources) -> list[dict]:
    return [r for r in resources if r["resourceType"].startswith("Medication")]


# -- a realistic clinic: the four MAT regimens an IOP sees -------------------------------------------

def at(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime.combine(day, time(hour, minute), NY)


def realistic() -> list:
    d0 = date(2026, 1, 5)
    base = [
        Program(program_id="SUD-IOP", name="Harbor Light Adult SUD IOP", kind="substance-use"),
        Counselor(counselor_id="DR1", family_name="Okafor", given_names=["James"], role="psychiatrist",
                  credentials="MD", npi="1234567893"),
        Counselor(counselor_id="RN1", family_name="Lee", given_names=["Sam"], role="nurse"),
    ]
    clients, enrollments = [], []
    for i, mrn in enumerate(("M001", "M002", "M003", "M004")):
        clients.append(Client(mrn=mrn, family_name=f"Client{i}", given_names=["Pat"], birth_date=date(1980 + i, 3, 2)))
        enrollments.append(Enrollment(
            enrollment_id=f"E{i + 1}", client_mrn=mrn, program_id="SUD-IOP",
            status_history=[StatusChange(status="active", since=d0)],
            level_history=[LevelChange(level="IOP-6", since=d0)],
            admitted_on=d0, diagnoses=["F11.20"] if i != 2 else ["F10.20"], primary_counselor="DR1"))
    orders = [
        # buprenorphine/naloxone film 16 mg (two 8/2 films) daily, sublingual; weekly take-homes of 14 films
        MatMedication(mat_id="MAT-BUP1", client_mrn="M001", enrollment_id="E1", drug="bup-nx-film-8-2", dose=16,
                      dose_unit="mg", route="sublingual", frequency_count=1, frequency_unit="d", prescriber_id="DR1",
                      start=d0, status="active"),
        # methadone 90 mg daily from the 10 mg/mL oral concentrate: observed in clinic, Sunday take-home
        MatMedication(mat_id="MAT-MTD1", client_mrn="M002", enrollment_id="E2", drug="methadone-oral-conc-10",
                      dose=90, dose_unit="mg", route="oral", frequency_count=1, frequency_period=1, frequency_unit="d",
                      prescriber_id="DR1", start=d0, end=date(2026, 3, 31), status="active"),
        # extended-release naltrexone 380 mg IM every month (alcohol use disorder)
        MatMedication(mat_id="MAT-XRNTX1", client_mrn="M003", enrollment_id="E3", drug="naltrexone-xr-inj-380",
                      dose=380, dose_unit="mg", route="intramuscular", frequency_count=1, frequency_unit="mo",
                      prescriber_id="DR1", start=d0, end=date(2026, 3, 4), status="completed"),
        # Sublocade 300 mg SC monthly, no enrollment link (ordered before admission)
        MatMedication(mat_id="MAT-SUBL1", client_mrn="M004", drug="bup-xr-inj-300", dose=300, dose_unit="mg",
                      route="subcutaneous", frequency_count=1, frequency_period=1, frequency_unit="mo",
                      prescriber_id="DR1", start=date(2025, 12, 15), status="on-hold"),
    ]
    admins, dispenses = [], []
    for k in range(12):  # methadone: observed doses Mon-Sat, one missed
        day = d0 + timedelta(days=k + k // 6)
        admins.append(MatAdministration(
            administration_id=f"ADM-MTD-{k:02}", mat_id="MAT-MTD1", client_mrn="M002", administered_at=at(day, 7, 30),
            dose=90, dose_unit="mg", route="oral", status="not-done" if k == 4 else "completed", performer_id="RN1"))
    for w in range(2):  # methadone weekly take-home: Sunday dose, 9 mL
        dispenses.append(MatDispense(dispense_id=f"DSP-MTD-{w}", mat_id="MAT-MTD1", client_mrn="M002",
                                     dispensed_at=at(d0 + timedelta(days=5 + 7 * w), 7, 45), quantity=9,
                                     quantity_unit="mL", days_supply=1, performer_id="RN1"))
    for w in range(3):  # buprenorphine weekly take-home films
        dispenses.append(MatDispense(dispense_id=f"DSP-BUP-{w}", mat_id="MAT-BUP1", client_mrn="M001",
                                     dispensed_at=at(d0 + timedelta(days=7 * w), 10), quantity=14,
                                     quantity_unit="film", days_supply=7,
                                     status="cancelled" if w == 2 else "completed"))
    for m, day in enumerate((d0, date(2026, 2, 4), date(2026, 3, 4))):  # XR-naltrexone monthly
        admins.append(MatAdministration(administration_id=f"ADM-NTX-{m}", mat_id="MAT-XRNTX1", client_mrn="M003",
                                        administered_at=at(day, 11, 15), dose=380, dose_unit="mg",
                                        route="intramuscular", performer_id="RN1"))
    for m, day in enumerate((date(2025, 12, 15), date(2026, 1, 15))):  # Sublocade monthly
        admins.append(MatAdministration(administration_id=f"ADM-SUBL-{m}", mat_id="MAT-SUBL1", client_mrn="M004",
                                        administered_at=at(day, 14), dose=300, dose_unit="mg", route="subcutaneous"))
    return base + clients + enrollments + orders + admins + dispenses


@pytest.fixture(scope="module")
def emitted() -> list[dict]:
    return map_clean(realistic())


def test_hand_written_round_trip_json(tmp_path, emitted):
    records = realistic()
    back = by_type(pipeline.from_fhir([write_bundle(emitted, tmp_path / "mat.json")]))
    for model in MAT_TYPES:
        mine = [r for r in records if type(r) is model]
        assert mine
        assert back[model] == mine, model.__name__


def test_hand_written_round_trip_xml_and_ndjson(tmp_path, emitted):
    records = realistic()
    write_bundle(emitted, tmp_path / "mat.xml", "xml")
    nd = NdjsonWriter(tmp_path / "nd")
    for r in emitted:
        nd.write(r)
    nd.close()
    for inputs in ([tmp_path / "mat.xml"], sorted((tmp_path / "nd").glob("*.ndjson"))):
        back = by_type(pipeline.from_fhir(inputs))
        for model in MAT_TYPES:
            key = lambda r: r.key()  # noqa: E731
            assert sorted(back[model], key=key) == sorted((r for r in records if type(r) is model), key=key), \
                (inputs[0].suffix, model.__name__)


def test_mapping_is_deterministic(emitted):
    again = map_clean(realistic())
    assert json.dumps(again, sort_keys=True) == json.dumps(emitted, sort_keys=True)
    ids = [(r["resourceType"], r["id"]) for r in emitted]
    assert len(ids) == len(set(ids))


# -- structure, profiles, labels, codes ---------------------------------------------------------------

PROFILE_OF = {"MedicationRequest": "mat_medication", "MedicationAdministration": "mat_administration",
              "MedicationDispense": "mat_dispense"}


def test_every_resource_is_valid_r4_profiled_and_part2_labelled(emitted):
    mat = mat_resources(emitted)
    assert {r["resourceType"] for r in mat} == set(PROFILE_OF)
    for res in mat:
        assert r4.structure_errors(res) == [], (res["resourceType"], res["id"])
        assert res["meta"]["profile"] == PROFILES[PROFILE_OF[res["resourceType"]]]
        assert res["meta"]["security"] == list(PART2_LABELS)


def test_every_emitted_coding_is_allowed_and_displays_match(emitted):
    allowed = allowed_codes()
    seen = set()
    for res in mat_resources(emitted):
        for c in walk_codings(res):
            assert (c["system"], c["code"]) in allowed, f"{c['system']}|{c['code']} comes from no table or citation"
            if c["system"].startswith(CANONICAL):
                assert TERMS.code_systems[c["system"]][c["code"]] == c["display"]
            seen.add((c["system"], c["code"]))
    # RxNorm for each product, SNOMED where the reference confirms a route, v3 for every route
    assert {(RXNORM, "1010604"), (RXNORM, "991147"), (RXNORM, "637213"), (RXNORM, "1996192")} <= seen
    v3 = "http://terminology.hl7.org/CodeSystem/v3-RouteOfAdministration"
    assert {(v3, "SL"), (v3, "PO"), (v3, "IM"), (v3, "SQ")} <= seen
    assert ("http://snomed.info/sct", "78421000") not in seen  # IM in SNOMED is only third-party confirmed


def _one(resources, rt, ident) -> dict:
    (res,) = [r for r in resources if r["resourceType"] == rt and r["identifier"][0]["value"] == ident]
    return res


def test_medication_request_shape(emitted):
    ctx = MappingContext()
    req = _one(emitted, "MedicationRequest", "MAT-MTD1")
    assert req["intent"] == "order" and req["status"] == "active"
    assert "category" not in req  # optional in US Core; its codes are not cited (see the report)
    med = req["medicationCodeableConcept"]
    assert med["coding"][0] == {"system": RXNORM, "code": "991147",
                                "display": "methadone hydrochloride 10 MG/ML Oral Solution"}
    assert med["coding"][1]["system"] == cs_url("mat-drug") and med["coding"][1]["code"] == "methadone-oral-conc-10"
    assert req["authoredOn"] == "2026-01-05"
    assert req["requester"] == ctx.counselor_ref("DR1")
    assert req["subject"] == ctx.client_ref("M002")
    assert req["extension"] == [{"url": ext_url("enrollment"), "valueReference": ctx.enrollment_ref("E2")}]
    (d,) = req["dosageInstruction"]
    assert d["timing"]["repeat"] == {"boundsPeriod": {"start": "2026-01-05", "end": "2026-03-31"},
                                     "frequency": 1, "period": 1, "periodUnit": "d"}
    assert d["doseAndRate"] == [{"doseQuantity": {"value": 90, "unit": "mg", "system": UCUM, "code": "mg"}}]
    assert [c["code"] for c in d["route"]["coding"]] == ["26643006", "PO"]
    assert d["text"] == ("Methadone hydrochloride 10 MG/ML oral concentrate: 90 mg oral, once a day, "
                         "from 2026-01-05 to 2026-03-31")


def test_order_without_enrollment_has_no_extension_and_monthly_text(emitted):
    req = _one(emitted, "MedicationRequest", "MAT-SUBL1")
    assert "extension" not in req
    assert req["dosageInstruction"][0]["text"].endswith("300 mg subcutaneous injection, once a month, from 2025-12-15")
    assert "context" not in _one(emitted, "MedicationAdministration", "ADM-SUBL-0")


def test_administration_and_dispense_point_to_the_order(emitted):
    req = _one(emitted, "MedicationRequest", "MAT-MTD1")
    adm = _one(emitted, "MedicationAdministration", "ADM-MTD-04")
    assert adm["status"] == "not-done"
    assert adm["request"]["reference"] == f"MedicationRequest/{req['id']}"
    assert adm["medicationCodeableConcept"] == req["medicationCodeableConcept"]
    assert adm["effectiveDateTime"] == "2026-01-09T07:30:00-05:00"
    assert adm["dosage"]["dose"] == {"value": 90, "unit": "mg", "system": UCUM, "code": "mg"}
    assert adm["context"] == req["extension"][0]["valueReference"]
    disp = _one(emitted, "MedicationDispense", "DSP-MTD-0")
    assert disp["authorizingPrescription"][0]["reference"] == f"MedicationRequest/{req['id']}"
    assert disp["quantity"] == {"value": 9, "unit": "mL", "system": UCUM, "code": "mL"}
    assert disp["daysSupply"] == {"value": 1, "unit": "days", "system": UCUM, "code": "d"}
    assert disp["whenHandedOver"] == "2026-01-10T07:45:00-05:00"
    assert disp["performer"][0]["actor"]["identifier"]["value"] == "RN1"
    films = _one(emitted, "MedicationDispense", "DSP-BUP-0")
    assert films["quantity"] == {"value": 14, "unit": "film"}  # no UCUM code for a film
    assert "performer" not in films
    assert "type" not in films


# -- generated records --------------------------------------------------------------------------------

ids = st.from_regex(r"[A-Z][A-Z0-9]{2,8}", fullmatch=True)
days = st.dates(min_value=date(2024, 1, 1), max_value=date(2027, 12, 31))
amounts = st.floats(min_value=0.01, max_value=2000, allow_nan=False, allow_infinity=False)
routes = st.sampled_from(sorted(TERMS.codes("mat-route")))
ALLOWED = allowed_codes()
zones = st.sampled_from([NY, ZoneInfo("UTC"), ZoneInfo("America/Los_Angeles")])


@st.composite
def mat_runs(draw):
    staff = ["DR1", "RN1"]
    records = [Program(program_id="P1", name="SUD IOP", kind=draw(st.sampled_from(["substance-use", "co-occurring"])))]
    records += [Counselor(counselor_id=c, family_name="Staff", given_names=["A"], role="nurse") for c in staff]
    for i in range(draw(st.integers(1, 3))):
        mrn, eid = f"M{i}", f"E{i}"
        admitted = draw(days)
        records.append(Client(mrn=mrn, family_name="Doe", given_names=["J"], birth_date=date(1990, 1, 1)))
        records.append(Enrollment(enrollment_id=eid, client_mrn=mrn, program_id="P1",
                                  status_history=[StatusChange(status="active", since=admitted)],
                                  level_history=[LevelChange(level="IOP-3", since=admitted)], admitted_on=admitted))
        for j in range(draw(st.integers(1, 2))):
            start = draw(days)
            status = draw(st.sampled_from(["active", "on-hold", "completed", "stopped"]))
            end = start + timedelta(days=draw(st.integers(0, 365))) if status in ("completed", "stopped") \
                or draw(st.booleans()) else None
            order = MatMedication(
                mat_id=f"{draw(ids)}-{i}{j}", client_mrn=mrn, enrollment_id=draw(st.none() | st.just(eid)),
                drug=draw(st.sampled_from(sorted(TERMS.codes("mat-drug")))), dose=draw(amounts),
                dose_unit=draw(st.sampled_from(["mg", "mL"])), route=draw(routes),
                frequency_count=draw(st.integers(1, 4)), frequency_period=draw(st.integers(1, 4)),
                frequency_unit=draw(st.sampled_from(["d", "wk", "mo"])), prescriber_id=draw(st.sampled_from(staff)),
                start=start, end=end, status=status)
            records.append(order)
            for k in range(draw(st.integers(0, 3))):
                clock = time(draw(st.integers(0, 23)), draw(st.integers(0, 59)))
                when = datetime.combine(start + timedelta(days=k), clock, draw(zones))
                records.append(MatAdministration(
                    administration_id=f"A{i}{j}{k}", mat_id=order.mat_id, client_mrn=mrn, administered_at=when,
                    dose=draw(amounts), dose_unit=draw(st.sampled_from(["mg", "mL"])), route=draw(routes),
                    status=draw(st.sampled_from(["completed", "not-done"])),
                    performer_id=draw(st.none() | st.sampled_from(staff))))
            for k in range(draw(st.integers(0, 2))):
                records.append(MatDispense(
                    dispense_id=f"D{i}{j}{k}", mat_id=order.mat_id, client_mrn=mrn,
                    dispensed_at=datetime.combine(start + timedelta(days=7 * k), time(9, 30), draw(zones)),
                    quantity=draw(amounts), quantity_unit=draw(st.sampled_from(["mL", "tablet", "film"])),
                    days_supply=draw(st.integers(1, 90)), status=draw(st.sampled_from(["completed", "cancelled"])),
                    performer_id=draw(st.none() | st.sampled_from(staff))))
    return records


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(mat_runs())
def test_generated_records_round_trip(tmp_path_factory, records):
    out = map_clean(records)
    for res in mat_resources(out):
        assert r4.structure_errors(res) == []  # (map_clean is strict too; kept explicit)
        assert res["meta"]["security"] == list(PART2_LABELS)
        for c in walk_codings(res):
            assert (c["system"], c["code"]) in ALLOWED
    path = write_bundle(out, tmp_path_factory.mktemp("gen") / "bundle.json")
    back = by_type(pipeline.from_fhir([path]))
    for model in MAT_TYPES:
        assert back[model] == [r for r in records if type(r) is model], model.__name__


# -- FHIR written by others ---------------------------------------------------------------------------

def run(*paths: Path) -> tuple[list, list[Problem]]:
    out = list(pipeline.from_fhir(list(paths)))
    return [o for o in out if not isinstance(o, Problem)], [o for o in out if isinstance(o, Problem)]


def fixture(rel: str) -> Path:
    path = FIXTURES / rel
    if not path.is_file():
        pytest.skip(f"fixture {rel} not found")
    return path


FOREIGN = [  # (fixture, resource label, field, what the reason must say)
    ("fhir-test-cases-r4-examples/medicationrequest0301.json", "MedicationRequest/medrx0301",
     "MedicationRequest.contained.code", "no RxNorm code (codings: http://snomed.info/sct|430127000)"),
    ("fhir-test-cases-r4-examples/medicationadministration0301.json", "MedicationAdministration/medadmin0301",
     "MedicationAdministration.contained.code", "no RxNorm code (codings: http://hl7.org/fhir/sid/ndc|0069-2587-10)"),
    ("fhir-test-cases-r4-examples/medicationdispense0301.json", "MedicationDispense/meddisp0301",
     "MedicationDispense.contained.code", "no RxNorm code"),
    ("fhir-test-cases-r4-examples/medicationdispenseexample8.xml", "MedicationDispense/meddisp008",
     "MedicationDispense.contained.code", "RxNorm 213293 is not a MAT product"),
    ("us-core/examples/medicationrequest-coded-oral-axid.json", "MedicationRequest/medicationrequest-coded-oral-axid",
     "MedicationRequest.medicationCodeableConcept", "RxNorm 476872 is not a MAT product"),
    ("us-core/examples/medicationrequest-contained-oral-axid.json",
     "MedicationRequest/medicationrequest-contained-oral-axid", "MedicationRequest.contained.code",
     "RxNorm 582620 is not a MAT product"),
    ("us-core/examples/medicationrequest-referenced-oral-axid.json",
     "MedicationRequest/medicationrequest-referenced-oral-axid", "MedicationRequest.medicationReference",
     "medicationReference to a Medication resource (Medication/uscore-med2) is not supported"),
    ("us-core/examples/medicationrequest-self-tylenol.json", "MedicationRequest/self-tylenol",
     "MedicationRequest.medicationCodeableConcept", "RxNorm 1187314 is not a MAT product"),
    ("us-core/examples/medicationdispense-example.json", "MedicationDispense/medicationdispense-example",
     "MedicationDispense.medicationCodeableConcept", "RxNorm 476872 is not a MAT product"),
]


@needs_fixtures
@pytest.mark.parametrize("rel,label,field,reason", FOREIGN, ids=[Path(f[0]).name for f in FOREIGN])
def test_foreign_medication_resources_are_reported_with_the_reason(rel, label, field, reason):
    path = fixture(rel)
    records, problems = run(path)
    assert not [r for r in records if isinstance(r, MAT_TYPES)]
    (p,) = [p for p in problems if p.where == f"{path}: {label}"]
    assert p.severity == "warning" and p.code == "not-supported"
    assert p.field == field
    assert reason in p.message, p.message


@needs_fixtures
@pytest.mark.parametrize("path", sorted((FIXTURES / "synthea-r4").glob("*.json")) or
                         [pytest.param(None, marks=pytest.mark.skip(reason="no Synthea fixtures"))],
                         ids=lambda p: p.name.split("_")[0] if p else "none")
def test_synthea_medication_requests_are_not_mat_and_say_which_rxnorm(path):
    bundle = json.loads(path.read_bytes())
    meds = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "MedicationRequest"]
    records, problems = run(path)
    assert not [r for r in records if isinstance(r, MAT_TYPES)]
    for med in meds:
        (p,) = [p for p in problems if p.where == f"{path}: MedicationRequest/{med['id']}"]
        code = med["medicationCodeableConcept"]["coding"][0]["code"]
        assert f"medication RxNorm {code} is not a MAT product" in p.message


def _as_methadone(rel: str, tmp_path: Path, **changes) -> Path:
    res = json.loads(fixture(rel).read_bytes())
    res.pop("medicationReference", None)
    res["medicationCodeableConcept"] = {"coding": [{"system": RXNORM, "code": "991147"}]}
    res.update(changes)
    out = tmp_path / Path(rel).name
    out.write_text(json.dumps(res))
    return out


@needs_fixtures
def test_us_core_request_for_a_mat_product_without_route_is_reported(tmp_path):
    path = _as_methadone("us-core/examples/medicationrequest-coded-oral-axid.json", tmp_path)
    records, problems = run(path, fixture("us-core/examples/patient-example.json"),
                            fixture("us-core/examples/practitioner-1.json"))
    assert not [r for r in records if isinstance(r, MatMedication)]
    (p,) = [p for p in problems if p.where.endswith("MedicationRequest/medicationrequest-coded-oral-axid")]
    assert p.field == "MedicationRequest.dosageInstruction"
    assert "no dosage route" in p.message


@needs_fixtures
def test_us_core_request_for_a_mat_product_maps_back(tmp_path):
    """The US Core oral-solution example, its drug made methadone concentrate: every field from the fixture."""
    src = json.loads(fixture("us-core/examples/medicationrequest-referenced-oral-axid.json").read_bytes())
    path = _as_methadone("us-core/examples/medicationrequest-referenced-oral-axid.json", tmp_path)
    patient = json.loads(fixture("us-core/examples/patient-example.json").read_bytes())
    records, problems = run(path, fixture("us-core/examples/patient-example.json"),
                            fixture("us-core/examples/practitioner-1.json"))
    (m,) = [r for r in records if isinstance(r, MatMedication)]
    d = src["dosageInstruction"][0]
    repeat = d["timing"]["repeat"]
    assert m.drug == "methadone-oral-conc-10"
    assert m.client_mrn == next(i["value"] for i in patient["identifier"]
                                if i.get("type", {}).get("coding", [{}])[0].get("code") == "MR")
    assert m.prescriber_id == "9941339100"  # practitioner-1's first identifier (its NPI)
    assert (m.dose, m.dose_unit) == (d["doseAndRate"][0]["doseQuantity"]["value"], "mL")
    assert m.route == "oral"  # SNOMED 26643006 read back through mat-route-to-route
    assert (m.frequency_count, m.frequency_period, m.frequency_unit) == \
        (repeat["frequency"], repeat["period"], repeat["periodUnit"])
    assert m.start.isoformat() == repeat["boundsPeriod"]["start"] and m.end is None
    assert m.status == src["status"] and m.enrollment_id is None
    assert m.mat_id == src["id"]
    assert not [p for p in problems if "MedicationRequest" in p.where]


@needs_fixtures
def test_administration_of_a_mat_product_whose_order_is_missing_is_reported(tmp_path):
    path = _as_methadone("fhir-test-cases-r4-examples/medicationadministration0301.json", tmp_path,
                         status="completed")
    records, problems = run(path)
    assert not records
    (p,) = [p for p in problems if p.where.endswith("MedicationAdministration/medadmin0301")]
    assert p.field == "MedicationAdministration.request"
    assert "'MedicationRequest/medrx0318' does not resolve to a MedicationRequest" in p.message


@needs_fixtures
def test_in_progress_administration_is_reported_by_status(tmp_path):
    path = _as_methadone("fhir-test-cases-r4-examples/medicationadministration0301.json", tmp_path)
    _, problems = run(path)
    (p,) = [p for p in problems if p.where.endswith("MedicationAdministration/medadmin0301")]
    assert p.field == "MedicationAdministration.status" and "'in-progress'" in p.message


@needs_fixtures
def test_dispense_in_vials_is_reported_by_unit(tmp_path, emitted):
    """A MAT dispense whose order is in the input but whose quantity is in vials (v3 orderableDrugForm)."""
    order = _one(emitted, "MedicationRequest", "MAT-MTD1")
    res = json.loads(fixture("fhir-test-cases-r4-examples/medicationdispense0301.json").read_bytes())
    del res["medicationReference"]
    res.update(status="completed", medicationCodeableConcept=order["medicationCodeableConcept"],
               subject=order["subject"], authorizingPrescription=[{"reference": f"MedicationRequest/{order['id']}"}],
               whenHandedOver="2026-01-10T07:45:00-05:00")
    path = write_bundle([*emitted, res], tmp_path / "b.json")
    records, problems = run(path)
    (p,) = [p for p in problems if p.where.endswith("MedicationDispense/meddisp0301")]
    assert p.field == "MedicationDispense.quantity" and "'Vial'" in p.message
    # with mL it maps, its order and client resolved from the same input
    res["quantity"] = {"value": 54, "unit": "mL", "system": UCUM, "code": "mL"}
    path = write_bundle([*emitted, res], tmp_path / "c.json")
    records, problems = run(path)
    (d,) = [r for r in records if isinstance(r, MatDispense) and r.dispense_id == "meddisp0301"]
    assert (d.mat_id, d.client_mrn, d.quantity, d.quantity_unit, d.days_supply) == ("MAT-MTD1", "M002", 54, "mL", 3)
    assert d.performer_id is None  # Practitioner/f006 is not in the input


# -- bad input records ---------------------------------------------------------------------------------

GOOD = {
    "programs.csv": "program_id,name,kind\nSUD-IOP,Harbor Light SUD IOP,substance-use\n",
    "counselors.csv": "counselor_id,family_name,given_names,role,credentials\nDR1,Okafor,James,psychiatrist,MD\n"
                      "RN1,Lee,Sam,nurse,RN\n",
    "clients.csv": "mrn,family_name,given_names,birth_date\nM001,Smith,John,1985-03-02\nM002,Doe,Jane,1990-12-01\n",
    "enrollments.csv": "enrollment_id,client_mrn,program_id,status_history,level_history,admitted_on\n"
                       "E1,M001,SUD-IOP,active@2026-01-05,IOP-6@2026-01-05,2026-01-05\n"
                       "E2,M002,SUD-IOP,active@2026-01-05,IOP-6@2026-01-05,2026-01-05\n",
    "mat_medications.csv": "mat_id,client_mrn,enrollment_id,drug,dose,dose_unit,route,frequency_count,"
                           "frequency_period,frequency_unit,prescriber_id,start,end,status\n"
                           "MAT1,M001,E1,bup-nx-film-8-2,16,mg,sublingual,1,1,d,DR1,2026-01-05,,active\n"
                           "MAT2,M002,E2,methadone-oral-conc-10,90,mg,oral,1,1,d,DR1,2026-01-05,,active\n",
    "mat_administrations.csv": "administration_id,mat_id,client_mrn,administered_at,dose,dose_unit,route,status,"
                               "performer_id\n"
                               "A1,MAT2,M002,2026-01-05T07:30,90,mg,oral,completed,RN1\n"
                               "A2,MAT2,M002,2026-01-06T07:30,90,mg,oral,not-done,RN1\n",
    "mat_dispenses.csv": "dispense_id,mat_id,client_mrn,dispensed_at,quantity,quantity_unit,days_supply,status\n"
                         "D1,MAT1,M001,2026-01-05T10:00,14,film,7,completed\n"
                         "D2,MAT2,M002,2026-01-10T07:45,9,mL,1,completed\n",
}
WHERE = re.compile(r"^(?P<file>.+?):(?P<line>\d+)(?: \(.*\))?$")


def clinic(directory: Path, **files: str | None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in {**GOOD, **{k.replace("__", "."): v for k, v in files.items()}}.items():
        if text is not None:
            (directory / name).write_text(text, encoding="utf-8")
    return directory


def to_fhir(directory: Path) -> tuple[dict, list[Problem]]:
    out = list(pipeline.to_fhir([directory], strict=True))
    return ({(r["resourceType"], r["id"]): r for r in out if isinstance(r, dict)},
            [p for p in out if isinstance(p, Problem)])


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict:
    resources, problems = to_fhir(clinic(tmp_path_factory.mktemp("clean")))
    assert problems == [], [str(p) for p in problems]
    assert sum(rt.startswith("Medication") for rt, _ in resources) == 6
    return resources


def appended(name: str, row: str) -> tuple[str, int]:
    text = GOOD[name] + row + "\n"
    return text, text.count("\n")


def assert_at(p: Problem, file: str, line: int, field: str) -> None:
    m = WHERE.match(p.where)
    assert m, f"no file:line in {p.where!r}"
    assert (Path(m["file"]).name, int(m["line"])) == (file, line), p.where
    assert p.field == field and p.severity == "error", str(p)


def only(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


def test_unknown_drug_code_lists_the_allowed_codes(tmp_path, clean):
    text, line = appended("mat_medications.csv",
                          "MAT3,M001,E1,suboxone,16,mg,sublingual,1,1,d,DR1,2026-01-05,,active")
    resources, problems = to_fhir(clinic(tmp_path, mat_medications__csv=text))
    assert resources == clean
    p = only(problems)
    assert_at(p, "mat_medications.csv", line, "drug")
    assert "'suboxone'" in p.message and "allowed:" in p.message
    for code in TERMS.codes("mat-drug"):
        assert code in p.message.split("allowed:", 1)[1]


def test_unknown_route_lists_the_allowed_codes(tmp_path, clean):
    text, line = appended("mat_administrations.csv", "A3,MAT2,M002,2026-01-07T07:30,90,mg,rectal,completed,RN1")
    resources, problems = to_fhir(clinic(tmp_path, mat_administrations__csv=text))
    assert resources == clean
    p = only(problems)
    assert_at(p, "mat_administrations.csv", line, "route")
    assert all(code in p.message for code in TERMS.codes("mat-route"))


def test_order_ending_before_it_starts_names_end(tmp_path, clean):
    text, line = appended("mat_medications.csv",
                          "MAT3,M001,E1,naltrexone-xr-inj-380,380,mg,intramuscular,1,1,mo,DR1,2026-03-01,2026-02-01,"
                          "completed")
    resources, problems = to_fhir(clinic(tmp_path, mat_medications__csv=text))
    assert resources == clean
    p = only(problems)
    assert_at(p, "mat_medications.csv", line, "end")
    assert "end is before start" in p.message


def test_administration_for_an_unknown_order_names_mat_id(tmp_path, clean):
    text, line = appended("mat_administrations.csv", "A3,MAT9,M002,2026-01-07T07:30,90,mg,oral,completed,RN1")
    resources, problems = to_fhir(clinic(tmp_path, mat_administrations__csv=text))
    assert resources == clean
    p = only(problems)
    assert_at(p, "mat_administrations.csv", line, "mat_id")
    assert "'MAT9' is not in this run's mat_medications" in p.message


def test_records_of_a_rejected_order_are_rejected_too(tmp_path, clean):
    """MAT2's prescriber is unknown: the order, its administrations and its dispense each say why."""
    orders = GOOD["mat_medications.csv"].replace("oral,1,1,d,DR1", "oral,1,1,d,DR9")
    resources, problems = to_fhir(clinic(tmp_path, mat_medications__csv=orders))
    assert {p.field for p in problems} == {"prescriber_id", "mat_id"}
    (order,) = [p for p in problems if p.field == "prescriber_id"]
    assert_at(order, "mat_medications.csv", 3, "prescriber_id")
    assert "'DR9' is not in this run's counselors" in order.message
    assert sorted(WHERE.match(p.where)["file"].rsplit("/", 1)[-1] + f":{WHERE.match(p.where)['line']}"
                  for p in problems if p.field == "mat_id") == \
        ["mat_administrations.csv:2", "mat_administrations.csv:3", "mat_dispenses.csv:3"]
    lost = {k for k in clean if k not in resources}
    assert sorted(rt for rt, _ in lost) == ["MedicationAdministration", "MedicationAdministration",
                                            "MedicationDispense", "MedicationRequest"]


def test_administration_without_the_orders_file_names_mat_id(tmp_path):
    resources, problems = to_fhir(clinic(tmp_path, mat_medications__csv=None))
    assert not [k for k in resources if k[0].startswith("Medication")]
    assert len(problems) == 4
    for p in problems:
        assert p.field == "mat_id"
        assert "mat_medications is not part of this run" in p.message and "medication" in p.message
    assert_at(problems[0], "mat_administrations.csv", 2, "mat_id")
    assert "'MAT2'" in problems[0].message


def test_dispense_for_another_clients_order_names_client_mrn(tmp_path, clean):
    text, line = appended("mat_dispenses.csv", "D3,MAT1,M002,2026-01-12T10:00,14,film,7,completed")
    resources, problems = to_fhir(clinic(tmp_path, mat_dispenses__csv=text))
    assert resources == clean
    p = only(problems)
    assert_at(p, "mat_dispenses.csv", line, "client_mrn")
    assert "belongs to client 'M001'" in p.message


def test_order_linked_to_another_clients_enrollment_names_enrollment_id(tmp_path, clean):
    text, line = appended("mat_medications.csv",
                          "MAT3,M001,E2,naltrexone-tab-50,50,mg,oral,1,1,d,DR1,2026-01-05,,active")
    resources, problems = to_fhir(clinic(tmp_path, mat_medications__csv=text))
    assert resources == clean
    assert_at(only(problems), "mat_medications.csv", line, "enrollment_id")


def test_days_supply_over_90_is_rejected(tmp_path, clean):
    text, line = appended("mat_dispenses.csv", "D3,MAT1,M001,2026-01-12T10:00,14,film,120,completed")
    resources, problems = to_fhir(clinic(tmp_path, mat_dispenses__csv=text))
    assert resources == clean
    assert_at(only(problems), "mat_dispenses.csv", line, "days_supply")


def test_dosage_text_keeps_fractional_doses_and_periods():
    from fhir_iop.mapping.mat_medication import dosage_text
    m = MatMedication(mat_id="X", client_mrn="M", drug="methadone-oral-conc-10", dose=2.25, dose_unit="mL",
                      route="oral", frequency_count=3, frequency_period=2, frequency_unit="wk", prescriber_id="DR1",
                      start=date(2026, 1, 5), status="active")
    assert dosage_text(MappingContext(), m).endswith(": 2.25 mL oral, 3 times every 2 weeks, from 2026-01-05")
