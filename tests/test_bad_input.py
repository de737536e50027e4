"""Bad IOP input records, at library level: ``records.io.read_records`` and ``pipeline.to_fhir``.

Each test starts from a small clinic that maps cleanly (``GOOD``), adds bad rows with their own
keys (so no good record depends on them), and checks

* the Problem: its exact field and its file and line (``where`` is ``file:line`` or
  ``file:first-last``, optionally followed by `` (key=value)``), and a message a person can act on;
* that every good record still produces exactly the resources of the clean run.
"""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path

import pytest

from fhir_iop import pipeline
from fhir_iop.errors import Problem
from fhir_iop.mapping.common import ext_url
from fhir_iop.records.io import read_records
from fhir_iop.records.model import GroupSession, default_context
from fhir_iop.terminology import cs_url, load_terminology

# The clinic of /tmp/ex1: maps to 19 resources with no problem.
GOOD = {
    "programs.csv": (
        "program_id,name,kind,npi,phone\n"
        "SUD-IOP,Harbor Light Adult SUD IOP,substance-use,1234567893,555-0100\n"),
    "counselors.csv": (
        "counselor_id,family_name,given_names,role,credentials,npi\n"
        'C01,Rivera,Ana,counselor,"LCSW, LADC",1111111112\n'
        "C02,Okafor,James|T,psychiatrist,MD,\n"),
    "clients.csv": (
        "mrn,family_name,given_names,birth_date,gender,phone,email,state,postal_code,"
        "emergency_contact_name,emergency_contact_phone\n"
        "M001,Smith,John|Paul,1985-03-02,male,555-1111,j@x.org,NJ,07001,Mary Smith,555-2222\n"
        "M002,Doe,Jane,1990-12-01,female,,,,,,\n"),
    "coverages.csv": (
        "coverage_id,client_mrn,payer_id,payer_name,member_id,start,prior_auth_number,"
        "prior_auth_start,prior_auth_end\n"
        "COV1,M001,AETNA,Aetna,W123,2026-01-01,PA-77,2026-01-05,2026-03-31\n"),
    "enrollments.csv": (
        "enrollment_id,client_mrn,program_id,referral_source,status_history,level_history,admitted_on,"
        "discharged_on,discharge_reason,diagnoses,primary_counselor,care_team,schedule_days,"
        "schedule_start,schedule_end,track\n"
        "E1,M001,SUD-IOP,residential-step-down,referred@2026-01-02;active@2026-01-05;completed@2026-03-20,"
        "IOP-6@2026-01-05;IOP-3@2026-02-16,2026-01-05,2026-03-20,treatment-completed,F11.20|F10.20,C01,"
        "C01|C02,mon|tue|wed|thu|fri|sat,18:00,21:00,evening\n"
        "E2,M002,SUD-IOP,self,active@2026-01-12,IOP-6@2026-01-12,2026-01-12,,,F12.20,C01,,mon|wed|fri,"
        "09:00,12:00,morning\n"),
    "group_sessions.csv": (
        "session_id,program_id,topic,kind,facilitators,start,end,modality,location\n"
        "GS1,SUD-IOP,triggers,PROC,C01,2026-01-12T18:00,2026-01-12T21:00,in-person,Room 2\n"
        "GS2,SUD-IOP,relapse-prevention,psychoeducation,C01|C02,2026-01-13T18:00:00-05:00,"
        "2026-01-13T21:00:00-05:00,telehealth-video,\n"),
    "attendance.csv": (
        "session_id,client_mrn,enrollment_id,status,minutes_attended\n"
        "GS1,M001,E1,present,180\n"
        "GS1,M002,E2,absent,0\n"
        "GS2,M001,E1,late,150\n"),
    "counseling_sessions.csv": (
        "counseling_session_id,client_mrn,enrollment_id,kind,status,counselor_id,start,end,modality\n"
        "CS1,M001,E1,individual,completed,C01,2026-01-14T10:00,2026-01-14T10:50,in-person\n"
        "CS2,M001,E1,family-with-client,no-show,C01,2026-01-15T10:00,2026-01-15T10:50,telehealth-phone\n"),
}

WHERE = re.compile(r"^(?P<file>.+?):(?P<first>\d+)(?:-(?P<last>\d+))?(?: \(.*\))?$")


# -- helpers ----------------------------------------------------------------------------------------

def header(name: str) -> str:
    return GOOD[name].split("\n", 1)[0]


def rows(name: str) -> list[str]:
    return GOOD[name].rstrip("\n").split("\n")[1:]


def clinic(directory: Path, **files: str | bytes | None) -> Path:
    """The good clinic in ``directory``, with files replaced (text/bytes), added, or left out (None)."""
    directory.mkdir(parents=True, exist_ok=True)
    content: dict[str, str | bytes | None] = {**GOOD, **{k.replace("__", "."): v for k, v in files.items()}}
    for name, text in content.items():
        if text is None:
            continue
        p = directory / name
        if isinstance(text, bytes):
            p.write_bytes(text)
        else:
            p.write_text(text, encoding="utf-8")
    return directory


def to_fhir(directory: Path) -> tuple[dict[tuple[str, str], dict], list[Problem]]:
    out = list(pipeline.to_fhir([directory]))
    resources = {(r["resourceType"], r["id"]): r for r in out if isinstance(r, dict)}
    problems = [p for p in out if isinstance(p, Problem)]
    assert len(resources) == len([r for r in out if isinstance(r, dict)]), "a resource id emitted twice"
    return resources, problems


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[tuple[str, str], dict]:
    resources, problems = to_fhir(clinic(tmp_path_factory.mktemp("clean")))
    assert not problems, problems
    assert len(resources) == 19
    return resources


def read(path: Path) -> tuple[list, list[Problem]]:
    out = list(read_records(path, default_context()))
    return [o for o in out if not isinstance(o, Problem)], [o for o in out if isinstance(o, Problem)]


def lines_of(p: Problem) -> tuple[str, int, int] | None:
    """(file name, first line, last line) that ``p.where`` names, or None if it names no line."""
    m = WHERE.match(p.where)
    if not m:
        return None
    first = int(m["first"])
    return Path(m["file"]).name, first, int(m["last"] or first)


def assert_at(p: Problem, file: str, line: int, field: str | None) -> None:
    assert p.field == field, f"field {p.field!r}, expected {field!r}: {p}"
    loc = lines_of(p)
    assert loc is not None, f"the problem names no file and line: where={p.where!r}"
    assert loc[0] == file and loc[1] <= line <= loc[2], f"expected {file}:{line}, got where={p.where!r}"
    assert p.severity == "error"
    assert p.message.strip()


def only(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, "\n".join(map(str, problems)) or "no problem reported"
    return problems[0]


def identifiers(resources, rt: str) -> set[str]:
    return {i["value"] for (t, _), r in resources.items() if t == rt for i in r.get("identifier", ())}


def with_row(name: str, row: str, at: int | None = None) -> tuple[str, int]:
    """GOOD[name] with ``row`` inserted before data row ``at`` (appended if None); and its line."""
    data = rows(name)
    at = len(data) if at is None else at
    data.insert(at, row)
    return "\n".join([header(name), *data]) + "\n", at + 2


# -- wrong dates --------------------------------------------------------------------------------------

IMPOSSIBLE_DATES = [
    ("clients.csv", "M003,Roe,Rick,2026-02-30,male,,,,,,", "birth_date"),
    ("coverages.csv", "COV2,M001,AETNA,Aetna,W124,2026-02-30,,,", "start"),
    ("group_sessions.csv", "GS3,SUD-IOP,triggers,process,C01,2026-02-30T18:00,2026-02-28T21:00,in-person,",
     "start"),
    ("enrollments.csv", "E3,M002,SUD-IOP,self,active@2026-02-30,IOP-6@2026-01-12,2026-01-12,,,,C01,,,,,",
     "status_history.0.since"),
]


@pytest.mark.parametrize("name,row,field", IMPOSSIBLE_DATES, ids=[d[0] for d in IMPOSSIBLE_DATES])
def test_impossible_date_is_rejected(tmp_path, clean, name, row, field):
    text, line = with_row(name, row, at=1)
    d = clinic(tmp_path, **{name.replace(".", "__"): text})
    records, problems = read(d / name)
    p = only(problems)
    assert_at(p, name, line, field)
    assert "day value is outside expected range" in p.message
    assert len(records) == len(rows(name))  # the rows around it still read
    resources, problems = to_fhir(d)
    assert resources == clean
    assert only(problems) == p


END_BEFORE_START = [
    ("coverages.csv", "end", "end is before start",
     "coverage_id,client_mrn,payer_id,payer_name,member_id,start,end,prior_auth_number,prior_auth_start,"
     "prior_auth_end\nCOV1,M001,AETNA,Aetna,W123,2026-01-01,,PA-77,2026-01-05,2026-03-31\n"
     "COV2,M001,AETNA,Aetna,W124,2026-03-01,2026-02-01,,,\n"),
    ("group_sessions.csv", "end", "end is not after start",
     GOOD["group_sessions.csv"]
     + "GS3,SUD-IOP,triggers,process,C01,2026-01-14T18:00,2026-01-14T17:00,in-person,\n"),
    ("enrollments.csv", "discharged_on", "discharged_on is before admitted_on",
     GOOD["enrollments.csv"]
     + "E3,M002,SUD-IOP,self,active@2026-02-02;completed@2026-02-10,IOP-6@2026-02-02,2026-02-02,2026-02-01,"
       ",,C01,,,,,\n"),
    ("counseling_sessions.csv", "end", "end is not after start",
     GOOD["counseling_sessions.csv"]
     + "CS3,M001,E1,individual,completed,C01,2026-01-16T10:00,2026-01-16T09:00,in-person\n"),
]


@pytest.mark.parametrize("name,field,message,text", END_BEFORE_START, ids=[e[0] for e in END_BEFORE_START])
def test_end_before_start_names_the_field(tmp_path, clean, name, field, message, text):
    """A cross-field check still says which field is wrong (the later one of the pair)."""
    d = clinic(tmp_path, **{name.replace(".", "__"): text})
    line = len(text.rstrip("\n").split("\n"))  # the bad row is the last one
    records, problems = read(d / name)
    p = only(problems)
    assert message in p.message
    resources, run_problems = to_fhir(d)
    assert resources == clean  # (the rewritten coverages.csv, with an `end` column, maps COV1 as before)
    assert only(run_problems) == p
    assert_at(p, name, line, field)


def test_birth_date_in_the_future_names_the_field(tmp_path, clean):
    future = date(date.today().year + 1, 1, 1).isoformat()
    text, line = with_row("clients.csv", f"M003,Roe,Rick,{future},male,,,,,,", at=1)
    d = clinic(tmp_path, clients__csv=text)
    resources, problems = to_fhir(d)
    assert resources == clean
    p = only(problems)
    assert "birth_date is in the future" in p.message
    assert_at(p, "clients.csv", line, "birth_date")


# -- unknown codes ------------------------------------------------------------------------------------

UNKNOWN_CODES = [
    ("programs.csv", "P2,Other program,outpatient,,", "kind", "program-kind", "outpatient"),
    ("counselors.csv", "C03,Lee,Sam,janitor,,", "role", "counselor-role", "janitor"),
    ("group_sessions.csv", "GS3,SUD-IOP,yoga,process,C01,2026-01-14T18:00,2026-01-14T21:00,in-person,",
     "topic", "curriculum-topic", "yoga"),
    ("group_sessions.csv", "GS3,SUD-IOP,triggers,PROCX,C01,2026-01-14T18:00,2026-01-14T21:00,in-person,",
     "kind", "session-kind", "PROCX"),
    ("group_sessions.csv", "GS3,SUD-IOP,triggers,process,C01,2026-01-14T18:00,2026-01-14T21:00,hologram,",
     "modality", "session-modality", "hologram"),
    ("attendance.csv", "GS2,M002,E2,tardy,60", "status", "attendance-status", "tardy"),
    ("enrollments.csv", "E3,M002,SUD-IOP,self,actve@2026-01-12,IOP-6@2026-01-12,2026-01-12,,,,C01,,,,,",
     "status_history.0.status", "enrollment-status", "actve"),
    ("enrollments.csv", "E3,M002,SUD-IOP,friend,active@2026-01-12,IOP-6@2026-01-12,2026-01-12,,,,C01,,,,,",
     "referral_source", "referral-source", "friend"),
    ("counseling_sessions.csv",
     "CS3,M001,E1,group,completed,C01,2026-01-16T10:00,2026-01-16T10:50,in-person",
     "kind", "counseling-kind", "group"),
]


@pytest.mark.parametrize("name,row,field,cs_id,bad", UNKNOWN_CODES, ids=[f"{u[0]}:{u[2]}" for u in UNKNOWN_CODES])
def test_unknown_code_lists_the_allowed_codes(tmp_path, clean, name, row, field, cs_id, bad):
    text, line = with_row(name, row, at=1)
    d = clinic(tmp_path, **{name.replace(".", "__"): text})
    resources, problems = to_fhir(d)
    assert resources == clean
    p = only(problems)
    assert_at(p, name, line, field)
    assert repr(bad) in p.message
    allowed = load_terminology().codes(cs_id)
    assert "allowed:" in p.message
    for code in allowed:
        assert code in p.message.split("allowed:", 1)[1], f"{code!r} missing from {p.message!r}"


def test_unknown_gender_lists_the_allowed_values(tmp_path, clean):
    text, line = with_row("clients.csv", "M003,Roe,Rick,1980-01-01,dude,,,,,,", at=1)
    d = clinic(tmp_path, clients__csv=text)
    resources, problems = to_fhir(d)
    assert resources == clean
    p = only(problems)
    assert_at(p, "clients.csv", line, "gender")
    for g in ("male", "female", "other", "unknown"):
        assert f"'{g}'" in p.message


# -- missing required fields -------------------------------------------------------------------------

MISSING = [
    ("clients.csv", "M003,,Rick,1980-01-01,male,,,,,,", "family_name"),
    ("clients.csv", "M003,Roe,,1980-01-01,male,,,,,,", "given_names"),
    ("attendance.csv", "GS2,M002,E2,,60", "status"),
    ("group_sessions.csv", "GS3,SUD-IOP,triggers,process,,2026-01-14T18:00,2026-01-14T21:00,in-person,",
     "facilitators"),
    ("coverages.csv", "COV2,M001,AETNA,Aetna,,2026-01-01,,,", "member_id"),
]


@pytest.mark.parametrize("name,row,field", MISSING, ids=[f"{m[0]}:{m[2]}" for m in MISSING])
def test_missing_required_field(tmp_path, clean, name, row, field):
    text, line = with_row(name, row, at=1)
    d = clinic(tmp_path, **{name.replace(".", "__"): text})
    resources, problems = to_fhir(d)
    assert resources == clean
    p = only(problems)
    assert_at(p, name, line, field)
    assert p.message in ("required field is missing", "List should have at least 1 item after validation, not 0")


def test_missing_required_column_reports_each_row(tmp_path, clean):
    """A second clients file whose header lacks ``birth_date``: every row is rejected naming it."""
    d = clinic(tmp_path, clients__more__csv="mrn,family_name,given_names,gender\n"
                                             "M003,Roe,Rick,male\nM004,Poe,Ed,male\n")
    resources, problems = to_fhir(d)
    assert resources == clean
    assert len(problems) == 2
    for p, line in zip(problems, (2, 3)):
        assert_at(p, "clients.more.csv", line, "birth_date")
        assert p.message == "required field is missing"


# -- header ---------------------------------------------------------------------------------------------

def test_unknown_column_in_header(tmp_path, clean):
    d = clinic(tmp_path, clients__more__csv="mrn,family_name,given_names,birth_date,gender,nickname\n"
                                             "M003,Roe,Rick,1980-01-01,male,Ricky\n")
    records, problems = read(d / "clients.more.csv")
    assert not records
    p = only(problems)
    assert_at(p, "clients.more.csv", 1, "header")
    assert "nickname" in p.message
    assert "mrn, family_name, given_names" in p.message  # the columns that are allowed
    resources, run_problems = to_fhir(d)
    assert resources == clean
    assert run_problems == [p]


# -- broken CSV quoting --------------------------------------------------------------------------------

def _clients(*data_rows: str) -> str:
    return "\n".join([header("clients.csv"), *data_rows]) + "\n"


M001, M002 = rows("clients.csv")


def test_unbalanced_quote_joining_two_lines_names_both_and_later_rows_map(tmp_path, clean):
    text = _clients(M001,
                    'M003,"Roe,Rick,1980-01-01,male,,,,,,',   # line 3: the quote opens here...
                    'M004,Poe",Ed,1981-02-03,male,,,,,,',     # line 4: ...and closes here
                    M002)                                     # line 5
    d = clinic(tmp_path, clients__csv=text)
    records, problems = read(d / "clients.csv")
    assert [r.mrn for _, r in records] == ["M001", "M002"]
    p = only(problems)
    assert lines_of(p) == ("clients.csv", 3, 4), p.where
    assert "quote" in p.message
    resources, run_problems = to_fhir(d)
    assert resources == clean
    assert run_problems == [p]


BROKEN_QUOTES = {
    # the quote opened on line 3 closes on line 4 in the middle of a cell: csv's strict mode fails there
    "closed-mid-cell": (_clients(M001, 'M003,"Roe,Rick,1980-01-01,male,,,,,,',
                                 'M004,"Poe",Ed,1981-02-03,male,,,,,,', M002), (3, 4), 5),
    # the quote opened on line 3 never closes
    "never-closed": (_clients(M001, 'M003,"Roe,Rick,1980-01-01,male,,,,,,', M002,
                              "M004,Poe,Ed,1981-02-03,male,,,,,,"), (3, 3), 4),
}


@pytest.mark.parametrize("case", list(BROKEN_QUOTES))
def test_unbalanced_quote_names_every_line_it_swallows_and_later_rows_map(tmp_path, clean, case):
    """No line disappears silently: each data line maps, or a Problem's line range covers it."""
    text, bad_lines, m002_line = BROKEN_QUOTES[case]
    d = clinic(tmp_path, clients__csv=text)
    records, problems = read(d / "clients.csv")
    assert problems and all("quot" in p.message for p in problems), problems
    covered = {n for p in problems if (loc := lines_of(p)) for n in range(loc[1], loc[2] + 1)}
    assert set(range(bad_lines[0], bad_lines[1] + 1)) <= covered, [p.where for p in problems]
    mapped = {line for line, _ in records}
    n_lines = len(text.rstrip("\n").split("\n"))
    silent = [n for n in range(2, n_lines + 1) if n not in mapped and n not in covered]
    assert not silent, f"lines neither mapped nor named by a problem: {silent}; problems: {problems}"
    assert ("M002", m002_line) in {(r.mrn, line) for line, r in records}, \
        f"M002 (line {m002_line}, after the broken quote) did not map; problems: {problems}"


# -- encoding ---------------------------------------------------------------------------------------------

def test_latin1_row_is_rejected_naming_field_and_utf8_and_the_rest_map(tmp_path, clean):
    text = _clients(M001, "M003,Ruiz,José,1980-01-01,male,,,,,,", M002)
    d = clinic(tmp_path, clients__csv=text.encode("latin-1"))
    records, problems = read(d / "clients.csv")
    assert [r.mrn for _, r in records] == ["M001", "M002"]
    p = only(problems)
    assert_at(p, "clients.csv", 3, "given_names")
    assert "UTF-8" in p.message
    resources, run_problems = to_fhir(d)
    assert resources == clean
    assert run_problems == [p]


def test_utf8_with_bom_and_non_ascii_maps(tmp_path, clean):
    text = _clients(M001, "M003,Ruiz,José,1980-01-01,male,,,,,,", M002)
    d = clinic(tmp_path, clients__csv=b"\xef\xbb\xbf" + text.encode("utf-8"))
    records, problems = read(d / "clients.csv")
    assert not problems
    assert [r.given_names for _, r in records][1] == ["José"]
    resources, run_problems = to_fhir(d)
    assert not run_problems
    assert identifiers(resources, "Patient") == identifiers(clean, "Patient") | {"M003"}


def test_latin1_line_in_ndjson_is_rejected_naming_utf8(tmp_path, clean):
    good = '{"mrn":"M004","family_name":"Poe","given_names":["Ed"],"birth_date":"1981-02-03","gender":"male"}\n'
    bad = '{"mrn":"M003","family_name":"Ruiz","given_names":["José"],"birth_date":"1980-01-01","gender":"male"}\n'
    d = clinic(tmp_path, clients__ndjson=bad.encode("latin-1") + good.encode())
    resources, problems = to_fhir(d)
    p = only(problems)
    assert lines_of(p) == ("clients.ndjson", 1, 1)
    assert "UTF-8" in p.message
    assert identifiers(resources, "Patient") == identifiers(clean, "Patient") | {"M004"}


# -- NDJSON -------------------------------------------------------------------------------------------------

def test_invalid_ndjson_lines_are_named_and_the_rest_map(tmp_path, clean):
    lines = [
        '{"mrn":"M003","family_name":"Roe","given_names":["Rick"],"birth_date":"1980-01-01","gender":"male"}',
        '{"mrn":"M009","family_name":"Broken",',                                          # 2: not JSON
        '{"mrn":"M004","family_name":"Poe","given_names":["Ed"],"birth_date":"1981-02-03","gender":"male"}',
        "",                                                                                  # 4: blank, skipped
        '["M005","Moe"]',                                                                    # 5: not an object
        '{"mrn":"M006","family_name":"Lo","given_names":["Al"],"birth_date":"1982-03-04","gender":"male",'
        '"nickname":"Al"}',                                                                  # 6: unknown field
    ]
    d = clinic(tmp_path, clients__ndjson="\n".join(lines) + "\n")
    records, problems = read(d / "clients.ndjson")
    assert [(line, r.mrn) for line, r in records] == [(1, "M003"), (3, "M004")]
    assert len(problems) == 3, problems
    not_json, not_object, unknown = problems
    assert_at(not_json, "clients.ndjson", 2, None)
    assert "not valid JSON" in not_json.message
    assert_at(not_object, "clients.ndjson", 5, None)
    assert "JSON object" in not_object.message
    assert_at(unknown, "clients.ndjson", 6, "nickname")
    assert unknown.message == "unknown field"
    resources, run_problems = to_fhir(d)
    assert run_problems == problems
    assert identifiers(resources, "Patient") == identifiers(clean, "Patient") | {"M003", "M004"}
    assert {k: v for k, v in resources.items() if k[0] != "Patient"} == \
        {k: v for k, v in clean.items() if k[0] != "Patient"}


# -- dangling references -------------------------------------------------------------------------------

def test_attendance_to_an_unknown_session(tmp_path, clean):
    text, line = with_row("attendance.csv", "GS9,M001,E1,present,60", at=1)
    d = clinic(tmp_path, attendance__csv=text)
    resources, problems = to_fhir(d)
    assert resources == clean  # the other three attendance rows still map
    p = only(problems)
    assert p.field == "session_id"
    assert "GS9" in p.message and "group_sessions" in p.message
    assert_at(p, "attendance.csv", line, "session_id")


def test_enrollment_to_an_unknown_client_when_clients_are_in_the_run(tmp_path, clean):
    text, line = with_row(
        "enrollments.csv",
        "E3,M999,SUD-IOP,self,active@2026-01-12,IOP-6@2026-01-12,2026-01-12,,,F12.20,C01,,,,,", at=1)
    d = clinic(tmp_path, enrollments__csv=text)
    resources, problems = to_fhir(d)
    assert resources == clean  # E3 and its Condition are not emitted; E1 and E2 map as before
    p = only(problems)
    assert p.field == "client_mrn"
    assert "M999" in p.message and "clients" in p.message
    assert_at(p, "enrollments.csv", line, "client_mrn")


def test_enrollment_to_a_client_outside_the_run_is_not_checked(tmp_path):
    """Without clients.csv in the run, client references point to records elsewhere: not an error."""
    text, _ = with_row(
        "enrollments.csv",
        "E3,M999,SUD-IOP,self,active@2026-01-12,IOP-6@2026-01-12,2026-01-12,,,F12.20,C01,,,,,", at=1)
    d = clinic(tmp_path, enrollments__csv=text, clients__csv=None)
    resources, problems = to_fhir(d)
    assert not problems
    assert "E3" in identifiers(resources, "EpisodeOfCare")
    assert not identifiers(resources, "Patient")


# -- site inbound codes -----------------------------------------------------------------------------------

def test_site_inbound_session_kind_code_is_accepted(tmp_path):
    """mappings/ConceptMap-site-session-kind.json maps the site's PROC to fhir-iop's ``process``."""
    d = clinic(tmp_path)
    records, problems = read(d / "group_sessions.csv")
    assert not problems
    gs1 = {r.session_id: r for _, r in records}["GS1"]
    assert isinstance(gs1, GroupSession)
    assert gs1.kind == "process"
    resources, problems = to_fhir(d)
    assert not problems
    (enc,) = [r for r in resources.values() if r["resourceType"] == "Encounter"
              and any(i["value"] == "GS1" for i in r.get("identifier", ()))]
    kind = next(e["valueCoding"] for e in enc["extension"] if e["url"] == ext_url("session-kind"))
    assert (kind["system"], kind["code"]) == (cs_url("session-kind"), "process")
    codes = {(c["system"], c["code"]) for t in enc["type"] for c in t.get("coding", ())}
    assert ("http://www.ama-assn.org/go/cpt", "90853") in codes
