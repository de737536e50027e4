"""Search parameter definitions and index values (fhir_iop.store.params)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from fhir_iop.store.params import RESOURCE_TYPES, _for_type, date_range, index_rows, load_registry, normalize


def test_date_ranges_follow_precision_and_time_zone():
    assert date_range("2024") == (datetime(2024, 1, 1), datetime(2024, 12, 31, 23, 59, 59, 999999))
    assert date_range("2024-02") == (datetime(2024, 2, 1), datetime(2024, 2, 29, 23, 59, 59, 999999))
    assert date_range("2024-12-31")[1] == datetime(2024, 12, 31, 23, 59, 59, 999999)
    assert date_range("2024-03-01T09:30:00-05:00") == (datetime(2024, 3, 1, 14, 30),
                                                       datetime(2024, 3, 1, 14, 30, 0, 999999))
    assert date_range("2024-03-01T09:30:00.25Z")[1] == datetime(2024, 3, 1, 9, 30, 0, 259999)
    assert date_range("yesterday") is None and date_range("2024-13-01") is None


def test_expressions_are_cut_to_the_type_and_resolve_becomes_a_target_filter():
    expr = "Observation.subject.where(resolve() is Patient) | Encounter.subject.where(resolve() is Patient)"
    assert _for_type(expr, "Encounter") == ("Encounter.subject", ("Patient",))
    assert _for_type("(Observation.effective as dateTime) | (Observation.effective as Period)", "Observation")[0] \
        == "(Observation.effective as dateTime) | (Observation.effective as Period)"
    assert _for_type("Resource.meta.tag", "Goal") == ("Goal.meta.tag", ())
    assert _for_type("Patient.name", "Goal") == (None, ())


def test_registry_covers_every_served_type_and_indexes_values():
    reg = load_registry()
    assert set(reg.params) == set(RESOURCE_TYPES)
    for rt in RESOURCE_TYPES:
        assert "_profile" in reg.for_type(rt) and "_tag" in reg.for_type(rt)
    obs = {"resourceType": "Observation", "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": "3426-4"}]},
           "subject": {"reference": "Group/g1"}, "valueQuantity": {"value": 5, "system": "http://unitsofmeasure.org",
                                                                   "code": "mg"},
           "effectivePeriod": {"start": "2024-01-01"}}
    rows = index_rows(obs, reg.for_type("Observation"))
    refs = {(r["param"], r["target_type"], r["target_id"]) for r in rows["reference"]}
    assert ("subject", "Group", "g1") in refs and not any(p == "patient" for p, _, _ in refs)  # patient: Patient only
    assert {"param": "code", "system": "http://loinc.org", "code": "3426-4"} in rows["token"]
    date = next(r for r in rows["date"] if r["param"] == "date")
    assert date["low"] == datetime(2024, 1, 1) and date["high"].year == 9999  # open period
    assert {"param": "value-quantity", "value": 5.0, "system": "http://unitsofmeasure.org", "code": "mg"} \
        in rows["quantity"]
    assert normalize("  Ñúñez  DE la Peña ") == "nunez de la pena"


def test_normalize_ascii_shortcut_is_the_full_form():
    """ASCII text skips Unicode decomposition: the result must be the one the full form gives."""
    import random
    import string
    import unicodedata

    def full(s):
        s = unicodedata.normalize("NFKD", s)
        return " ".join("".join(c for c in s if not unicodedata.combining(c)).casefold().split())
    rnd = random.Random(5)
    samples = ["O'Brien-SMITH", "  Tab\tand\nnewline\r ", "http://127.0.0.1:8000", "", " ",
               *("".join(rnd.choice(string.printable) for _ in range(rnd.randrange(30))) for _ in range(2000))]
    for s in samples:
        assert s.isascii() and normalize(s) == full(s), repr(s)
    assert normalize("ÀB\u00a0c") == full("ÀB\u00a0c") == "ab c"  # (not ASCII: the full form)


# -- member paths (the fast evaluation) against fhirpathpy ------------------------------------------

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def _resources_in(value):
    """Every resource in a JSON document (Bundles opened, contained resources too)."""
    if isinstance(value, dict):
        if isinstance(value.get("resourceType"), str):
            yield value
        for k, v in value.items():
            if k in ("entry", "resource", "contained") or isinstance(v, list) and k == "entry":
                yield from _resources_in(v)
    elif isinstance(value, list):
        for v in value:
            yield from _resources_in(v)


def _edge_cases() -> list[dict]:
    """What fixtures rarely hold: primitives with only an extension, nulls in lists, every choice type,
    a union whose two paths give the same value, a resource of another type under the type's name."""
    ext = {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}]}
    return [
        {"resourceType": "Patient", "id": "x", "_birthDate": ext, "name": [None, {"family": "Ng", "given": ["A", None]}],
         "identifier": [{"system": "urn:a", "value": "1"}, {"system": "urn:a", "value": "1"}],
         "telecom": [{"system": "email", "value": "a@b.c"}], "deceasedBoolean": False, "active": True,
         "meta": {"tag": [{"system": "urn:t", "code": "t"}], "profile": ["http://x/p"], "source": "urn:s"}},
        {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "valueQuantity": {"value": 4.5},
         "effectivePeriod": {"start": "2024-01-01"}, "subject": {"reference": "Patient/p"},
         "component": [{"code": {"text": "a"}, "valueCodeableConcept": {"coding": [{"code": "c"}]}},
                       {"code": {"text": "b"}, "valueQuantity": {"value": 1, "unit": "mg"}},
                       {"code": {"text": "b"}, "valueQuantity": {"value": 1, "unit": "mg"}},
                       {"code": {"text": "c"}, "valueString": "s"}, {"code": {"text": "d"}, "valuePeriod": {"end": "2024"}}]},
        {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "valueString": "positive",
         "effectiveDateTime": "2024-02-03T04:05:06Z", "encounter": {"reference": "Encounter/e"}},
        {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "valueDateTime": "2024-02",
         "effectiveInstant": "2024-02-03T04:05:06.1Z"},
        {"resourceType": "MedicationRequest", "status": "active", "intent": "order", "subject": {"reference": "Patient/p"},
         "medicationReference": {"reference": "Medication/m"}, "dosageInstruction": [{"timing": {"repeat": {
             "boundsPeriod": {"start": "2024-01-01"}}}}]},
        {"resourceType": "Condition", "subject": {"reference": "Patient/p"}, "onsetAge": {"value": 30, "code": "a"},
         "abatementString": "resolved", "recordedDate": "2024"},
        {"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"}, "subject": {"reference": "Patient/p"},
         "participant": [{"individual": {"reference": "Practitioner/x"}}], "period": {"start": "2024-01-01T10:00:00Z"},
         "location": [{"location": {"reference": "Location/l"}}], "episodeOfCare": [{"reference": "EpisodeOfCare/e"}]},
        {"resourceType": "Goal", "lifecycleStatus": "active", "description": {"text": "x"}, "subject": {"reference": "Patient/p"},
         "startDate": "2024-01-01", "target": [{"dueDate": "2024-03-01"}, {"dueDuration": {"value": 3}}]},
        {"resourceType": "Group", "type": "person", "actual": True, "characteristic": [
            {"code": {"text": "x"}, "valueBoolean": True, "exclude": False},
            {"code": {"text": "y"}, "valueCodeableConcept": {"coding": [{"system": "urn:s", "code": "v"}]}, "exclude": False}]},
        {"resourceType": "Encounter", "status": "planned", "class": {"code": "AMB"}, "subject": "not a reference",
         "period": ["not", "a", "period"]},
    ]


def _audit_events() -> list[dict]:
    from fhir_iop.audit import Entity, build
    from fhir_iop.security.access import Access
    return [build(Access(client_id="c1", recipient="urn:r", purpose="TREAT"), action="read", outcome=0,
                  entities=[Entity("Patient/p0", "Patient/p0", "Consent/c1"), Entity("Observation/o1", "Patient/p0")],
                  resource_type="Patient", network="127.0.0.1", server="http://x", request_id="abc"),
            build(None, action="search", outcome=4, query=b"patient=p0", resource_type="Observation",
                  description="HTTP 401")]


def test_member_paths_equal_fhirpathpy_on_every_parameter_and_fixture():
    from dataclasses import replace

    import orjson

    from fhir_iop.audit import registry as audit_registry
    registries = [load_registry(), audit_registry()]
    resources = _edge_cases() + _audit_events()
    if FIXTURES.is_dir():  # (material written by others; the edge cases above run without it)
        for path in sorted(FIXTURES.rglob("*.json")):
            try:
                resources += list(_resources_in(orjson.loads(path.read_bytes())))
            except orjson.JSONDecodeError:
                continue
    compared = 0
    seen_types = set()
    for res in resources:
        for reg in registries:
            params = reg.for_type(res.get("resourceType"))
            for code, p in params.items():
                if p.evaluate is p.fhirpath:
                    continue
                got = index_rows(res, {code: p})
                want = index_rows(res, {code: replace(p, evaluate=p.fhirpath)})
                assert got == want, (res.get("resourceType"), res.get("id"), code, p.expression)
                compared += 1
                seen_types.add(res["resourceType"])
    assert "AuditEvent" in seen_types and {"Patient", "Observation", "Condition", "Goal", "Group"} <= seen_types
    if FIXTURES.is_dir():  # the fixtures were read: thousands of resources of most served types
        assert compared > 15_000 and len(seen_types & set(RESOURCE_TYPES)) >= 15, (compared, sorted(seen_types))
    # nearly every served parameter takes the fast path; the rest (where(), exists(), !=) the engine
    every = [p for reg in registries for ps in reg.params.values() for p in ps.values()]
    assert sum(p.evaluate is not p.fhirpath for p in every) >= len(every) - 10


def test_member_paths_decline_what_they_do_not_cover():
    from fhirpathpy.models import models

    from fhir_iop.store.params import member_paths
    model = models["r4"]
    assert member_paths("Patient.telecom.where(system='email')", model) is None
    assert member_paths("Patient.deceased.exists() and Patient.deceased != false", model) is None
    assert member_paths("Patient.nosuchelement", model) is None
    assert member_paths("(Patient.name.ofType(HumanName))", model) is None  # ofType on an element that is no choice
    f = member_paths("Observation.effective", model)
    assert f({"resourceType": "Observation", "effectivePeriod": {"start": "2024"}}) == [{"start": "2024"}]
    assert f({"resourceType": "Encounter", "effectivePeriod": {"start": "2024"}}) == []
    u = member_paths("AuditEvent.agent.who | AuditEvent.entity.what", model)
    ev = {"resourceType": "AuditEvent", "agent": [{"who": {"reference": "Patient/p"}}],
          "entity": [{"what": {"reference": "Patient/p"}}, {"what": {"reference": "Patient/q"}}]}
    assert u(ev) == [{"reference": "Patient/p"}, {"reference": "Patient/q"}]  # a union leaves out duplicates
