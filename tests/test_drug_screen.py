"""Drug screens: DiagnosticReport + an Observation per analyte + Specimen, both ways, and the
MAT-aware reading of each result (``fhir_iop.interpret``).

The issue: "each result is interpreted against the client's MAT on the collection date —
buprenorphine detected for a client on buprenorphine is expected, its absence is flagged (possible
non-adherence or diversion); likewise methadone (EDDP); any other substance detected is flagged
unexpected. The flag is in the FHIR output (interpretation and a note) and in the IOP records."
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from fhir_iop import pipeline
from fhir_iop.errors import Problem
from fhir_iop.fhir import r4
from fhir_iop.fhir.io import BundleWriter
from fhir_iop.interpret import interpret
from fhir_iop.mapping.common import PART2_LABELS, PROFILES, MappingContext, ext_url
from fhir_iop.records.model import Client, DrugScreen, MatMedication, default_context
from fhir_iop.terminology import CANONICAL, cs_url, load_terminology
from test_codes import allowed_codes, walk_codings
from test_fixtures_from_fhir import crash_like

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
SKIP_REASON = f"shared FHIR fixtures not found at {FIXTURES}"
TERMS = load_terminology()
RC = default_context()
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
V3 = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
NY = RC["tz"]


def screen(**fields) -> DrugScreen:
    data = {"screen_id": "S1", "client_mrn": "M1", "specimen": "urine", "collected_at": "2026-01-10T09:30",
            "method": "point-of-care", "panel": "uds-screen"} | fields
    return DrugScreen.model_validate(data, context=RC)


CLIENTS = [Client(mrn="M1", family_name="Smith", given_names=["John"], birth_date=date(1985, 3, 2)),
           Client(mrn="M2", family_name="Doe", given_names=["Jane"], birth_date=date(1990, 12, 1))]
#: M1 on buprenorphine/naloxone from 2026-01-01 (open); M2 on methadone in February 2026 only.
ORDERS = [MatMedication(mat_id="M12", client_mrn="M1", drug="bup-nx-film-8-2", dose=8, dose_unit="mg",
                        route="sublingual", frequency_count=1, frequency_unit="d", prescriber_id="C02",
                        start=date(2026, 1, 1), status="active"),
          MatMedication(mat_id="MD7", client_mrn="M2", drug="methadone-oral-conc-10", dose=80, dose_unit="mg",
                        route="oral", frequency_count=1, frequency_unit="d", prescriber_id="C02",
                        start=date(2026, 2, 1), end=date(2026, 2, 28), status="completed")]

#: Realistic screens: POC cup, lab immunoassay with accession, confirmation with quantities, oral fluid.
SCREENS = [
    screen(screen_id="S1", enrollment_id="E1", observed=True, results=[
        {"analyte": "buprenorphine", "result": "detected", "cutoff": 10, "flag": "expected"},
        {"analyte": "fentanyl", "result": "detected", "cutoff": 1, "flag": "unexpected"},
        {"analyte": "cocaine", "result": "not-detected", "cutoff": 150},
        {"analyte": "opiates", "result": "not-detected", "cutoff": 300}]),
    screen(screen_id="S2", client_mrn="M2", method="lab-immunoassay", panel="uds-5", status="preliminary",
           collected_at="2026-02-03T08:15:00-05:00", resulted_at="2026-02-04T14:02:11-05:00",
           performing_lab="Quest Diagnostics", accession_number="QD-2026-000417", results=[
               {"analyte": "methadone", "result": "not-detected", "cutoff": 300, "flag": "expected-not-detected"},
               {"analyte": "eddp", "result": "not-detected", "cutoff": 100, "flag": "expected-not-detected"},
               {"analyte": "cannabinoids", "result": "detected", "cutoff": 50, "flag": "unexpected"}]),
    screen(screen_id="S3", method="confirmation", panel="fentanyl", status="corrected",
           collected_at="2026-01-20T16:45:00+00:00", resulted_at="2026-01-23T10:00:00+00:00",
           performing_lab="Labcorp", accession_number="LC-88812", results=[
               {"analyte": "fentanyl", "result": "detected", "cutoff": 0.5, "measured": 12.7, "flag": "unexpected"},
               {"analyte": "norfentanyl", "result": "detected", "cutoff": 0.5, "measured": 41.0},
               {"analyte": "norbuprenorphine", "result": "not-detected", "cutoff": 2, "measured": 0}]),
    screen(screen_id="S4", specimen="oral-fluid", panel="oral-fluid-screen", observed=True, results=[
        {"analyte": "buprenorphine", "result": "detected"},
        {"analyte": "methamphetamine", "result": "not-detected"}]),
]


# -- helpers --------------------------------------------------------------------------------------

def write_bundle(resources, path: Path, encoding="json") -> Path:
    with open(path, "wb") as f:
        w = BundleWriter(f, "transaction", encoding)
        for r in resources:
            w.write(r)
        w.close()
    return path


def by_type(items) -> dict[type, list]:
    out = defaultdict(list)
    for item in items:
        assert not isinstance(item, Problem), str(item)
        out[type(item)].append(item)
    return out


def context(with_mat: bool) -> MappingContext:
    ctx = MappingContext()
    ctx.seen_types |= {"clients", "drug_screens"}
    if with_mat:  # the pipeline's own memory of MAT orders, as if mat_medications.csv had mapped first
        ctx.seen_types.add("mat_medications")
        for o in ORDERS:
            pipeline._remember(o, ctx)
    return ctx


def to_fhir(records, with_mat=False) -> list[dict]:
    ctx = context(with_mat)
    out = list(pipeline.map_records([*CLIENTS, *records], ctx, strict=True))
    problems = [o for o in out if isinstance(o, Problem)]
    assert problems == [], [str(p) for p in problems]
    return out


def round_trip(records, tmp_path: Path, encoding="json", with_mat=False) -> list[DrugScreen]:
    path = write_bundle(to_fhir(records, with_mat), tmp_path / f"screens.{encoding}", encoding)
    return by_type(pipeline.from_fhir([path]))[DrugScreen]


def of_type(resources, rt: str) -> list[dict]:
    return [r for r in resources if r["resourceType"] == rt]


def observation(resources, analyte: str) -> dict:
    (obs,) = [o for o in of_type(resources, "Observation")
              if {"system": cs_url("drug-analyte"), "code": analyte} .items() <= o["code"]["coding"][-1].items()]
    return obs


def interpretations(obs: dict) -> set[str]:
    return {c["code"] for cc in obs["interpretation"] for c in cc["coding"] if c["system"] == V3}


def notes(obs: dict) -> list[str]:
    return [n["text"] for n in obs.get("note", ())]


def flag_ext(obs: dict) -> str | None:
    return next((e["valueCoding"]["code"] for e in obs.get("extension", ()) if e["url"] == ext_url("screen-flag")),
                None)


def read_flags(dr: DrugScreen) -> dict[str, str | None]:
    return {r.analyte: r.flag for r in dr.results}


# -- MAT-aware interpretation: one test per case the issue lists -----------------------------------

def check(rec: DrugScreen, expected: dict[str, tuple[str | None, set[str], str | None]], tmp_path: Path):
    """The record flag (interpret), the FHIR interpretation + extension + note, and the records read back."""
    assert read_flags(interpret(rec, ORDERS, TERMS, NY)) == {a: f for a, (f, _, _) in expected.items()}
    resources = to_fhir([rec], with_mat=True)
    for analyte, (flag, codes, note) in expected.items():
        obs = observation(resources, analyte)
        assert interpretations(obs) == codes, analyte
        assert flag_ext(obs) == flag, analyte
        assert notes(obs) == ([note] if note else []), analyte
    (back,) = by_type(pipeline.from_fhir([write_bundle(resources, tmp_path / "b.json")]))[DrugScreen]
    assert read_flags(back) == {a: f for a, (f, _, _) in expected.items()}, "the flag is in the IOP records"


def test_expected_mat_medication_present(tmp_path):
    rec = screen(results=[{"analyte": "buprenorphine", "result": "detected", "cutoff": 10},
                          {"analyte": "norbuprenorphine", "result": "detected"}])
    note = "Expected: client on Buprenorphine / naloxone 8 MG / 2 MG Sublingual Film (MAT order M12)"
    check(rec, {"buprenorphine": ("expected", {"DET", "N"}, note),
                "norbuprenorphine": ("expected", {"DET", "N"}, note)}, tmp_path)


def test_expected_mat_medication_absent_is_flagged(tmp_path):
    rec = screen(results=[{"analyte": "buprenorphine", "result": "not-detected", "cutoff": 10}])
    check(rec, {"buprenorphine": ("expected-not-detected", {"ND", "A"},
                                  "Buprenorphine expected (MAT order M12) but not detected: possible "
                                  "non-adherence or diversion")}, tmp_path)


def test_unexpected_substance_is_flagged(tmp_path):
    rec = screen(results=[{"analyte": "buprenorphine", "result": "detected"},
                          {"analyte": "fentanyl", "result": "detected"},
                          {"analyte": "cocaine", "result": "not-detected"}])
    check(rec, {"buprenorphine": ("expected", {"DET", "N"},
                                  "Expected: client on Buprenorphine / naloxone 8 MG / 2 MG Sublingual Film "
                                  "(MAT order M12)"),
                "fentanyl": ("unexpected", {"DET", "A"}, "Unexpected substance: Fentanyl"),
                "cocaine": (None, {"ND"}, None)}, tmp_path)


def test_methadone_and_eddp_expected_during_treatment(tmp_path):
    rec = screen(client_mrn="M2", collected_at="2026-02-15T10:00",
                 results=[{"analyte": "methadone", "result": "detected"},
                          {"analyte": "eddp", "result": "not-detected"}])
    drug = "Methadone hydrochloride 10 MG/ML oral concentrate"
    check(rec, {"methadone": ("expected", {"DET", "N"}, f"Expected: client on {drug} (MAT order MD7)"),
                "eddp": ("expected-not-detected", {"ND", "A"}, "EDDP (methadone metabolite) expected "
                         "(MAT order MD7) but not detected: possible non-adherence or diversion")}, tmp_path)


def test_result_dated_before_mat_started(tmp_path):
    """Methadone starts 2026-02-01: a January screen expects nothing, so methadone is unexpected."""
    rec = screen(client_mrn="M2", collected_at="2026-01-20T10:00",
                 results=[{"analyte": "methadone", "result": "detected"},
                          {"analyte": "eddp", "result": "not-detected"}])
    check(rec, {"methadone": ("unexpected", {"DET", "A"}, "Unexpected substance: Methadone"),
                "eddp": (None, {"ND"}, None)}, tmp_path)


def test_result_dated_after_mat_ended(tmp_path):
    """Methadone ended 2026-02-28: its absence in March is not flagged, its presence is unexpected."""
    rec = screen(client_mrn="M2", collected_at="2026-03-05T10:00",
                 results=[{"analyte": "methadone", "result": "not-detected"},
                          {"analyte": "eddp", "result": "detected"}])
    check(rec, {"methadone": (None, {"ND"}, None),
                "eddp": ("unexpected", {"DET", "A"}, "Unexpected substance: EDDP (methadone metabolite)")}, tmp_path)


def test_order_period_bounds_are_inclusive_and_read_in_the_site_time_zone():
    day = [{"analyte": "methadone", "result": "detected"}]
    flag = lambda at: interpret(screen(client_mrn="M2", collected_at=at, results=day), ORDERS, TERMS, NY).results[0].flag  # noqa: E731
    assert flag("2026-02-01T00:05") == "expected"              # first day
    assert flag("2026-02-28T23:55") == "expected"              # last day
    assert flag("2026-03-01T00:05") == "unexpected"
    # 03:00 UTC on 1 February is 22:00 on 31 January in New York: before the order
    assert flag("2026-02-01T03:00:00+00:00") == "unexpected"
    # without a site time zone the date is read as written
    rec = screen(client_mrn="M2", collected_at="2026-02-01T03:00:00+00:00", results=day)
    assert interpret(rec, ORDERS, TERMS).results[0].flag == "expected"


def test_other_clients_orders_do_not_count():
    rec = screen(client_mrn="M2", collected_at="2026-01-10T10:00",
                 results=[{"analyte": "buprenorphine", "result": "detected"}])
    assert interpret(rec, ORDERS, TERMS, NY).results[0].flag == "unexpected"


def test_mat_flags_replace_given_flags_and_fhir_iop_fhir_is_stable(tmp_path):
    """With MAT in the run the flags are computed (given ones are replaced); FHIR → IOP → FHIR
    without mat_medications keeps them, giving the same resources again — except the note, which can
    name the MAT order only when the run has the orders."""
    rec = screen(results=[{"analyte": "buprenorphine", "result": "detected", "flag": "unexpected"},
                          {"analyte": "cocaine", "result": "not-detected", "flag": "expected-not-detected"}])
    first = to_fhir([rec], with_mat=True)
    (back,) = by_type(pipeline.from_fhir([write_bundle(first, tmp_path / "a.json")]))[DrugScreen]
    assert read_flags(back) == {"buprenorphine": "expected", "cocaine": None}
    assert back == interpret(rec, ORDERS, TERMS, NY)
    second = to_fhir([back], with_mat=False)
    assert notes(observation(first, "buprenorphine")) == [
        "Expected: client on Buprenorphine / naloxone 8 MG / 2 MG Sublingual Film (MAT order M12)"]
    assert notes(observation(second, "buprenorphine")) == [
        "Expected: Buprenorphine is the client's MAT medication or its metabolite"]
    for r in first + second:
        r.pop("note", None)
    assert second == first
    (again,) = by_type(pipeline.from_fhir([write_bundle(second, tmp_path / "b.json")]))[DrugScreen]
    assert again == back


def test_without_mat_in_the_run_given_flags_are_kept_with_a_generic_note():
    rec = screen(results=[{"analyte": "buprenorphine", "result": "detected", "flag": "expected"},
                          {"analyte": "methadone", "result": "not-detected", "flag": "expected-not-detected"}])
    resources = to_fhir([rec], with_mat=False)
    assert notes(observation(resources, "buprenorphine")) == [
        "Expected: Buprenorphine is the client's MAT medication or its metabolite"]
    assert notes(observation(resources, "methadone")) == [
        "Methadone expected but not detected: possible non-adherence or diversion"]


def test_through_the_pipeline_with_a_mat_medications_file(tmp_path):
    """End to end from record files, once mat_medications maps (another concept's module)."""
    (tmp_path / "clients.csv").write_text("mrn,family_name,given_names,birth_date\nM1,Smith,John,1985-03-02\n")
    (tmp_path / "mat_medications.csv").write_text(
        "mat_id,client_mrn,drug,dose,dose_unit,route,frequency_count,frequency_unit,prescriber_id,start,status\n"
        "M12,M1,bup-nx-film-8-2,8,mg,sublingual,1,d,C02,2026-01-01,active\n")
    (tmp_path / "drug_screens.csv").write_text(
        "screen_id,client_mrn,specimen,collected_at,method,panel,results\n"
        "S1,M1,urine,2026-01-10T09:30,point-of-care,uds-screen,buprenorphine@not-detected@10@@;fentanyl@detected@1@@\n")
    try:
        out = list(pipeline.to_fhir([tmp_path]))
    except NotImplementedError:
        pytest.skip("mat_medication mapping is still a stub")
    resources = [o for o in out if isinstance(o, dict)]
    assert [str(p) for p in out if isinstance(p, Problem) and "drug_screen" in p.where] == []
    assert flag_ext(observation(resources, "buprenorphine")) == "expected-not-detected"
    assert flag_ext(observation(resources, "fentanyl")) == "unexpected"


# -- round trips -----------------------------------------------------------------------------------

def test_hand_written_screens_round_trip(tmp_path):
    assert round_trip(SCREENS, tmp_path) == SCREENS


def test_hand_written_screens_round_trip_through_xml(tmp_path):
    assert round_trip(SCREENS, tmp_path, "xml") == SCREENS


def test_mapping_twice_gives_the_same_resources():
    first, second = to_fhir(SCREENS), to_fhir(SCREENS)
    assert first == second
    ids = [(r["resourceType"], r["id"]) for r in first]
    assert len(ids) == len(set(ids))


def test_resources_are_valid_profiled_part2_labelled_and_use_allowed_codes():
    allowed = allowed_codes()
    resources = [r for r in to_fhir(SCREENS) if r["resourceType"] != "Patient"]
    assert {r["resourceType"] for r in resources} == {"DiagnosticReport", "Observation", "Specimen"}
    profiles = {"DiagnosticReport": "drug_screen", "Observation": "drug_screen_result",
                "Specimen": "drug_screen_specimen"}
    for res in resources:
        assert r4.structure_errors(res) == [], (res["resourceType"], res["id"])
        assert res["meta"]["profile"] == PROFILES[profiles[res["resourceType"]]]
        assert res["meta"]["security"] == list(PART2_LABELS)
        for c in walk_codings(res):
            assert (c["system"], c["code"]) in allowed, f"{c['system']}|{c['code']} comes from no table"
            if c["system"].startswith(CANONICAL) and "display" in c:
                assert TERMS.code_systems[c["system"]][c["code"]] == c["display"]


def test_the_report_and_its_parts():
    resources = to_fhir([SCREENS[1]])
    (dr,) = of_type(resources, "DiagnosticReport")
    (spec,) = of_type(resources, "Specimen")
    obs = of_type(resources, "Observation")
    assert dr["code"]["coding"][0] == {"system": LOINC, "code": "65750-2",
                                       "display": "Drugs of abuse 5 panel - Urine by Screen method"}
    assert dr["code"]["coding"][1]["system"] == cs_url("drug-panel")
    assert dr["category"][0]["coding"][0]["code"] == "LAB"
    assert dr["effectiveDateTime"] == "2026-02-03T08:15:00-05:00" and dr["issued"] == "2026-02-04T14:02:11-05:00"
    assert dr["performer"] == [{"display": "Quest Diagnostics"}]
    assert dr["identifier"][1]["value"] == "QD-2026-000417"
    assert dr["specimen"] == [{"reference": f"Specimen/{spec['id']}"}]
    assert [r["reference"] for r in dr["result"]] == [f"Observation/{o['id']}" for o in obs]
    assert {(c["system"], c["code"]) for c in spec["type"]["coding"]} == {
        (SNOMED, "122575003"), ("http://terminology.hl7.org/CodeSystem/v2-0487", "UR")}
    assert spec["accessionIdentifier"] == {"value": "QD-2026-000417"}
    methadone = observation(resources, "methadone")
    assert methadone["code"]["coding"][0] == {"system": LOINC, "code": "19550-3"}  # screen method, urine
    assert methadone["method"]["coding"][0]["code"] == "lab-immunoassay"
    assert methadone["valueCodeableConcept"]["coding"][0]["code"] == "260415000"
    assert methadone["referenceRange"][0]["high"] == {"value": 300.0, "unit": "ng/mL",
                                                      "system": "http://unitsofmeasure.org", "code": "ng/mL"}
    assert all(o["specimen"] == dr["specimen"][0] for o in obs)


def test_confirmation_codes_and_quantities():
    resources = to_fhir([SCREENS[2]])
    fentanyl = observation(resources, "fentanyl")
    assert fentanyl["code"]["coding"][0]["code"] == "40839-3"  # confirmatory method
    assert fentanyl["valueQuantity"]["value"] == 12.7 and "valueCodeableConcept" not in fentanyl
    assert interpretations(fentanyl) == {"DET", "A"}  # the result travels in interpretation with a quantity
    assert interpretations(observation(resources, "norbuprenorphine")) == {"ND"}


def test_oral_fluid_has_no_loinc_and_saliva_specimen():
    resources = to_fhir([SCREENS[3]])
    (dr,) = of_type(resources, "DiagnosticReport")
    assert [c["system"] for c in dr["code"]["coding"]] == [cs_url("drug-panel")]
    for obs in of_type(resources, "Observation"):
        assert [c["system"] for c in obs["code"]["coding"]] == [cs_url("drug-analyte")]
    (spec,) = of_type(resources, "Specimen")
    assert [c["code"] for c in spec["type"]["coding"]] == ["SAL"]
    assert spec["extension"] == [{"url": ext_url("observed-collection"), "valueBoolean": True}]


TZ = timezone(timedelta(hours=-5))
analytes = sorted(TERMS.codes("drug-analyte"))
amounts = st.none() | st.integers(0, 5000).map(lambda n: n / 4)


@st.composite
def screens(draw):
    out = []
    for i in range(draw(st.integers(1, 3))):
        method = draw(st.sampled_from(sorted(TERMS.codes("screen-method"))))
        collected = datetime.combine(draw(st.dates(date(2024, 1, 1), date(2027, 12, 31))),
                                     time(draw(st.integers(0, 23)), draw(st.integers(0, 59))), TZ)
        results = []
        for a in draw(st.lists(st.sampled_from(analytes), min_size=1, max_size=6, unique=True)):
            result = draw(st.sampled_from(["detected", "not-detected"]))
            fits = ["expected", "unexpected"] if result == "detected" else ["expected-not-detected"]
            results.append({"analyte": a, "result": result, "cutoff": draw(amounts), "measured": draw(amounts),
                            "flag": draw(st.none() | st.sampled_from(fits))})
        lab = method != "point-of-care" and draw(st.booleans())
        out.append(DrugScreen.model_validate({
            "screen_id": f"DS{i}", "client_mrn": draw(st.sampled_from(["M1", "M2"])),
            "enrollment_id": draw(st.none() | st.just("E1")),
            "specimen": draw(st.sampled_from(sorted(TERMS.codes("specimen-kind")))), "collected_at": collected,
            "observed": draw(st.booleans()), "method": method,
            "panel": draw(st.sampled_from(sorted(TERMS.codes("drug-panel")))), "results": results,
            "status": draw(st.sampled_from(["final", "preliminary", "corrected"])),
            "resulted_at": draw(st.none() | st.just(collected + timedelta(hours=draw(st.integers(0, 200))))),
            "performing_lab": "Quest Diagnostics" if lab else None,
            "accession_number": draw(st.none() | st.from_regex(r"[A-Z]{2}-[0-9]{3,8}", fullmatch=True))},
            context=RC))
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(screens())
def test_generated_screens_round_trip(tmp_path_factory, records):
    out = to_fhir(records)
    path = write_bundle(out, tmp_path_factory.mktemp("gen") / "bundle.json")
    assert by_type(pipeline.from_fhir([path]))[DrugScreen] == records


# -- FHIR written elsewhere ------------------------------------------------------------------------

def foreign_screen(method_coding: bool = False) -> dict:
    """A lab's oxycodone confirmation: LOINC only, a quantity over a cutoff, no interpretation."""
    obs = {"resourceType": "Observation", "id": "oxy", "status": "final",
           "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                     "code": "laboratory"}]}],
           "code": {"coding": [{"system": LOINC, "code": "19643-6"}]},
           "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2026-01-10T09:30:00-05:00",
           "valueQuantity": {"value": 250, "unit": "ng/mL", "system": "http://unitsofmeasure.org", "code": "ng/mL"},
           "referenceRange": [{"high": {"value": 100, "unit": "ng/mL", "system": "http://unitsofmeasure.org",
                                        "code": "ng/mL"}}],
           "specimen": {"reference": "Specimen/sp1"}}
    spec = {"resourceType": "Specimen", "id": "sp1", "accessionIdentifier": {"system": "http://lab.example/acc",
                                                                             "value": "A-991"},
            "type": {"coding": [{"system": SNOMED, "code": "122575003"}]}, "subject": {"reference": "Patient/p1"},
            "collection": {"collectedDateTime": "2026-01-10T09:30:00-05:00"}}
    dr = {"resourceType": "DiagnosticReport", "id": "dr1", "status": "final",
          "identifier": [{"system": "http://lab.example/reports", "value": "R-77"}],
          "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "LAB"}]}],
          "code": {"coding": [{"system": LOINC, "code": "94304-3"}]}, "subject": {"reference": "Patient/p1"},
          "effectiveDateTime": "2026-01-10T09:30:00-05:00", "issued": "2026-01-12T11:00:00-05:00",
          "performer": [{"reference": "Organization/lab", "display": "Acme Toxicology"}],
          "specimen": [{"reference": "Specimen/sp1"}], "result": [{"reference": "Observation/oxy"}]}
    patient = {"resourceType": "Patient", "id": "p1",
               "identifier": [{"system": MappingContext().systems.mrn, "value": "M1"}],
               "name": [{"family": "Smith", "given": ["John"]}], "birthDate": "1985-03-02"}
    return {"resourceType": "Bundle", "type": "collection",
            "entry": [{"fullUrl": f"http://ex.org/fhir/{r['resourceType']}/{r['id']}", "resource": r}
                      for r in (patient, dr, obs, spec)]}


def run(path: Path) -> tuple[list, list[Problem]]:
    out = list(pipeline.from_fhir([path]))
    return [o for o in out if not isinstance(o, Problem)], [o for o in out if isinstance(o, Problem)]


def test_lab_screen_written_elsewhere_maps_from_standard_codes(tmp_path):
    path = tmp_path / "lab.json"
    path.write_text(json.dumps(foreign_screen()))
    records, problems = run(path)
    assert problems == []
    (ds,) = [r for r in records if isinstance(r, DrugScreen)]
    assert (ds.screen_id, ds.client_mrn, ds.panel, ds.method, ds.specimen) == \
        ("R-77", "M1", "oxycodone-confirm", "confirmation", "urine")  # method from the confirmatory LOINC
    assert ds.results[0].model_dump() == {"analyte": "oxycodone", "result": "detected", "cutoff": 100,
                                          "measured": 250, "flag": None}
    assert (ds.accession_number, ds.performing_lab) == ("A-991", "Acme Toxicology")
    assert ds.collected_at == datetime(2026, 1, 10, 9, 30, tzinfo=TZ)


def test_contained_results_and_specimen_are_read(tmp_path):
    bundle = foreign_screen()
    patient, dr, obs, spec = (e["resource"] for e in bundle["entry"])
    obs["specimen"] = {"reference": "#sp1"}
    dr |= {"contained": [obs, spec], "result": [{"reference": "#oxy"}], "specimen": [{"reference": "#sp1"}]}
    bundle["entry"] = bundle["entry"][:2]
    path = tmp_path / "contained.json"
    path.write_text(json.dumps(bundle))
    records, problems = run(path)
    assert problems == []
    (ds,) = [r for r in records if isinstance(r, DrugScreen)]
    assert (ds.results[0].analyte, ds.accession_number) == ("oxycodone", "A-991")


def test_screen_method_code_that_fits_two_methods_is_reported(tmp_path):
    bundle = foreign_screen()
    obs = bundle["entry"][2]["resource"]
    obs["code"]["coding"][0]["code"] = "19642-8"  # oxycodone by screen method: point-of-care or lab?
    path = tmp_path / "screen.json"
    path.write_text(json.dumps(bundle))
    records, problems = run(path)
    assert not [r for r in records if isinstance(r, DrugScreen)]
    (p,) = [p for p in problems if p.where.endswith("DiagnosticReport/dr1")]
    assert p.field == "Observation.method" and "screen method" in p.message
    # its Observation and Specimen are not lost silently either
    assert {p.where.rsplit(" ", 1)[-1] for p in problems} == {"DiagnosticReport/dr1", "Observation/oxy",
                                                             "Specimen/sp1"}


def test_result_missing_from_the_input_is_reported(tmp_path):
    bundle = foreign_screen()
    del bundle["entry"][2]
    path = tmp_path / "no-obs.json"
    path.write_text(json.dumps(bundle))
    _, problems = run(path)
    (p,) = [p for p in problems if p.where.endswith("DiagnosticReport/dr1")]
    assert p.field == "DiagnosticReport.result" and "Observation/oxy" in p.message


def test_us_core_cbc_is_reported_as_not_a_drug_screen(tmp_path):
    src = FIXTURES / "us-core" / "examples" / "diagnosticreport-cbc.json"
    if not src.is_file():
        pytest.skip(SKIP_REASON)
    cbc = json.loads(src.read_bytes())
    cbc.pop("text", None)  # the fixture's text has no div (invalid R4, see the fixtures README)
    obs = [json.loads((src.parent / f"observation-cbc-{n}.json").read_bytes()) for n in ("hemoglobin", "mcv")]
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in (cbc, *obs)]}
    path = tmp_path / "cbc.json"
    path.write_text(json.dumps(bundle))
    records, problems = run(path)
    assert not records
    (p,) = [p for p in problems if p.where.endswith(f"DiagnosticReport/{cbc['id']}")]
    assert p.field == "DiagnosticReport.code" and p.severity == "warning"
    assert p.message.startswith("not a drug screen")
    loinc = cbc["code"]["coding"][0]
    assert f"{loinc['system']}|{loinc['code']}" in p.message
    for o in obs:
        assert [q for q in problems if q.where.endswith(f"Observation/{o['id']}")], o["id"]


# -- the fixtures: every DiagnosticReport, Observation and Specimen maps or is reported by name -----

TYPES = ("DiagnosticReport", "Observation", "Specimen")
NS = "http://hl7.org/fhir"


def _labels(path: Path) -> list[tuple[str, str]]:
    """(resource type, its name in Problem.where: "Type/id" or "Type (entry n)"), read without the library."""
    if path.suffix == ".xml":
        root = etree.parse(str(path), etree.XMLParser(resolve_entities=False, no_network=True)).getroot()
        bundle = etree.QName(root).localname == "Bundle"
        els = [e[0] for e in root.iterfind(f"{{{NS}}}entry/{{{NS}}}resource")] if bundle else [root]
        found = [(etree.QName(e).localname, getattr(e.find(f"{{{NS}}}id"), "get", lambda _: None)("value"))
                 for e in els]
    else:
        value = json.loads(path.read_bytes())
        bundle = value.get("resourceType") == "Bundle"
        found = [(r.get("resourceType"), r.get("id"))
                 for r in ([e.get("resource", {}) for e in value.get("entry", ())] if bundle else [value])]
    return [(rt, f"{rt}/{rid}" if rid else f"{rt} (entry {n})" if bundle else rt)
            for n, (rt, rid) in enumerate(found)]


def _fixture_files() -> list:
    if not FIXTURES.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=SKIP_REASON))]
    files = [f for folder, pattern in (("fhir-test-cases-r4-examples", "*.json"), ("fhir-test-cases-r4-examples", "*.xml"),
                                       ("us-core/examples", "*.json"), ("synthea-r4", "*.json"))
             for f in sorted((FIXTURES / folder).glob(pattern))]
    return [pytest.param(f, id=str(f.relative_to(FIXTURES))) for f in files
            if any(rt in TYPES for rt, _ in _labels(f))]


@pytest.mark.parametrize("path", _fixture_files())
def test_fixture_reports_maps_or_names_each_lab_resource(path: Path):
    records, problems = run(path)  # never raises
    screens = {r.screen_id for r in records if isinstance(r, DrugScreen)}
    for rt, label in _labels(path):
        if rt not in TYPES:
            continue
        named = [p for p in problems if p.where == f"{path}: {label}"]
        if not named and rt == "DiagnosticReport" and label.split("/", 1)[1] in screens:
            continue
        assert named, f"{label}: neither mapped nor reported"
        for p in named:
            assert p.severity in ("error", "warning") and not crash_like(p), str(p)
        if rt == "DiagnosticReport" and named[0].code == "not-supported":
            assert named[0].message.startswith("not a drug screen"), named[0].message


# -- bad records -----------------------------------------------------------------------------------

def test_bad_records_are_reported_by_file_line_and_field_and_the_rest_map(tmp_path):
    (tmp_path / "programs.csv").write_text("program_id,name,kind\nSUD-IOP,Harbor Light,substance-use\n")
    (tmp_path / "clients.csv").write_text("mrn,family_name,given_names,birth_date\n"
                                          "M001,Smith,John,1985-03-02\nM002,Doe,Jane,1990-12-01\n")
    (tmp_path / "enrollments.csv").write_text(
        "enrollment_id,client_mrn,program_id,status_history,level_history,admitted_on\n"
        "E1,M001,SUD-IOP,active@2026-01-05,IOP-6@2026-01-05,2026-01-05\n")
    head = "screen_id,client_mrn,enrollment_id,specimen,collected_at,method,panel,results,resulted_at,performing_lab\n"
    rows = [
        ("S1,M001,E1,urine,2026-01-10T09:30,point-of-care,uds-screen,buprenorphine@detected@10@@,,", None, None),
        ("S2,M009,,urine,2026-01-10T09:30,point-of-care,uds-screen,cocaine@detected@@@,,", "client_mrn", "M009"),
        ("S3,M001,,urine,2026-01-10T09:30,point-of-care,uds-screen,heroin@detected@@@,,", "results.0.analyte",
         "heroin"),
        ("S4,M001,,urine,2026-01-10T09:30,lab-immunoassay,uds-screen,cocaine@detected@@@,2026-01-09T09:00,",
         "resulted_at", "before"),
        ("S5,M001,,urine,2026-01-10T09:30,point-of-care,uds-screen,cocaine@detected@@@,,Quest", "performing_lab",
         "point-of-care"),
        ("S6,M002,E1,urine,2026-01-10T09:30,point-of-care,uds-screen,cocaine@detected@@@,,", "enrollment_id",
         "another client"),
        ("S7,M001,E9,urine,2026-01-10T09:30,point-of-care,uds-screen,cocaine@detected@@@,,", "enrollment_id", "E9"),
        ("S8,M001,,urine,2026-01-10T09:30,point-of-care,uds-screen,cocaine@detected@@@;cocaine@not-detected@@@,,",
         "results", "twice"),
    ]
    (tmp_path / "drug_screens.csv").write_text(head + "".join(r + "\n" for r, _, _ in rows))
    out = list(pipeline.to_fhir([tmp_path], strict=True))
    problems = [p for p in out if isinstance(p, Problem)]
    assert len(problems) == len(rows) - 1, "\n".join(map(str, problems))
    for line, (_, field, words) in enumerate(rows, start=2):
        if field is None:
            continue
        (p,) = [p for p in problems if p.where.split(" ")[0] == f"{tmp_path / 'drug_screens.csv'}:{line}"]
        assert (p.field, p.severity) == (field, "error"), str(p)
        assert words in p.message, str(p)
    reports = [r for r in out if isinstance(r, dict) and r["resourceType"] == "DiagnosticReport"]
    assert [r["identifier"][0]["value"] for r in reports] == ["S1"]
