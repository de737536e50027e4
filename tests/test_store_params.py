"""Search parameter definitions and index values (fhir_iop.store.params)."""

from __future__ import annotations

from datetime import datetime

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
