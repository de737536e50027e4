"""SMART scopes v1 and v2: parsing, what each allows, what the token endpoint grants."""

from __future__ import annotations

import pytest

from fhir_iop.security.scopes import ScopeError, ScopeSet, allows, intersect, parse, parse_one


@pytest.mark.parametrize("text, context, rt, perms, v1", [
    ("system/Encounter.read", "system", "Encounter", "rs", True),
    ("system/Encounter.write", "system", "Encounter", "cud", True),
    ("system/Encounter.*", "system", "Encounter", "cruds", True),
    ("system/*.read", "system", "*", "rs", True),
    ("system/Encounter.rs", "system", "Encounter", "rs", False),
    ("system/Encounter.cruds", "system", "Encounter", "cruds", False),
    ("system/Encounter.c", "system", "Encounter", "c", False),
    ("system/Encounter.u", "system", "Encounter", "u", False),
    ("system/Encounter.d", "system", "Encounter", "d", False),
    ("user/Observation.rs", "user", "Observation", "rs", False),
    ("patient/*.read", "patient", "*", "rs", True),
])
def test_parse_v1_and_v2(text, context, rt, perms, v1):
    s = parse_one(text)
    assert (s.context, s.type, s.perms, s.v1) == (context, rt, frozenset(perms), v1)
    assert str(s) == text


@pytest.mark.parametrize("bad", ["system/Encounter.sr", "system/Encounter.rr", "system/Encounter.x",
                                 "system/Encounter.readwrite", "system/Encounter.read?status=finished"])
def test_malformed_resource_scopes_raise(bad):
    with pytest.raises(ScopeError):
        parse_one(bad)


def test_non_resource_scopes_parse_as_nothing():
    assert parse("openid fhirUser launch launch/patient offline_access") == []
    assert parse("system/Encounter.sr openid", strict=False) == []  # lenient: malformed ones are left out


def test_restricted_v2_scope_parses_but_allows_nothing():
    s = parse_one("system/Observation.rs?category=laboratory")
    assert s.restriction == "?category=laboratory"
    assert not allows([s], "Observation", "search") and not allows([s], "Observation", "read")


@pytest.mark.parametrize("scopes, rt, interaction, expected", [
    ("system/Encounter.read", "Encounter", "read", True),
    ("system/Encounter.read", "Encounter", "vread", True),
    ("system/Encounter.read", "Encounter", "search", True),
    ("system/Encounter.read", "Encounter", "history-type", True),
    ("system/Encounter.read", "Encounter", "create", False),
    ("system/Encounter.write", "Encounter", "create", True),
    ("system/Encounter.write", "Encounter", "update", True),
    ("system/Encounter.write", "Encounter", "delete", True),
    ("system/Encounter.write", "Encounter", "read", False),
    ("system/Encounter.r", "Encounter", "read", True),
    ("system/Encounter.r", "Encounter", "history-instance", True),
    ("system/Encounter.r", "Encounter", "search", False),  # r is instance level, s is search
    ("system/Encounter.s", "Encounter", "read", False),
    ("system/Encounter.s", "Encounter", "history-type", True),
    ("system/Encounter.c", "Encounter", "update", False),
    ("system/Encounter.u", "Encounter", "conditional-update", True),
    ("system/Encounter.d", "Encounter", "delete", True),
    ("system/Encounter.cruds", "Patient", "read", False),
    ("system/*.rs", "Patient", "read", True),
    ("system/*.rs", "*", "history-system", True),
    ("system/Patient.rs", "*", "history-system", False),  # a per-type scope cannot see everything
    ("user/Encounter.cruds", "Encounter", "read", False),  # backend clients: system/ only
    ("patient/*.read", "Encounter", "read", False),
    ("system/Encounter.rs", "Encounter", "$validate", True),
    ("system/Encounter.c", "Encounter", "$validate", True),
    ("system/Encounter.d", "Encounter", "$validate", False),
    ("system/*.cu", "*", "$load-iop", True),
    ("system/*.write", "*", "$load-iop", True),
    ("system/Patient.cruds system/Encounter.cruds", "*", "$load-iop", False),
    ("system/*.read", "*", "$load-iop", False),
    ("system/Encounter.r", "Encounter", "$everything", True),  # other operations: read-only ones
    ("", "Encounter", "read", False),
])
def test_allows(scopes, rt, interaction, expected):
    assert allows(scopes, rt, interaction) is expected


def test_limit_narrows_a_grant():
    granted = ScopeSet("system/*.cruds", limit=ScopeSet("system/Encounter.rs"))
    assert granted.allows("Encounter", "read") and granted.allows("Encounter", "search")
    assert not granted.allows("Encounter", "create") and not granted.allows("Patient", "read")


@pytest.mark.parametrize("requested, allowed, granted", [
    ("system/*.read", "system/Encounter.rs system/Patient.read", "system/Encounter.read system/Patient.read"),
    ("system/Encounter.cruds", "system/*.read", "system/Encounter.rs"),
    ("system/Encounter.read", "system/*.*", "system/Encounter.read"),
    ("system/Encounter.write", "system/Encounter.c", "system/Encounter.c"),
    ("system/*.*", "system/*.rs", "system/*.read"),  # in the form it was asked for
    ("system/Patient.read", "system/Encounter.cruds", ""),
    ("user/Encounter.read", "system/*.*", ""),
    ("system/Observation.rs?category=laboratory", "system/*.*", ""),
    ("system/Encounter.rs openid", "system/*.*", "system/Encounter.rs"),
])
def test_intersect(requested, allowed, granted):
    assert " ".join(str(s) for s in intersect(parse(requested), parse(allowed))) == granted
