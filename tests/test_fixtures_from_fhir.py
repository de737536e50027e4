"""FHIR → IOP on real FHIR written by others (``../shared/fixtures``).

The issue: "The Patient, Encounter, EpisodeOfCare, Coverage and Condition examples in
../shared/fixtures/ map back without error, or are reported by name with the reason."

Every fixture file that holds one of those five resource types is run through
``pipeline.from_fhir``. What the file holds is read here independently of the library (plain
JSON, lxml for XML), so the checks do not lean on the reader under test. Expected values in the
specific tests are read from the fixture files, never typed in.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import pytest
from lxml import etree

from fhir_iop import pipeline
from fhir_iop.errors import Problem
from fhir_iop.records.model import (Attendance, Client, CounselingSession, Coverage, Enrollment,
                                    GroupSession)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
HAVE_FIXTURES = FIXTURES.is_dir()
SKIP_REASON = f"shared FHIR fixtures not found at {FIXTURES} (they live in ../shared beside the repo)"
needs_fixtures = pytest.mark.skipif(not HAVE_FIXTURES, reason=SKIP_REASON)

TYPES = ("Patient", "Encounter", "EpisodeOfCare", "Coverage", "Condition")
SETS = (("fhir-test-cases-r4-examples", "*.json"), ("fhir-test-cases-r4-examples", "*.xml"),
        ("us-core/examples", "*.json"), ("synthea-r4", "*.json"))
NS = "http://hl7.org/fhir"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
MR = ("http://terminology.hl7.org/CodeSystem/v2-0203", "MR")

#: What a message that comes from a crash (an exception's repr wrapped in a Problem) looks like.
CRASH_SIGNS = re.compile(
    r"Traceback|\b(KeyError|IndexError|TypeError|AttributeError|NameError|UnboundLocalError|"
    r"RecursionError|ZeroDivisionError|AssertionError|StopIteration)\b|object has no attribute|"
    r"'NoneType'|not subscriptable|unhashable type|object is not iterable|"
    r"(^|:\s*)'[^'\s]*'\s*$")  # a bare quoted key: the str() of a KeyError


# -- what a fixture file holds, read without the library -----------------------------------------

@dataclass
class Src:
    """One resource of a fixture file, reduced to what the checks need."""

    rt: str
    id: str | None
    label: str                     # how Problem.where names it: "Type/id" or "Type (entry n)"
    identifiers: list[tuple[str | None, str, list[tuple[str, str]]]] = field(default_factory=list)
    codings: dict[str, list[tuple[str | None, str | None]]] = field(default_factory=dict)
    raw: dict | None = None        # the JSON form, when the file is JSON

    @property
    def keys(self) -> set[str]:
        """Every name an IOP record made from this resource could carry."""
        return {v for _, v, _ in self.identifiers} | ({self.id} if self.id else set())


def _label(rt: str, rid: str | None, n: int | None) -> str:
    return f"{rt}/{rid}" if rid else (f"{rt} (entry {n})" if n is not None else rt)


def _src_json(res: dict, n: int | None) -> Src:
    rt, rid = res.get("resourceType"), res.get("id")
    idents = [(i.get("system"), i["value"],
               [(c.get("system"), c.get("code")) for c in (i.get("type") or {}).get("coding", ())])
              for i in res.get("identifier", ()) if isinstance(i, dict) and i.get("value")]
    codings = {}
    for el in ("type", "code"):
        v = res.get(el)
        concepts = v if isinstance(v, list) else [v] if isinstance(v, dict) else []
        codings[el] = [(c.get("system"), c.get("code")) for cc in concepts for c in cc.get("coding", ())]
    return Src(rt, rid, _label(rt, rid, n), idents, codings, res)


def _v(el, path: str) -> list[str]:
    return el.xpath(f"{path}/@value", namespaces={"f": NS})


def _src_xml(el, n: int | None) -> Src:
    rt = etree.QName(el).localname
    rid = (_v(el, "f:id") or [None])[0]
    idents = []
    for i in el.xpath("f:identifier", namespaces={"f": NS}):
        value = (_v(i, "f:value") or [None])[0]
        if value:
            types = list(zip(_v(i, "f:type/f:coding/f:system"), _v(i, "f:type/f:coding/f:code")))
            idents.append(((_v(i, "f:system") or [None])[0], value, types))
    codings = {el_name: [((_v(c, "f:system") or [None])[0], (_v(c, "f:code") or [None])[0])
                         for c in el.xpath(f"f:{el_name}/f:coding", namespaces={"f": NS})]
               for el_name in ("type", "code")}
    return Src(rt, rid, _label(rt, rid, n), idents, codings)


def resources_in(path: Path) -> list[Src]:
    if path.suffix == ".xml":
        root = etree.parse(str(path), etree.XMLParser(resolve_entities=False, no_network=True)).getroot()
        if etree.QName(root).localname == "Bundle":
            return [_src_xml(res[0], n)
                    for n, res in enumerate(root.xpath("f:entry/f:resource", namespaces={"f": NS}))
                    if len(res)]
        return [_src_xml(root, None)]
    value = json.loads(path.read_bytes())
    if value.get("resourceType") == "Bundle":
        return [_src_json(e["resource"], n) for n, e in enumerate(value.get("entry", ()))
                if isinstance(e.get("resource"), dict)]
    return [_src_json(value, None)]


def fixture_files() -> list:
    if not HAVE_FIXTURES:
        return [pytest.param(None, marks=pytest.mark.skip(reason=SKIP_REASON), id="no-fixtures")]
    out = []
    for folder, pattern in SETS:
        for f in sorted((FIXTURES / folder).glob(pattern)):
            if any(s.rt in TYPES for s in resources_in(f)):
                out.append(pytest.param(f, id=str(f.relative_to(FIXTURES))))
    return out


FILES = fixture_files()


def run(*paths: Path) -> tuple[list, list[Problem]]:
    out = list(pipeline.from_fhir(list(paths)))
    return [o for o in out if not isinstance(o, Problem)], [o for o in out if isinstance(o, Problem)]


def problems_for(problems: list[Problem], path: Path, src: Src) -> list[Problem]:
    """Problems whose ``where`` names this resource (``file: Type/id``, as Problem documents)."""
    return [p for p in problems if p.where == f"{path}: {src.label}"]


def made_record(src: Src, records: list) -> bool:
    keys = src.keys
    if src.rt == "Patient":
        return any(isinstance(r, Client) and r.mrn in keys for r in records)
    if src.rt == "Coverage":
        return any(isinstance(r, Coverage) and r.coverage_id in keys for r in records)
    if src.rt == "EpisodeOfCare":
        return any(isinstance(r, Enrollment) and r.enrollment_id in keys for r in records)
    if src.rt == "Encounter":
        return any((isinstance(r, GroupSession) and r.session_id in keys)
                   or (isinstance(r, CounselingSession) and r.counseling_session_id in keys)
                   or (isinstance(r, Attendance) and f"{r.session_id}/{r.client_mrn}" in keys)
                   for r in records)
    if src.rt == "Condition":  # maps only as a diagnosis of an enrollment
        codes = {c for s, c in src.codings.get("code", ()) if s == ICD10CM}
        return any(isinstance(r, Enrollment) and codes & set(r.diagnoses) for r in records)
    raise AssertionError(src.rt)


def crash_like(p: Problem) -> bool:
    return not p.message.strip() or bool(CRASH_SIGNS.search(p.message))


# -- every file: no exception, every resource of the five types accounted for --------------------

def test_fixture_discovery_finds_all_five_kinds():
    if not HAVE_FIXTURES:
        pytest.skip(SKIP_REASON)
    kinds = {s.rt for p in FILES for s in resources_in(p.values[0])}
    assert set(TYPES) <= kinds, f"no fixture holds {set(TYPES) - kinds}"
    assert any(p.values[0].suffix == ".xml" for p in FILES)
    assert any("synthea-r4" in p.id for p in FILES)


@pytest.mark.parametrize("path", FILES)
def test_fixture_maps_back_or_reports_each_resource(path: Path):
    records, problems = run(path)  # must not raise
    srcs = [s for s in resources_in(path) if s.rt in TYPES]
    assert srcs
    silent = []
    for s in srcs:
        named = problems_for(problems, path, s)
        if named:
            for p in named:
                assert p.message.strip(), f"{p.where}: empty reason"
                assert p.severity in ("error", "warning"), p
            continue
        if not made_record(s, records):
            silent.append(s.label)
    assert not silent, f"{path.name}: neither mapped nor reported: {silent}"


@pytest.mark.parametrize("path", FILES)
def test_fixture_problems_are_meaningful(path: Path):
    _, problems = run(path)
    for p in problems:
        assert p.where.startswith(str(path)), f"problem does not name its file: {p}"
        assert not crash_like(p), f"a crash reported as a problem: {p}"
        if p.severity == "error":
            # a rejected resource says which element or record field is wrong
            assert p.field, f"error without a field: {p}"


@needs_fixtures
def test_all_fixtures_in_one_run_never_raise():
    paths = [p.values[0] for p in FILES]
    records, problems = run(*paths)
    assert problems
    assert not [p for p in problems if crash_like(p)]


# -- specific, known files ------------------------------------------------------------------------

def _json(rel: str) -> dict:
    return json.loads((FIXTURES / rel).read_bytes())


def _fixture(rel: str) -> Path:
    p = FIXTURES / rel
    if not p.is_file():
        pytest.skip(f"{rel} not found under {FIXTURES}")
    return p


def _mrn(pt: dict) -> str:
    return next(i["value"] for i in pt["identifier"]
                if any((c.get("system"), c.get("code")) == MR for c in i.get("type", {}).get("coding", ())))


def _current_name(pt: dict) -> dict:
    """The name in use now: official, else usual, else the first one not old and not ended."""
    names = pt["name"]
    for use in ("official", "usual"):
        for n in names:
            if n.get("use") == use and not n.get("period", {}).get("end"):
                return n
    return next(n for n in names if n.get("use") != "old" and not n.get("period", {}).get("end"))


def _current_address(pt: dict) -> dict:
    return next(a for a in pt["address"] if a.get("use") != "old" and not a.get("period", {}).get("end"))


def _only_client(records: list) -> Client:
    clients = [r for r in records if isinstance(r, Client)]
    assert len(clients) == 1, f"expected one Client, got {records}"
    return clients[0]


def _problem_text(problems) -> str:
    return "; ".join(str(p) for p in problems)


def test_us_core_patient_example_maps_to_client():
    path = _fixture("us-core/examples/patient-example.json")
    pt = _json("us-core/examples/patient-example.json")
    records, problems = run(path)
    assert [r for r in records if isinstance(r, Client)], \
        f"US Core patient-example did not map: {_problem_text(problems)}"
    c = _only_client(records)
    name = _current_name(pt)
    assert c.mrn == _mrn(pt)
    assert c.birth_date == date.fromisoformat(pt["birthDate"])
    assert c.family_name == name["family"]
    assert c.given_names == name["given"]
    if pt.get("gender"):
        assert c.gender == pt["gender"]


def test_us_core_patient_uses_current_name_and_address_not_old_ones(tmp_path):
    """patient-example has an old name (Shaw, ended 2020) and an old address before the current ones.

    The copy adds a gender so that only the choice of name and address is under test here.
    """
    _fixture("us-core/examples/patient-example.json")
    pt = _json("us-core/examples/patient-example.json")
    assert any(n.get("use") == "old" for n in pt["name"])  # the premise of this test
    pt["gender"] = "unknown"
    copy = tmp_path / "patient-example.json"
    copy.write_text(json.dumps(pt))
    records, problems = run(copy)
    assert [r for r in records if isinstance(r, Client)], _problem_text(problems)
    c = _only_client(records)
    name, addr = _current_name(pt), _current_address(pt)
    assert (c.family_name, c.given_names) == (name["family"], name["given"])
    assert c.address_line == addr["line"][0]
    assert c.postal_code == addr["postalCode"]


def _normalized(records, problems, path: Path):
    return (records, sorted((p.where.replace(str(path), "<file>"), p.message, p.field, p.severity)
                            for p in problems))


def test_patient_example_xml_and_json_twins_give_the_same_outcome():
    j = _fixture("fhir-test-cases-r4-examples/patient-example.json")
    x = _fixture("fhir-test-cases-r4-examples/patient-example.xml")
    assert _normalized(*run(j), j) == _normalized(*run(x), x)


def test_patient_example_xml_and_json_twins_give_equal_clients():
    j = _fixture("fhir-test-cases-r4-examples/patient-example.json")
    x = _fixture("fhir-test-cases-r4-examples/patient-example.xml")
    pt = _json("fhir-test-cases-r4-examples/patient-example.json")
    (rj, pj), (rx, px) = run(j), run(x)
    assert [r for r in rj if isinstance(r, Client)], f"JSON twin did not map: {_problem_text(pj)}"
    assert [r for r in rx if isinstance(r, Client)], f"XML twin did not map: {_problem_text(px)}"
    cj, cx = _only_client(rj), _only_client(rx)
    assert cj == cx
    name = _current_name(pt)
    assert (cj.mrn, cj.family_name, cj.given_names) == (_mrn(pt), name["family"], name["given"])
    assert (cj.birth_date.isoformat(), cj.gender) == (pt["birthDate"], pt["gender"])


def test_glossy_patient_xml_maps_to_client():
    path = _fixture("fhir-test-cases-r4-examples/patient-glossy-example.xml")
    root = etree.parse(str(path)).getroot()
    records, problems = run(path)
    c = _only_client(records)
    ns = {"f": NS}
    assert c.mrn == root.xpath("f:identifier[f:type/f:coding/f:code/@value='MR']/f:value/@value",
                               namespaces=ns)[0]
    assert c.family_name == root.xpath("f:name/f:family/@value", namespaces=ns)[0]
    assert c.given_names == root.xpath("f:name/f:given/@value", namespaces=ns)
    assert c.birth_date.isoformat() == root.xpath("f:birthDate/@value", namespaces=ns)[0]
    assert c.gender == root.xpath("f:gender/@value", namespaces=ns)[0]
    assert not problems


SYNTHEA = sorted((FIXTURES / "synthea-r4").glob("*.json")) if HAVE_FIXTURES else []


@pytest.mark.parametrize("path", SYNTHEA or [pytest.param(None, marks=pytest.mark.skip(reason=SKIP_REASON))],
                         ids=lambda p: p.name.split("_")[0] if p else "none")
def test_synthea_patient_maps_to_client(path: Path):
    """A Synthea patient is a US patient with MRN, official name, gender and birth date."""
    bundle = json.loads(path.read_bytes())
    pt = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    records, problems = run(path)
    mine = [p for p in problems if p.where.endswith(f"Patient/{pt['id']}")]
    assert [r for r in records if isinstance(r, Client)], f"did not map: {_problem_text(mine)}"
    c = _only_client(records)
    name = _current_name(pt)
    assert (c.mrn, c.family_name, c.given_names) == (_mrn(pt), name["family"], name["given"])
    assert (c.birth_date.isoformat(), c.gender) == (pt["birthDate"], pt["gender"])
    assert c.city == pt["address"][0]["city"]


def _encounters() -> list:
    out = []
    for p in FILES:
        path = p.values[0]
        if path is None:
            continue
        for s in resources_in(path):
            if s.rt == "Encounter":
                out.append(pytest.param(path, s, id=f"{path.name}:{s.label}"))
    return out or [pytest.param(None, None, marks=pytest.mark.skip(reason=SKIP_REASON))]


@pytest.mark.parametrize("path,src", _encounters())
def test_encounter_without_iop_service_type_is_reported_with_its_type(path: Path, src: Src):
    """None of these Encounters is psychotherapy: each is reported, and the reason quotes its type."""
    records, problems = run(path)
    named = problems_for(problems, path, src)
    assert named, f"{src.label} neither mapped nor reported"
    (p,) = named
    assert p.severity == "warning"
    assert p.field == "Encounter.type"
    assert "not an IOP service" in p.message
    types = src.codings["type"]
    if types:
        for system, code in types:
            assert f"{system}|{code}" in p.message, p.message
    else:
        assert "none" in p.message


def test_us_core_encounter_cpt_99211_is_not_an_iop_service():
    path = _fixture("us-core/examples/encounter-example-1.json")
    enc = _json("us-core/examples/encounter-example-1.json")
    code = enc["type"][0]["coding"][0]
    records, problems = run(path)
    assert not records
    (p,) = [p for p in problems if p.where.endswith(f"Encounter/{enc['id']}")]
    assert f"{code['system']}|{code['code']}" in p.message


def _condition_files() -> list:
    out = [p for p in FILES if p.values[0] is not None
           and any(s.rt == "Condition" for s in resources_in(p.values[0]))]
    return out or [pytest.param(None, marks=pytest.mark.skip(reason=SKIP_REASON))]


@pytest.mark.parametrize("path", _condition_files())
def test_condition_not_referenced_by_an_episode_is_reported(path: Path):
    records, problems = run(path)
    conditions = [s for s in resources_in(path) if s.rt == "Condition"]
    for s in conditions:
        named = problems_for(problems, path, s)
        assert len(named) == 1, f"{s.label}: {named}"
        assert named[0].severity == "warning"
        assert "EpisodeOfCare" in named[0].message and "diagnosis" in named[0].message


def test_condition_example_xml_and_json_report_alike():
    j = _fixture("fhir-test-cases-r4-examples/condition-example.json")
    x = _fixture("fhir-test-cases-r4-examples/condition-example.xml")
    assert _normalized(*run(j), j) == _normalized(*run(x), x)


def test_episode_of_care_example_without_its_patient_is_reported():
    path = _fixture("fhir-test-cases-r4-examples/episodeofcare-example.json")
    records, problems = run(path)
    assert not records
    (p,) = [p for p in problems if p.where == f"{path}: EpisodeOfCare/example"]
    assert p.field == "EpisodeOfCare.patient"
    assert "Patient" in p.message


def test_episode_of_care_example_with_its_patient_reports_its_unresolved_organization():
    """With Patient/example in the run the patient resolves; the managing organisation does not.

    The episode *has* a managingOrganization (a reference to an Organization that is not in the
    input), so the reason must say that it does not resolve, not that it is absent.
    """
    eoc = _fixture("fhir-test-cases-r4-examples/episodeofcare-example.json")
    pt = _fixture("fhir-test-cases-r4-examples/patient-example.json")
    org_ref = _json("fhir-test-cases-r4-examples/episodeofcare-example.json")["managingOrganization"]["reference"]
    records, problems = run(pt, eoc)
    assert not [r for r in records if isinstance(r, Enrollment)]
    (p,) = [p for p in problems if p.where == f"{eoc}: EpisodeOfCare/example"]
    assert p.field == "EpisodeOfCare.managingOrganization"
    assert "program" in p.message
    assert "does not resolve" in p.message or org_ref in p.message, \
        f"reason claims something the file contradicts: {p.message!r}"


def test_us_core_coverage_alone_is_reported_for_its_beneficiary():
    path = _fixture("us-core/examples/coverage-example.json")
    records, problems = run(path)
    assert not records
    (p,) = [p for p in problems if p.where == f"{path}: Coverage/coverage-example"]
    assert p.field == "Coverage.beneficiary"


def test_us_core_coverage_with_patient_and_payer_maps_to_coverage():
    cov_path = _fixture("us-core/examples/coverage-example.json")
    pt_path = _fixture("us-core/examples/patient-example.json")
    payer_path = _fixture("us-core/examples/organization-acme-payer.json")
    cov, pt, payer = (_json(f"us-core/examples/{n}") for n in
                      ("coverage-example.json", "patient-example.json", "organization-acme-payer.json"))
    records, problems = run(pt_path, cov_path, payer_path)
    covs = [r for r in records if isinstance(r, Coverage)]
    assert len(covs) == 1, _problem_text(problems)
    c = covs[0]
    assert c.client_mrn == _mrn(pt)
    assert c.payer_id == payer["identifier"][0]["value"]
    assert c.payer_name == cov["payor"][0]["display"] == payer["name"]
    assert c.member_id == cov["subscriberId"]
    assert c.status == cov["status"]
    assert c.subscriber_relationship == cov["relationship"]["coding"][0]["code"]
    assert c.start.isoformat() == cov["period"]["start"]
    # the payer Organization is part of the Coverage, not a separate (unmappable) resource
    assert not [p for p in problems if p.where.startswith(str(payer_path))]


# -- deliberately broken FHIR (the validator test suite): never a crash ---------------------------

def _validator_cases() -> list:
    cases = FIXTURES / "fhir-test-cases-validator-r4" / "cases"
    if not cases.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=SKIP_REASON))]
    return [pytest.param(f, id=f.name) for f in sorted(cases.iterdir())
            if f.suffix in (".json", ".xml")]


@pytest.mark.parametrize("path", _validator_cases())
def test_validator_case_never_crashes(path: Path):
    """Invalid FHIR on purpose: from_fhir may reject it, but with a reason a person can act on."""
    _, problems = run(path)
    for p in problems:
        assert not crash_like(p), f"a crash reported as a problem: {p}"


# -- fixtures with one element given the wrong JSON shape: reported, never an exception -----------

def _first(r: dict, element: str):
    return r[element][0]


#: (fixture, element, how it is broken): a list element written as a single object (or a string),
#: the commonest hand-written FHIR JSON mistake. XML input is structure-checked by fhir.resources;
#: JSON input must not crash the run either.
MALFORMED = [
    ("us-core/examples/patient-example.json", "identifier", _first),
    ("us-core/examples/patient-example.json", "name", lambda r, e: r[e][-1]),
    ("us-core/examples/patient-example.json", "address", lambda r, e: r[e][-1]),
    ("us-core/examples/patient-example.json", "telecom", _first),
    ("us-core/examples/encounter-example-1.json", "type", lambda r, e: r[e][0]["text"]),
    ("us-core/examples/encounter-example-1.json", "extension", _first),
    ("fhir-test-cases-r4-examples/episodeofcare-example.json", "patient", lambda r, e: r[e]["reference"]),
    ("us-core/examples/coverage-example.json", "payor", _first),
]


@pytest.mark.parametrize("rel,element,breaker", MALFORMED,
                         ids=[f"{Path(m[0]).stem}:{m[1]}" for m in MALFORMED])
def test_wrong_json_shape_is_reported_not_raised(tmp_path, rel, element, breaker):
    _fixture(rel)
    res = _json(rel)
    res[element] = breaker(res, element)
    path = tmp_path / Path(rel).name
    path.write_text(json.dumps(res))
    try:
        records, problems = run(path)
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"from_fhir raised {type(e).__name__}: {e} on {rel} with {element} as "
                    f"{type(res[element]).__name__}")
    named = [p for p in problems if p.where == f"{path}: {res['resourceType']}/{res['id']}"]
    assert named, problems
    assert not [p for p in named if crash_like(p)], named
