"""What comes in from an EHR maps to IOP records: referrals (ServiceRequest), outside medications
(MedicationStatement, an EHR's MedicationRequest), a Patient linked to one of our clients, Conditions as
referral reasons, lab drug screens — and what is no IOP concept is reported, never silently lost.
Round trips of the new record types, realistic EHR resources (US Core, R4 examples, Synthea), and an end
to end pull from sekmet-fhir followed by ``fhir-iop export``."""

from __future__ import annotations

import json
import re
from datetime import date
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from ehr_kit import Sekmet
from server_kit import db_url  # noqa: F401  (fixture: SQLite and PostgreSQL)

from fhir_iop import pipeline
from fhir_iop.cli import main
from fhir_iop.errors import Problem
from fhir_iop.fhir.io import BundleWriter
from fhir_iop.mapping import outside_medication, referral
from fhir_iop.mapping.common import MappingContext
from fhir_iop.records.model import Client, DrugScreen, MatMedication, OutsideMedication, Referral, default_context
from fhir_iop.store import Store
from fhir_iop.store.iop import load
from fhir_iop.sync.config import parse
from fhir_iop.sync.pull import link_client, local_id, pull

ROOT = Path(__file__).resolve().parents[1]
CLINIC = ROOT / "examples" / "clinic"
FIXTURES = ROOT.parent / "shared" / "fixtures"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"
OBS_INTERP = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"


def fixture(rel: str) -> Path:
    path = FIXTURES / rel
    if not path.is_file():
        pytest.skip(f"fixture {rel} not found")
    return path


def write_bundle(resources, path: Path) -> Path:
    with open(path, "wb") as f:
        w = BundleWriter(f, "collection", "json")
        for r in resources:
            w.write(r)
        w.close()
    return path


def run(*paths):
    out = list(pipeline.from_fhir(list(paths)))
    return [o for o in out if not isinstance(o, Problem)], [o for o in out if isinstance(o, Problem)]


def site():
    return MappingContext().settings.identifier_systems


# -- round trips: record → FHIR → record --------------------------------------------------------------

REFERRALS = [
    dict(referral_id="R1", client_mrn="M1", status="active", requested_on="2026-03-11"),
    dict(referral_id="R2", client_mrn="M1", status="completed", requested_on="2026-01-12", program_id="SUD-IOP",
         level="IOP-3", referring_practitioner="Dana Whitfield MD", referring_organization="Shore Family Medicine",
         reason_icd10cm=["F11.20", "F10.20"], reason_snomed=["75544000"], reason_text="opioid use",
         note="Call to schedule.\nPrefers mornings."),
    dict(referral_id="R3", client_mrn="M2", status="revoked", requested_on="2025-12-26",
         referring_organization="Jersey Shore Medical Center", service_snomed="24165007"),
    dict(referral_id="R4", client_mrn="M2", status="on-hold", requested_on="2025-12-26",
         referring_practitioner="Marcus Lee LCADC", service_snomed="1254709001"),
]
OUTSIDE = [
    dict(outside_medication_id="O1", client_mrn="M1", medication="sertraline 50 mg tablet", status="active"),
    dict(outside_medication_id="O2", client_mrn="M1", medication="buprenorphine 8 MG / naloxone 2 MG Sublingual Tablet",
         rxnorm="351267", status="stopped", start="2026-01-02", end="2026-02-27", dosage="1 tablet once a day",
         prescriber="Dana Whitfield MD", recorded_on="2026-01-02"),
    dict(outside_medication_id="O3", client_mrn="M2", medication="naltrexone 50 mg", rxnorm="1483744",
         status="not-taken", end="2026-02-01"),
]


@pytest.mark.parametrize("model,data", [(Referral, d) for d in REFERRALS] + [(OutsideMedication, d) for d in OUTSIDE],
                         ids=lambda v: v.get("referral_id") or v.get("outside_medication_id") if isinstance(v, dict)
                         else v.__name__)
def test_record_to_fhir_to_record(model, data, tmp_path):
    rec = model.model_validate(data, context=default_context())
    ctx = MappingContext()
    problems: list = []
    resources = pipeline.TO_FHIR[model](rec, ctx, problems)
    assert problems == []
    (res,) = resources
    assert res["resourceType"] == {Referral: "ServiceRequest", OutsideMedication: "MedicationStatement"}[model]
    assert res["meta"]["profile"][0].endswith({Referral: "iop-referral",
                                               OutsideMedication: "iop-outside-medication"}[model])
    assert {s["code"] for s in res["meta"]["security"]} == {"R", "42CFRPart2", "SUD", "NORDSCLCD"}
    records, problems = run(write_bundle(resources, tmp_path / "b.json"))
    assert problems == [] and records == [rec]


def test_referral_in_fhir_words():
    rec = Referral.model_validate(REFERRALS[1], context=default_context())
    (sr,) = referral.to_fhir(rec, MappingContext(), [])
    assert sr["code"]["coding"][0] == {"system": SNOMED, "code": "1254709001",
                                       "display": "Referral to substance use disorder treatment program (procedure)"}
    assert sr["code"]["coding"][1]["code"] == "IOP-3"
    assert sr["requester"] == {"type": "Practitioner", "display": "Dana Whitfield MD"}
    assert sr["extension"][0]["valueReference"]["display"] == "Shore Family Medicine"
    assert sr["performer"][0]["identifier"] == {"system": site().program, "value": "SUD-IOP"}
    assert [c.get("coding", [{}])[0].get("code") for c in sr["reasonCode"]] == ["F11.20", "F10.20", "75544000", None]
    assert sr["authoredOn"] == "2026-01-12" and sr["identifier"] == [{"system": site().referral, "value": "R2"}]


def test_the_example_clinic_exports_its_referrals_and_outside_medications(tmp_path):
    bundle = write_bundle([r for r in pipeline.to_fhir([CLINIC]) if isinstance(r, dict)], tmp_path / "clinic.json")
    records, problems = run(bundle)
    assert problems == []
    assert {r.referral_id for r in records if isinstance(r, Referral)} == {"R000001", "R000002", "R000003"}
    meds = {r.outside_medication_id: r for r in records if isinstance(r, OutsideMedication)}
    assert meds["OM000001"].rxnorm == "351267" and meds["OM000001"].status == "active"


# -- realistic EHR resources -------------------------------------------------------------------------

def test_us_core_rehab_service_request_is_a_referral():
    """US Core's 'Alcohol rehabilitation' order (SNOMED 24165007, reference §4) with its patient and requester."""
    path = fixture("us-core/examples/servicerequest-rehab.json")
    src = json.loads(path.read_bytes())
    records, problems = run(path, fixture("us-core/examples/patient-example.json"),
                            fixture("us-core/examples/practitioner-1.json"))
    (r,) = [r for r in records if isinstance(r, Referral)]
    assert r.referral_id == "rehab" and r.status == "active" and r.service_snomed == "24165007"
    assert r.requested_on == date(2021, 11, 12)
    assert r.referring_practitioner == "Dr Ronald Bone"  # resolved from practitioner-1's name
    assert r.reason_text == src["reasonReference"][0]["display"]  # an Observation, not in this input: its words
    (client,) = [c for c in records if isinstance(c, Client)]
    assert r.client_mrn == client.mrn
    assert not [p for p in problems if "ServiceRequest" in p.where]


@pytest.mark.parametrize("name", ["servicerequest-cbc.json", "servicerequest-chest-xray.json"])
def test_other_service_requests_are_not_an_iop_concept(name):
    path = fixture(f"us-core/examples/{name}")
    records, problems = run(path)
    assert not [r for r in records if isinstance(r, Referral)]
    (p,) = [p for p in problems if "ServiceRequest/" in p.where]
    assert p.severity == "warning" and p.field == "ServiceRequest.code"
    assert p.message.startswith("not an IOP concept") and "kept in the store" in p.message


def test_r4_medication_statement_example_is_an_outside_medication(tmp_path):
    path = fixture("fhir-test-cases-r4-examples/medicationstatementexample1.json")
    patient = write_bundle([{"resourceType": "Patient", "id": "pat1", "identifier": [{"system": "urn:x", "value": "P1"}],
                             "name": [{"family": "Duck", "given": ["Donald"]}], "birthDate": "1950-06-09"}], tmp_path / "pt.json")
    records, problems = run(path, patient)
    (m,) = [r for r in records if isinstance(r, OutsideMedication)]
    assert (m.outside_medication_id, m.client_mrn, m.status) == ("12345689", "P1", "active")
    assert m.medication == "Tylenol PM" and m.rxnorm is None  # the contained Medication's NDC display
    assert m.start == date(2015, 1, 23) and m.recorded_on == date(2015, 2, 22)
    assert m.dosage.startswith("1-2 tablets once daily")
    assert m.prescriber is None  # the informationSource is the patient, not a prescriber
    assert problems == []


def _with_prescriptions() -> list:
    """The Synthea bundles that hold MedicationRequests (the others have nothing to test here)."""
    return [p for p in sorted((FIXTURES / "synthea-r4").glob("*.json"))
            if '"resourceType": "MedicationRequest"' in p.read_text(encoding="utf-8")
            or '"resourceType":"MedicationRequest"' in p.read_text(encoding="utf-8")]


@pytest.mark.parametrize("path", _with_prescriptions() or
                         [pytest.param(None, marks=pytest.mark.skip(reason="no Synthea fixtures"))],
                         ids=lambda p: p.name.split("_")[0] if p else "none")
def test_synthea_prescriptions_pulled_from_an_ehr_are_outside_medications(path, tmp_path):
    """The same MedicationRequests are MAT candidates in a file (reported as not MAT: see test_mat_medication)
    and outside medications once another system recorded them (meta.source, as a pull stores them)."""
    bundle = json.loads(path.read_bytes())
    meds = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "MedicationRequest"]
    assert meds
    for e in bundle["entry"]:
        if e["resource"]["resourceType"] == "MedicationRequest":
            e["resource"].setdefault("meta", {})["source"] = f"https://ehr.example.org/fhir/MedicationRequest/{e['resource']['id']}"
    pulled = tmp_path / path.name
    pulled.write_text(json.dumps(bundle))
    records, problems = run(pulled)
    out = [r for r in records if isinstance(r, OutsideMedication)]
    assert not [r for r in records if isinstance(r, MatMedication)]
    assert sorted(m.rxnorm for m in out) == sorted(m["medicationCodeableConcept"]["coding"][0]["code"] for m in meds)
    assert not [p for p in problems if "MedicationRequest/" in p.where]
    (client,) = [c for c in records if isinstance(c, Client)]
    assert {m.client_mrn for m in out} == {client.mrn}


def test_an_outside_request_with_the_sites_mat_identifier_stays_a_mat_order():
    ctx = MappingContext()
    req = {"resourceType": "MedicationRequest", "meta": {"source": "https://ehr.example.org/fhir"},
           "identifier": [{"system": ctx.systems.mat_medication, "value": "MAT1"}]}
    assert not outside_medication.is_outside_request(req, ctx)
    assert outside_medication.is_outside_request({**req, "identifier": []}, ctx)
    assert not outside_medication.is_outside_request({**req, "meta": {}, "identifier": []}, ctx)


def ehr_chart(mrn_system: str, mrn: str, prefix: str = "") -> list[dict]:
    """An EHR's chart of one patient: the Patient (carrying our MRN), a Condition, a referral citing it, an
    outside prescription, a reported medication, a drug screen (report, two results) and a hepatitis C test."""
    p = prefix
    subject = {"reference": f"Patient/{p}pt-1"}
    def result(oid, loinc, display, detected, measured, cutoff):
        return {"resourceType": "Observation", "id": f"{p}{oid}", "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                          "code": "laboratory"}]}],
                "code": {"coding": [{"system": LOINC, "code": loinc, "display": display}]}, "subject": subject,
                "effectiveDateTime": "2026-03-09T09:10:00-05:00",
                "valueQuantity": {"value": measured, "unit": "ng/mL", "system": "http://unitsofmeasure.org",
                                  "code": "ng/mL"},
                "interpretation": [{"coding": [{"system": OBS_INTERP, "code": "DET" if detected else "ND"}]}],
                "referenceRange": [{"high": {"value": cutoff, "unit": "ng/mL", "system": "http://unitsofmeasure.org",
                                             "code": "ng/mL"}}]}
    return [
        {"resourceType": "Patient", "id": f"{p}pt-1",
         "identifier": [{"system": "urn:oid:2.16.840.1.113883.3.9999.1", "value": "E-77812"},
                        {"system": mrn_system, "value": mrn}],
         "name": [{"family": "Murphy", "given": ["Anjali"]}], "gender": "female", "birthDate": "1995-09-18",
         "telecom": [{"system": "phone", "value": "732-555-0999"}],
         "contact": [{"relationship": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0131",
                                                     "code": "C"}]}],
                      "name": {"text": "Ravi Murphy"}, "telecom": [{"system": "phone", "value": "732-555-0123"}]}]},
        {"resourceType": "Condition", "id": f"{p}cond-1", "subject": subject,
         "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                        "code": "active"}]},
         "code": {"coding": [{"system": ICD10CM, "code": "F11.20"}, {"system": SNOMED, "code": "75544000"}],
                  "text": "Opioid dependence"}},
        {"resourceType": "Condition", "id": f"{p}cond-2", "subject": subject,
         "code": {"coding": [{"system": ICD10CM, "code": "F10.10"}], "text": "Alcohol abuse"}},
        {"resourceType": "ServiceRequest", "id": f"{p}ref-1",
         "identifier": [{"system": "urn:oid:2.16.840.1.113883.3.9999.2", "value": "REF-4471"}],
         "status": "active", "intent": "order",
         "code": {"coding": [{"system": SNOMED, "code": "1254709001"}], "text": "Referral to IOP"},
         "subject": subject, "authoredOn": "2026-03-10T14:02:00-05:00",
         "requester": {"display": "Priya Natarajan MD"}, "reasonReference": [{"reference": f"Condition/{p}cond-1"}],
         "note": [{"text": "Discharged from detox; needs IOP within a week."}]},
        {"resourceType": "MedicationRequest", "id": f"{p}rx-1",
         "identifier": [{"system": "urn:oid:2.16.840.1.113883.3.9999.2", "value": "RX-5520"}],
         "status": "active", "intent": "order",
         "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "351267"}],
                                       "text": "buprenorphine 8 MG / naloxone 2 MG Sublingual Tablet"},
         "subject": subject, "authoredOn": "2026-03-10", "requester": {"display": "Priya Natarajan MD"},
         "dosageInstruction": [{"text": "1 tablet sublingual once a day"}]},
        {"resourceType": "MedicationStatement", "id": f"{p}ms-1",
         "identifier": [{"system": "urn:oid:2.16.840.1.113883.3.9999.2", "value": "MS-310"}],
         "status": "active", "medicationCodeableConcept": {"text": "sertraline 50 mg tablet"}, "subject": subject,
         "effectivePeriod": {"start": "2025-06-01"}},
        result("obs-bup", "16208-1", "Buprenorphine [Mass/volume] in Urine by Confirmatory method", True, 42, 5),
        result("obs-fen", "40839-3", "fentaNYL [Mass/volume] in Urine by Confirmatory method", False, 0, 1),
        {"resourceType": "DiagnosticReport", "id": f"{p}dr-1",
         "identifier": [{"system": "urn:oid:2.16.840.1.113883.3.9999.2", "value": "LAB-90021"}],
         "status": "final",
         "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "LAB"}]}],
         "code": {"coding": [{"system": LOINC, "code": "87428-9"}]}, "subject": subject,
         "effectiveDateTime": "2026-03-09T09:10:00-05:00", "issued": "2026-03-10T08:00:00-05:00",
         "performer": [{"display": "Shore Reference Laboratory"}],
         "result": [{"reference": f"Observation/{p}obs-bup"}, {"reference": f"Observation/{p}obs-fen"}]},
        {"resourceType": "Observation", "id": f"{p}obs-hcv", "status": "final", "subject": subject,
         "code": {"text": "hepatitis C antibody"}, "valueString": "negative"},
    ]


def test_a_linked_ehr_patient_maps_as_our_client_with_its_chart(tmp_path):
    """The EHR's Patient linked (seealso) to ours: one client, our values kept, its emergency contact added;
    everything that references the EHR's Patient maps to that client."""
    ctx = MappingContext()
    ours = [r for r in pipeline.to_fhir([CLINIC]) if isinstance(r, dict)
            and r["resourceType"] in ("Patient", "Organization")]
    chart = ehr_chart("urn:oid:2.16.840.1.113883.3.9999.1", "E-77812")
    chart[0]["link"] = [{"other": {"reference": f"Patient/{ctx.rid('client', 'M100008')}"}, "type": "seealso"}]
    records, problems = run(write_bundle(ours + chart, tmp_path / "all.json"))
    clients = [c for c in records if isinstance(c, Client)]
    assert len(clients) == 25 and [c.mrn for c in clients].count("M100008") == 1
    (c,) = [c for c in clients if c.mrn == "M100008"]
    assert c.phone == "732-555-0144"  # ours wins
    assert (c.emergency_contact_name, c.emergency_contact_phone) == ("Ravi Murphy", "732-555-0123")  # filled
    (r,) = [r for r in records if isinstance(r, Referral)]
    assert (r.client_mrn, r.referral_id, r.reason_icd10cm, r.reason_snomed) == \
        ("M100008", "REF-4471", ["F11.20"], ["75544000"])
    assert r.referring_practitioner == "Priya Natarajan MD" and r.requested_on == date(2026, 3, 10)
    assert r.note == "Discharged from detox; needs IOP within a week."
    (ms,) = [m for m in records if isinstance(m, OutsideMedication)]  # no meta.source here: rx-1 is a MAT candidate
    assert (ms.client_mrn, ms.outside_medication_id, ms.start) == ("M100008", "MS-310", date(2025, 6, 1))
    (ds,) = [d for d in records if isinstance(d, DrugScreen)]
    assert (ds.client_mrn, ds.method, ds.specimen, ds.panel) == ("M100008", "confirmation", "urine", "uds-reflex")
    assert {(a.analyte, a.result) for a in ds.results} == {("buprenorphine", "detected"), ("fentanyl", "not-detected")}
    by_where = {p.where.rsplit(": ", 1)[1]: p for p in problems}
    assert by_where["Patient/pt-1"].severity == "information"
    assert "not an IOP concept" in by_where["Observation/obs-hcv"].message
    assert "EpisodeOfCare" in by_where["Condition/cond-2"].message  # not cited by the referral: reported
    assert "Condition/cond-1" not in by_where  # mapped as the referral's reason


def test_link_client_by_the_sites_mrn_or_a_configured_match_system(db_url, tmp_path, monkeypatch):  # noqa: F811
    store = Store(db_url)
    try:
        with store.transaction() as tx:
            ctx = MappingContext()
            tx.update("Patient", ctx.rid("client", "M9"), {"resourceType": "Patient", "id": ctx.rid("client", "M9"),
                                                            "identifier": [{"system": ctx.systems.mrn, "value": "M9"}]})
        pt = {"resourceType": "Patient", "identifier": [{"system": "urn:hie:mrn-of-harborlight", "value": "M9"}]}
        with store.reading() as tx:
            assert link_client(tx, {"resourceType": "Patient", "identifier": [
                {"system": ctx.systems.mrn, "value": "M9"}]}, ctx) == ctx.rid("client", "M9")
            assert link_client(tx, pt, ctx) is None  # not a system the site matches on
            assert link_client(tx, {"resourceType": "Patient", "identifier": [
                {"system": ctx.systems.mrn, "value": "M8"}]}, ctx) is None  # no such client
        mappings = tmp_path / "mappings"
        mappings.mkdir()
        data = json.loads((ROOT / "mappings" / "site.json").read_text())
        data["mrn_match_systems"] = ["urn:hie:mrn-of-harborlight"]
        (mappings / "site.json").write_text(json.dumps(data))
        monkeypatch.setenv("FHIR_IOP_MAPPINGS", str(mappings))
        with store.reading() as tx:
            assert link_client(tx, pt, MappingContext()) == ctx.rid("client", "M9")
    finally:
        store.dispose()


# -- end to end: pull from sekmet-fhir, then fhir-iop export ---------------------------------------

PULLED = ("Patient", "Condition", "ServiceRequest", "MedicationStatement", "MedicationRequest", "Observation",
          "DiagnosticReport")


def test_pull_then_export_gives_the_iop_records(db_url, tmp_path):  # noqa: F811
    store = Store(db_url)
    try:
        result = load(store, [CLINIC])
        assert result.types["Patient"] == 25
        ctx = MappingContext()
        with Sekmet(tmp_path / "sekmet") as ehr:
            chart = ehr_chart(ctx.systems.mrn, "M100008")  # the hospital records our MRN under our system
            stranger = {"resourceType": "Patient", "id": "pt-2", "name": [{"family": "Okafor", "given": ["Ben"]}], "birthDate": "1988-02-14",
                        "identifier": [{"system": "urn:oid:2.16.840.1.113883.3.9999.1", "value": "E-90001"}]}
            ehr.transaction([*chart, stranger], method="PUT")
            conn = parse({"connections": {"county": {"base_url": ehr.base_url, "page_size": 4,
                                                     "resources": {t: "pull" for t in PULLED}}}})["county"]
            pulled = pull(store, conn)
        assert pulled.ok, pulled.errors
        assert pulled.total("created") == len(chart) + 1
        ours = ctx.rid("client", "M100008")
        with store.reading() as tx:
            pt = tx.read("Patient", local_id("county", "Patient", "pt-1")).resource
            assert pt["link"] == [{"other": {"reference": f"Patient/{ours}"}, "type": "seealso"}]
            assert "link" not in tx.read("Patient", local_id("county", "Patient", "pt-2")).resource
            assert "link" not in tx.read("Patient", ours).resource  # ours is never written by a pull
            for rt, rid in (("ServiceRequest", "ref-1"), ("Condition", "cond-1"), ("DiagnosticReport", "dr-1"),
                            ("MedicationRequest", "rx-1")):
                assert tx.read(rt, local_id("county", rt, rid)).resource["subject"]["reference"] == f"Patient/{ours}"
        out = tmp_path / "records"
        outcome = tmp_path / "outcome.json"
        res = CliRunner().invoke(main, ["export", "--out", str(out), "--format", "ndjson", "--database", db_url,
                                        "--problems", str(outcome), "-q"], catch_exceptions=False)
    finally:
        store.dispose()

    def records(stem):
        f = out / f"{stem}.ndjson"
        return [orjson.loads(line) for line in f.read_bytes().splitlines()] if f.exists() else []

    clients = records("clients")
    assert len(clients) == 26  # the clinic's 25 and the stranger; the linked Patient is no second client
    assert [c["mrn"] for c in clients].count("M100008") == 1
    (m,) = [c for c in clients if c["mrn"] == "M100008"]
    assert m["emergency_contact_name"] == "Ravi Murphy" and m["phone"] == "732-555-0144"
    assert [c["mrn"] for c in clients if c["family_name"] == "Okafor"] == ["E-90001"]
    (ref,) = [r for r in records("referrals") if r["referral_id"] == "REF-4471"]
    assert (ref["client_mrn"], ref["reason_icd10cm"], ref["status"]) == ("M100008", ["F11.20"], "active")
    assert len(records("referrals")) == 4  # the clinic's three and the pulled one
    outside = {o["outside_medication_id"]: o for o in records("outside_medications")}
    assert outside["RX-5520"]["rxnorm"] == "351267" and outside["RX-5520"]["client_mrn"] == "M100008"
    assert outside["RX-5520"]["prescriber"] == "Priya Natarajan MD"
    assert outside["MS-310"]["medication"] == "sertraline 50 mg tablet"
    assert len(outside) == 5  # the clinic's three and the two pulled
    (screen,) = [s for s in records("drug_screens") if s["screen_id"] == "LAB-90021"]
    assert screen["client_mrn"] == "M100008" and screen["performing_lab"] == "Shore Reference Laboratory"
    assert len(records("mat_medications")) == len(list((CLINIC / "mat_medications.csv").open())) - 1  # no MAT added
    # nothing silently lost: every pulled resource not in a record is named in the outcome
    issues = orjson.loads(outcome.read_bytes())["issue"]
    named = sorted(re.search(r"\.ndjson:\d+: (\w+/[\w.-]+): ", i["diagnostics"]).group(1) for i in issues)
    assert named == sorted([f"Condition/{local_id('county', 'Condition', 'cond-2')}",
                            f"Observation/{local_id('county', 'Observation', 'obs-hcv')}",
                            f"Patient/{local_id('county', 'Patient', 'pt-1')}"]), issues
    assert {i["severity"] for i in issues} == {"warning", "information"}
    assert res.exit_code == 1  # content reported as not mapped (the hepatitis C test, the uncited Condition)


def test_a_linked_patient_is_a_note_not_a_failure_of_the_command(tmp_path):
    """`fhir-iop map from-fhir`: the linked Patient is reported as information (exit 0), read as our client."""
    ctx = MappingContext()
    ours = [r for r in pipeline.to_fhir([CLINIC / "clients.csv"]) if isinstance(r, dict)
            and r["id"] == ctx.rid("client", "M100008")]
    ehr = ehr_chart(ctx.systems.mrn, "M100008")[0]
    ehr["link"] = [{"other": {"reference": f"Patient/{ours[0]['id']}"}, "type": "seealso"}]
    bundle = write_bundle([*ours, ehr], tmp_path / "b.json")
    res = CliRunner().invoke(main, ["map", "from-fhir", str(bundle), "--out", str(tmp_path / "out")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    assert "0 rejected, 0 not mapped, 1 note(s)" in res.stderr
    rows = (tmp_path / "out" / "clients.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 2 and rows[1].startswith("M100008,Murphy,Anjali") and rows[1].endswith("Ravi Murphy,732-555-0123")


def test_an_ehr_patient_pulled_before_its_client_was_loaded_is_still_one_client(tmp_path):
    """No link yet (the client's Patient was not stored when it was pulled), but recorded by the EHR
    (meta.source) with the client's MRN: read as that client, and the chart maps to it."""
    ctx = MappingContext()
    ours = [r for r in pipeline.to_fhir([CLINIC / "clients.csv"]) if isinstance(r, dict)]
    chart = ehr_chart(ctx.systems.mrn, "M100008")
    chart[0]["meta"] = {"source": "https://ehr.example.org/fhir/Patient/pt-1/_history/3"}
    other = {**chart[0], "id": "pt-9", "identifier": [{"system": ctx.systems.mrn, "value": "M999999"}]}
    records, problems = run(write_bundle([*ours, *chart[:4], other], tmp_path / "b.json"))
    clients = [c for c in records if isinstance(c, Client)]
    assert [c.mrn for c in clients].count("M100008") == 1 and len(clients) == 26  # 25 and the unknown MRN
    assert next(c for c in clients if c.mrn == "M100008").emergency_contact_name == "Ravi Murphy"
    (r,) = [r for r in records if isinstance(r, Referral)]
    assert r.client_mrn == "M100008"
    assert [p.severity for p in problems if p.where.endswith("Patient/pt-1")] == ["information"]


def test_a_drug_result_without_its_report_is_reported_as_such_not_as_foreign(tmp_path):
    """A lone drug-analyte Observation (no DiagnosticReport: no panel) is named as a drug-screen result that
    nothing includes; a lone hepatitis C result as not an IOP concept."""
    chart = ehr_chart("urn:x", "P1")
    lone = [chart[0], chart[6], chart[-1]]  # the Patient, the buprenorphine result, the hepatitis C test
    records, problems = run(write_bundle(lone, tmp_path / "b.json"))
    assert not [r for r in records if isinstance(r, DrugScreen)]
    by_where = {p.where.rsplit(": ", 1)[1]: p for p in problems}
    assert "as a result of a drug screen (DiagnosticReport.result)" in by_where["Observation/obs-bup"].message
    assert by_where["Observation/obs-hcv"].message.startswith("not an IOP concept")
    assert {p.severity for p in problems} == {"warning"}


def test_resources_pulled_before_their_patient_are_pointed_at_our_client_when_it_is_linked(db_url, tmp_path):  # noqa: F811
    store = Store(db_url)
    try:
        load(store, [CLINIC / "clients.csv"])
        ctx = MappingContext()
        ours = ctx.rid("client", "M100008")
        with Sekmet(tmp_path / "sekmet") as ehr:
            chart = ehr_chart(ctx.systems.mrn, "M100008")
            ehr.transaction(chart[:4], method="PUT")  # the Patient, two Conditions, the referral
            conn = parse({"connections": {"county": {"base_url": ehr.base_url, "resources": {
                "ServiceRequest": "pull", "Condition": "pull", "Patient": "pull"}}}})["county"]  # Patient last
            pulled = pull(store, conn)
        assert pulled.ok, pulled.errors
        with store.reading() as tx:
            for rt, rid in (("ServiceRequest", "ref-1"), ("Condition", "cond-1"), ("Condition", "cond-2")):
                res = tx.read(rt, local_id("county", rt, rid))
                assert res.resource["subject"]["reference"] == f"Patient/{ours}", rt
                assert res.version_id == 2  # created pointing at the EHR's Patient, then pointed at ours
            assert tx.read("Patient", ours).version_id == 1
    finally:
        store.dispose()
