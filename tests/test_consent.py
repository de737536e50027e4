"""consent ⇄ Consent (42 CFR Part 2): round trips, shape and codes, foreign FHIR, bad input, ``covers``."""

from __future__ import annotations

import copy
import json
import re
from datetime import date, timedelta
from pathlib import Path
from typing import get_args

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_codes import allowed_codes, walk_codings
from test_roundtrip import by_type, write_bundle

from fhir_iop import pipeline
from fhir_iop.errors import Problem
from fhir_iop.fhir import r4
from fhir_iop.fhir.io import NdjsonWriter
from fhir_iop.mapping.common import NPI, PART2_LABELS, FhirIndex, MappingContext, Unmappable, ext_url
from fhir_iop.mapping.consent import (ACT_REASON, POLICY_URI, PURPOSES, RESOURCE_TYPES, covers, from_fhir)
from fhir_iop.records.model import Client, Consent, Program, ReasonCode, default_context
from fhir_iop.terminology import load_terminology

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
REFERENCE = ROOT.parent / "shared" / "reference" / "domain-codes.md"
TERMS = load_terminology()
DATA_CLASSES = sorted(TERMS.codes("consent-data-class"))
RECIPIENT_KINDS = sorted(TERMS.codes("recipient-kind"))
LABELS = {(c["system"], c["code"]) for c in PART2_LABELS}


def consent(**kw) -> Consent:
    return Consent.model_validate(kw, context=default_context())


PROGRAM = Program(program_id="SUD-IOP", name="Harbor Light Adult SUD IOP", kind="substance-use", npi="1234567893")
CLIENTS = [Client(mrn="M001", family_name="Smith", given_names=["John"], birth_date=date(1985, 3, 2)),
           Client(mrn="M002", family_name="Doe", given_names=["Jane"], birth_date=date(1990, 12, 1))]
EHR = consent(consent_id="CN-1", client_mrn="M001", program_id="SUD-IOP", recipient_id="ATLANTIC-PC",
              recipient_name="Atlantic Primary Care", recipient_kind="ehr", recipient_npi="1111111112",
              purposes=["TREAT", "COC"],
              data_classes=["enrollment", "encounters", "drug-screens", "medications", "care-plans"],
              signed_on="2026-01-05", start="2026-01-05", end="2027-01-04")
PAYER = consent(consent_id="CN-2", client_mrn="M001", program_id="SUD-IOP", recipient_id="AETNA",
                recipient_name="Aetna Behavioral Health", recipient_kind="payer", purposes=["HPAYMT"],
                data_classes=["demographics", "enrollment", "encounters", "coverage"],
                signed_on="2026-01-05", start="2026-01-05", end="2026-12-31")
REVOKED = consent(consent_id="CN-3", client_mrn="M002", program_id="SUD-IOP", recipient_id="MOM",
                  recipient_name="Mary Doe", recipient_kind="family", purposes=["PATRQT"],
                  data_classes=["encounters"], signed_on="2026-01-12", start="2026-01-14",
                  revoked_on="2026-02-20")
HAND = [EHR, PAYER, REVOKED]


def map_all(records, seen=("programs", "clients", "consents")) -> list:
    ctx = MappingContext()
    ctx.seen_types |= set(seen)
    return list(pipeline.map_records(records, ctx, strict=True))


def consents_of(out) -> dict[str, dict]:
    assert [o for o in out if not isinstance(o, dict)] == []
    return {r["identifier"][0]["value"]: r for r in out if r["resourceType"] == "Consent"}


def round_trip(records, tmp_path: Path, encoding="json", seen=("programs", "clients", "consents")):
    path = tmp_path / f"bundle.{encoding}"
    out = map_all(records, seen)
    assert [str(o) for o in out if not isinstance(o, dict)] == []
    write_bundle(out, path, encoding)
    return by_type(pipeline.from_fhir([path]))


def read_back(resources: list[dict], tmp_path: Path) -> list:
    path = tmp_path / "foreign.json"
    write_bundle(resources, path)
    return list(pipeline.from_fhir([path]))


# -- round trips ------------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding", ["json", "xml"])
def test_hand_written_consents_round_trip(tmp_path, encoding):
    back = round_trip([PROGRAM, *CLIENTS, *HAND], tmp_path, encoding)
    assert back[Consent] == HAND
    assert back[Program] == [PROGRAM] and back[Client] == CLIENTS


def test_round_trip_through_ndjson(tmp_path):
    nd = NdjsonWriter(tmp_path / "nd")
    for r in map_all([PROGRAM, *CLIENTS, *HAND]):
        nd.write(r)
    nd.close()
    back = by_type(pipeline.from_fhir(sorted((tmp_path / "nd").glob("*.ndjson"))))
    assert back[Consent] == HAND


def test_consent_alone_reads_back_through_its_references(tmp_path):
    """Patient and program references carry their identifiers: a Consent maps back on its own."""
    back = round_trip(HAND, tmp_path, seen=("consents",))
    assert back[Consent] == HAND


def test_data_classes_read_back_from_resource_types_without_the_extension(tmp_path):
    """Another system keeping only the standard elements: provision.class reverses through the ConceptMap."""
    out = map_all([PROGRAM, *CLIENTS, *HAND])
    for r in out:
        for p in r.get("provision", {}).get("provision", ()):
            p.pop("extension")
    back = by_type(read_back(out, tmp_path))
    assert back[Consent] == HAND


ids = st.from_regex(r"[A-Z][A-Z0-9\-]{1,10}", fullmatch=True)
names = st.from_regex(r"[A-Z][a-z]{1,10}( [A-Z][a-z]{1,10}){0,2}", fullmatch=True)
days = st.dates(min_value=date(2024, 1, 1), max_value=date(2027, 12, 31))
npis = st.sampled_from(["1234567893", "1111111112", "1245319599", "1972548733"])


@st.composite
def consents(draw, key: str, mrn: str) -> Consent:
    signed = draw(days)
    start = signed + timedelta(days=draw(st.integers(0, 30)))
    end = draw(st.none() | st.integers(0, 730).map(lambda n: start + timedelta(days=n)))
    revoked = draw(st.none() | st.integers(0, 800).map(lambda n: signed + timedelta(days=n)))
    return Consent(consent_id=key, client_mrn=mrn, program_id="SUD-IOP", recipient_id=draw(ids),
                   recipient_name=draw(names), recipient_kind=draw(st.sampled_from(RECIPIENT_KINDS)),
                   recipient_npi=draw(st.none() | npis),
                   purposes=draw(st.lists(st.sampled_from(get_args(ReasonCode)), min_size=1, max_size=4, unique=True)),
                   data_classes=draw(st.permutations(DATA_CLASSES).flatmap(
                       lambda p: st.integers(1, len(p)).map(lambda n: list(p[:n])))),
                   signed_on=signed, start=start, end=end, revoked_on=revoked)


@st.composite
def consent_sets(draw) -> list[Consent]:
    return [draw(consents(f"CN-{i}", draw(st.sampled_from(["M001", "M002"])))) for i in range(draw(st.integers(1, 4)))]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(consent_sets())
def test_generated_consents_round_trip(tmp_path_factory, generated):
    back = round_trip([PROGRAM, *CLIENTS, *generated], tmp_path_factory.mktemp("gen"))
    assert back[Consent] == generated


# -- shape, labels and codes ---------------------------------------------------------------------

def test_every_consent_is_valid_r4_profiled_and_part2_labelled():
    for r in consents_of(map_all([PROGRAM, *CLIENTS, *HAND])).values():
        assert r4.structure_errors(r) == []
        assert r["meta"]["profile"] == ["http://fhir-iop.org/fhir/StructureDefinition/iop-part2-consent"]
        assert {(s["system"], s["code"]) for s in r["meta"]["security"]} == LABELS


def test_consent_structure():
    c = consents_of(map_all([PROGRAM, *CLIENTS, *HAND]))
    ehr, revoked = c["CN-1"], c["CN-3"]
    assert ehr["status"] == "active" and "extension" not in ehr
    assert ehr["scope"]["coding"][0]["code"] == "patient-privacy"
    assert ehr["category"][0]["coding"][0] == {"system": "http://loinc.org", "code": "59284-0",
                                              "display": "Consent Document"}
    assert ehr["patient"]["identifier"]["value"] == "M001" and ehr["performer"] == [ehr["patient"]]
    assert ehr["organization"][0]["identifier"]["value"] == "SUD-IOP"
    assert ehr["dateTime"] == "2026-01-05"
    assert ehr["policyRule"]["coding"][0]["code"] == "42CFRPart2"
    assert ehr["policy"] == [{"uri": POLICY_URI}]
    root = ehr["provision"]
    assert root["type"] == "deny" and set(root) == {"type", "provision"}
    assert [p["purpose"] for p in root["provision"]] == [
        [{"system": ACT_REASON, "code": "TREAT", "display": "treatment"}],
        [{"system": ACT_REASON, "code": "COC", "display": "coordination of care"}]]
    for p in root["provision"]:
        assert p["type"] == "permit"
        assert p["period"] == {"start": "2026-01-05", "end": "2027-01-04"}
        assert p["action"][0]["coding"][0]["code"] == "disclose"
        assert {(s["system"], s["code"]) for s in p["securityLabel"]} == LABELS
        assert [c["code"] for c in p["class"]] == [
            "EpisodeOfCare", "Condition", "CareTeam", "Encounter", "DiagnosticReport", "Observation", "Specimen",
            "MedicationRequest", "MedicationAdministration", "MedicationDispense", "CarePlan", "Goal"]
        assert {c["system"] for c in p["class"]} == {RESOURCE_TYPES}
        (actor,) = p["actor"]
        assert actor["role"]["coding"][0]["code"] == "IRCP"
        assert actor["extension"][0]["valueCoding"]["code"] == "ehr"
        assert actor["reference"]["identifier"] == {"system": NPI, "value": "1111111112"}
        assert actor["reference"]["display"] == "Atlantic Primary Care"
        assert actor["reference"]["extension"][0]["valueIdentifier"]["value"] == "ATLANTIC-PC"
    payer_actor = c["CN-2"]["provision"]["provision"][0]["actor"][0]
    assert payer_actor["reference"] == {"identifier": {"system": MappingContext().systems.recipient, "value": "AETNA"},
                                        "display": "Aetna Behavioral Health"}
    assert revoked["status"] == "inactive"
    assert revoked["extension"] == [{"url": ext_url("consent-revocation"), "valueDate": "2026-02-20"}]
    assert revoked["provision"]["provision"][0]["period"] == {"start": "2026-01-14"}


def test_mapping_is_deterministic():
    assert map_all([PROGRAM, *CLIENTS, *HAND]) == map_all([PROGRAM, *CLIENTS, *HAND])


def test_every_emitted_code_is_allowed():
    """Purposes are v3-ActReason codes written in reference §6a (the module's table); the rest come from
    the repo's CodeSystems, ConceptMaps and cited-codes.json."""
    allowed = allowed_codes()
    for r in map_all([PROGRAM, *CLIENTS, *HAND]):
        for c in walk_codings(r):
            if c["system"] == ACT_REASON:
                assert c["display"] == PURPOSES[c["code"]]
            else:
                assert (c["system"], c["code"]) in allowed, c
                assert "v3-ActUSPrivacyLaw" not in c["system"]


@pytest.mark.skipif(not REFERENCE.is_file(), reason="../shared/reference/domain-codes.md is not beside the repo")
def test_purpose_table_is_the_reference_row():
    row = next(line for line in REFERENCE.read_text(encoding="utf-8").splitlines()
               if line.startswith("| v3-ActReason (purpose of use)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert [c.strip() for c in cells[1].split(",")] == list(PURPOSES)
    assert [c.strip() for c in cells[2].split(",")] == list(PURPOSES.values())
    assert set(PURPOSES) == set(get_args(ReasonCode))


# -- FHIR written elsewhere ------------------------------------------------------------------------

CRASH = re.compile(r"Traceback|KeyError|IndexError|TypeError|AttributeError|NoneType|not subscriptable")


def fixture_consents() -> list[tuple[Path, str]]:
    if not FIXTURES.is_dir():
        return []
    out = []
    for f in sorted(FIXTURES.rglob("*")):
        if f.suffix not in (".json", ".xml") or "outcomes" in f.parts:
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        for m in re.finditer(r'"resourceType"\s*:\s*"Consent"|<Consent[\s>]', text):
            out.append((f, m.group(0)))
    return out


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"shared FHIR fixtures not found at {FIXTURES}")
def test_fixture_consents_map_back_or_are_reported_by_name():
    found = fixture_consents()
    assert any(f.name == "consent-example.json" for f, _ in found)
    for f, _ in found:
        items = list(pipeline.from_fhir([f]))
        consents = [i for i in items if isinstance(i, Consent)]
        reported = [i for i in items if isinstance(i, Problem) and re.search(r"Consent(/| \(entry)", i.where)]
        assert consents or reported, f.name
        for p in reported:
            assert p.message and not CRASH.search(p.message), str(p)


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"shared FHIR fixtures not found at {FIXTURES}")
def test_optin_example_without_recipient_is_reported():
    path = FIXTURES / "fhir-test-cases-r4-examples" / "consent-example.json"
    rid = json.loads(path.read_text())["id"]
    (p,) = list(pipeline.from_fhir([path]))
    assert isinstance(p, Problem) and p.where.endswith(f"Consent/{rid}")
    assert "no provision permits disclosure to a recipient" in p.message
    assert p.severity == "warning" and p.field == "Consent.provision"


def _ours() -> dict:
    """The EHR consent as another system would hold it (a private copy: the mapper shares sub-dicts)."""
    return json.loads(json.dumps(consents_of(map_all([PROGRAM, *CLIENTS, EHR]))["CN-1"]))


def _permits(r):
    return r["provision"]["provision"]


def _strip_classes(r):
    for p in _permits(r):
        p.pop("extension")


def _only_class(codes):
    def edit(r):
        _strip_classes(r)
        for p in _permits(r):
            p["class"] = [{"system": RESOURCE_TYPES, "code": c} for c in codes]
    return edit


FOREIGN_READS = {
    # a permit with no class covers every data class
    "no-class-is-all-data": (lambda r: [_strip_classes(r), [p.pop("class") for p in _permits(r)]],
                             {"data_classes": list(TERMS.codes("consent-data-class"))}),
    # Observation alone is part of drug-screens only: left out (narrower); Encounter is all of encounters
    "partial-class-left-out": (_only_class(["Encounter", "Observation"]), {"data_classes": ["encounters"]}),
    # no start in the period: disclosure from the day of signing
    "period-without-start": (lambda r: [p["period"].pop("start") for p in _permits(r)], {"start": date(2026, 1, 5)}),
    # a purpose repeated in two permits is one purpose
    "same-purpose-twice": (lambda r: _permits(r)[1].update(purpose=_permits(r)[0]["purpose"]), {"purposes": ["TREAT"]}),
}


@pytest.mark.parametrize("case", list(FOREIGN_READS))
def test_foreign_consent_reads(case):
    edit, expected = FOREIGN_READS[case]
    r = _ours()
    edit(r)
    assert r4.structure_errors(r) == []
    data = Consent.model_validate({k: v for k, v in from_fhir(r, FhirIndex(), MappingContext()).items()
                                   if v is not None}, context=default_context())
    for k, v in expected.items():
        assert getattr(data, k) == v, k


def _second_recipient(r):
    a = copy.deepcopy(_permits(r)[0]["actor"][0])
    a["reference"] = {"identifier": {"system": "urn:other", "value": "X"}, "display": "Someone else"}
    _permits(r)[0]["actor"].append(a)


FOREIGN_REPORTS = {
    "no-provision": (lambda r: r.pop("provision"), "no provision permits disclosure to a recipient", "Consent.provision"),
    "only-access": (lambda r: [p.update(action=[{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction",
                                                              "code": "access"}]}]) for p in _permits(r)],
                    "no provision permits disclosure", "Consent.provision"),
    "no-recipient-role": (lambda r: [a["role"]["coding"][0].update(code="AUT") for p in _permits(r) for a in p["actor"]],
                          "no provision permits disclosure", "Consent.provision"),
    "exception-under-permit": (lambda r: r["provision"].update(type="permit", provision=[{"type": "deny"}]),
                               "widen", "Consent.provision.provision.type"),
    "two-recipients": (_second_recipient, "more than one recipient", "Consent.provision.actor"),
    "no-recipient-kind": (lambda r: [a.pop("extension") for p in _permits(r) for a in p["actor"]],
                          "recipient-kind", "Consent.provision.actor.extension"),
    "specific-resources": (lambda r: _permits(r)[0].update(data=[{"meaning": "instance", "reference": {"reference": "Encounter/1"}}]),
                           "particular resources", "Consent.provision.data"),
    "normal-data-only": (lambda r: [p.update(securityLabel=[{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                                                             "code": "N"}]) for p in _permits(r)],
                         "not 42 CFR Part 2 data", "Consent.provision.securityLabel"),
    "permits-differ": (lambda r: _permits(r)[1]["period"].update(end="2026-06-30"), "differ", "Consent.provision.provision"),
    "marketing-purpose": (lambda r: _permits(r)[0]["purpose"][0].update(code="HMARKT", display="healthcare marketing"),
                          "ActReason|HMARKT", "Consent.provision.purpose"),
    "no-purpose": (lambda r: [p.pop("purpose") for p in _permits(r)], "no purpose of use", "Consent.provision.purpose"),
    "partial-classes-only": (_only_class(["Observation"]), "no complete IOP data class", "Consent.provision.class"),
    "inactive-without-date": (lambda r: r.update(status="inactive"), "revocation date", "Consent.extension"),
    "draft": (lambda r: r.update(status="draft"), "'draft'", "Consent.status"),
    "no-signing-date": (lambda r: r.pop("dateTime"), "signed", "Consent.dateTime"),
    "patient-unknown": (lambda r: r.update(patient={"reference": "Patient/elsewhere"}), "patient", "Consent.patient"),
    "program-unknown": (lambda r: r.update(organization=[{"reference": "Organization/elsewhere"}]),
                        "disclosing program", "Consent.organization"),
}


@pytest.mark.parametrize("case", list(FOREIGN_REPORTS))
def test_foreign_consent_without_a_mappable_disclosure_is_reported(case, tmp_path):
    edit, message, field = FOREIGN_REPORTS[case]
    r = _ours()
    edit(r)
    assert r4.structure_errors(r) == []
    with pytest.raises(Unmappable) as e:
        from_fhir(r, FhirIndex(), MappingContext())
    assert message in str(e.value) and e.value.field == field
    (p,) = [i for i in read_back([r], tmp_path) if isinstance(i, Problem)]
    assert p.where.endswith(f"Consent/{r['id']}") and message in p.message and p.severity == "warning"


# -- bad input records ------------------------------------------------------------------------------

PROGRAMS = "program_id,name,kind\nSUD-IOP,Harbor Light Adult SUD IOP,substance-use\n"
CLIENTS_CSV = "mrn,family_name,given_names,birth_date\nM001,Smith,John,1985-03-02\n"
HEADER = ("consent_id,client_mrn,program_id,recipient_id,recipient_name,recipient_kind,recipient_npi,purposes,"
          "data_classes,signed_on,start,end,revoked_on")
GOOD_ROW = "CN-1,M001,SUD-IOP,ATLANTIC-PC,Atlantic Primary Care,ehr,1111111112,TREAT|COC,enrollment|encounters,2026-01-05,2026-01-05,2027-01-04,"
BAD_ROWS = {
    "purpose-not-actreason": ("CN-9,M001,SUD-IOP,X,X,ehr,,TREAT|MARKT,encounters,2026-01-05,2026-01-05,,",
                              "purposes.1", "Input should be 'TREAT', 'ETREAT'"),
    "end-before-start": ("CN-9,M001,SUD-IOP,X,X,ehr,,TREAT,encounters,2026-01-05,2026-02-01,2026-01-31,",
                         "end", "end is before start"),
    "revoked-before-signed": ("CN-9,M001,SUD-IOP,X,X,ehr,,TREAT,encounters,2026-01-05,2026-01-05,,2026-01-04",
                              "revoked_on", "revoked_on is before signed_on"),
    "start-before-signed": ("CN-9,M001,SUD-IOP,X,X,ehr,,TREAT,encounters,2026-01-05,2026-01-04,,", "start",
                            "start is before signed_on"),
    "unknown-data-class": ("CN-9,M001,SUD-IOP,X,X,ehr,,TREAT,encounters|psychotherapy-notes,2026-01-05,2026-01-05,,",
                           "data_classes.1", "'psychotherapy-notes'"),
    "bad-npi": ("CN-9,M001,SUD-IOP,X,X,ehr,1234567890,TREAT,encounters,2026-01-05,2026-01-05,,", "recipient_npi",
                "check digit"),
    "unknown-client": ("CN-9,M404,SUD-IOP,X,X,ehr,,TREAT,encounters,2026-01-05,2026-01-05,,", "client_mrn",
                       "'M404' is not in this run's clients"),
    "unknown-program": ("CN-9,M001,PHP,X,X,ehr,,TREAT,encounters,2026-01-05,2026-01-05,,", "program_id",
                        "'PHP' is not in this run's programs"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_consent_record_is_reported_and_the_rest_map(tmp_path, case):
    row, field, message = BAD_ROWS[case]
    (tmp_path / "programs.csv").write_text(PROGRAMS)
    (tmp_path / "clients.csv").write_text(CLIENTS_CSV)
    (tmp_path / "consents.csv").write_text("\n".join([HEADER, GOOD_ROW, row, GOOD_ROW.replace("CN-1", "CN-2")]) + "\n")
    out = list(pipeline.to_fhir([tmp_path]))
    (p,) = [o for o in out if isinstance(o, Problem)]
    assert p.field == field and message in p.message and p.severity == "error", str(p)
    assert re.match(r".*consents\.csv:3\b", p.where), p.where
    assert sorted(r["identifier"][0]["value"] for r in out if isinstance(r, dict) and r["resourceType"] == "Consent") \
        == ["CN-1", "CN-2"]


# -- covers -----------------------------------------------------------------------------------------

ON = date(2026, 3, 2)
C = consent(consent_id="CN-1", client_mrn="M001", program_id="SUD-IOP", recipient_id="ATLANTIC-PC",
            recipient_name="Atlantic Primary Care", recipient_kind="ehr", purposes=["TREAT", "COC"],
            data_classes=["encounters", "medications"], signed_on="2026-01-05", start="2026-01-10", end="2026-06-30")


@pytest.mark.parametrize("changes,args,expected", [
    ({}, {}, True),
    ({"revoked_on": ON + timedelta(days=1)}, {}, True),        # revoked later: covered that day
    ({"revoked_on": ON - timedelta(days=1)}, {}, False),       # revoked the day before
    ({"revoked_on": ON}, {}, False),                           # revoked on the day: disclosure stops that day
    ({}, {"on": date(2026, 6, 30)}, True),                     # the last day is included
    ({}, {"on": date(2026, 7, 1)}, False),                     # expired
    ({}, {"on": date(2026, 1, 9)}, False),                     # signed, not started yet
    ({}, {"on": date(2026, 1, 10)}, True),
    ({"end": None}, {"on": date(2030, 1, 1)}, True),           # no expiry date
    ({}, {"purpose": "HPAYMT"}, False),                        # wrong purpose
    ({}, {"recipient_id": "AETNA"}, False),                    # wrong recipient
    ({}, {"data_class": "drug-screens"}, False),               # wrong data class
])
def test_covers(changes, args, expected):
    c = consent(**{**C.model_dump(), **changes})
    call = {"recipient_id": "ATLANTIC-PC", "purpose": "COC", "data_class": "medications", "on": ON, **args}
    assert covers(c, **call) is expected


def test_data_class_without_resource_type_in_a_site_table_is_reported(tmp_path):
    """A site ConceptMap that leaves a data class unmatched: that consent is rejected, naming the field."""
    cm = json.loads((ROOT / "mappings" / "ConceptMap-consent-data-class-to-resource-type.json").read_text())
    for el in cm["group"][0]["element"]:
        if el["code"] == "coverage":
            el["target"] = [{"equivalence": "unmatched"}]
    (tmp_path / "cm.json").write_text(json.dumps(cm))
    ctx = MappingContext(terminology=load_terminology(tmp_path))
    ctx.seen_types |= {"consents"}
    out = list(pipeline.map_records([EHR, PAYER], ctx))
    (p,) = [o for o in out if isinstance(o, Problem)]
    assert p.where == "consent CN-2" and p.field == "data_classes" and "'coverage'" in p.message
    assert [r["identifier"][0]["value"] for r in out if isinstance(r, dict)] == ["CN-1"]
