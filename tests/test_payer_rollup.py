"""Golden tests of the per-diem rollup (issue 8): exactly the cases the issue lists, plus the rules as data.

Calendar: 2026-01-05 is a Monday. Every group session runs 09:00-12:00 (180 minutes) unless a test
says otherwise; minutes attended are what count.
"""

from __future__ import annotations

from datetime import date, timedelta

import orjson
import pytest

from fhir_iop.errors import ConfigError
from fhir_iop.payer.rollup import IopRecords, load_rules, rollup
from fhir_iop.records.model import (Attendance, Client, Consent, CounselingSession, Coverage, Enrollment,
                                    GroupSession, Program, default_context)

CTX = default_context()
MON = date(2026, 1, 5)
PERIOD = (date(2026, 1, 1), date(2026, 1, 31))
RULES = load_rules().default


def day(offset: int) -> date:
    return MON + timedelta(days=offset)


class Clinic:
    """A tiny clinic built record by record (every record validated as if read from a file)."""

    def __init__(self):
        self.records = IopRecords()
        self._add(Program, program_id="SUD-IOP", name="SUD IOP", kind="substance-use")
        self._add(Program, program_id="PSY-IOP", name="Psychiatric IOP", kind="mental-health")
        self._sessions: set[str] = set()

    def _add(self, model, **data):
        rec = model.model_validate(data, context=CTX)
        self.records.add(rec)
        return rec

    def client(self, mrn: str, payer: str = "AETNA", *, program: str = "SUD-IOP", levels=(("IOP-3", MON),),
               admitted: date = MON, discharged: date | None = None, auth: tuple | None = (MON, date(2026, 3, 31)),
               schedule=("mon", "wed", "fri"), consent: bool = True) -> "Clinic":
        self._add(Client, mrn=mrn, family_name="Test", given_names=[mrn], birth_date="1990-01-01")
        if payer:
            self.coverage(mrn, payer, auth=auth)
        status = [{"status": "active", "since": admitted}]
        if discharged:
            status.append({"status": "completed", "since": discharged})
        self._add(Enrollment, enrollment_id=f"E-{mrn}", client_mrn=mrn, program_id=program,
                  status_history=status, level_history=[{"level": lv, "since": s} for lv, s in levels],
                  admitted_on=admitted, discharged_on=discharged, diagnoses=["F10.20"], schedule_days=list(schedule))
        if consent and payer:
            self.consent(mrn, payer)
        return self

    def coverage(self, mrn: str, payer: str, *, auth=(MON, date(2026, 3, 31)), start=None, end=None, cid=None):
        pa = {"prior_auth_number": f"PA-{mrn}-{payer}", "prior_auth_start": auth[0], "prior_auth_end": auth[1]} \
            if auth else {}
        self._add(Coverage, coverage_id=cid or f"COV-{mrn}-{payer}", client_mrn=mrn, payer_id=payer,
                  payer_name=payer.title(), member_id=f"MB-{mrn}", start=start, end=end, **pa)

    def consent(self, mrn: str, payer: str, *, classes=("demographics", "enrollment", "encounters", "coverage"),
                start=date(2025, 12, 1)):
        self._add(Consent, consent_id=f"CNS-{mrn}-{payer}", client_mrn=mrn, program_id="SUD-IOP",
                  recipient_id=payer, recipient_name=payer.title(), recipient_kind="payer", purposes=["HPAYMT"],
                  data_classes=list(classes), signed_on=start, start=start, end=date(2027, 1, 1))

    def session(self, d: date, program: str = "SUD-IOP", modality: str = "in-person") -> str:
        sid = f"GS-{program}-{d:%Y%m%d}-{modality}"
        if sid not in self._sessions:
            self._sessions.add(sid)
            self._add(GroupSession, session_id=sid, program_id=program, topic="check-in", kind="process",
                      facilitators=["C001"], start=f"{d}T09:00:00-05:00", end=f"{d}T12:00:00-05:00",
                      modality=modality)
        return sid

    def attend(self, mrn: str, d: date, minutes: int = 180, *, status: str | None = None,
               modality: str = "in-person", program: str = "SUD-IOP") -> "Clinic":
        status = status or ("present" if minutes >= 180 else "left-early" if minutes else "absent")
        self._add(Attendance, session_id=self.session(d, program, modality), client_mrn=mrn,
                  enrollment_id=f"E-{mrn}", status=status, minutes_attended=minutes)
        return self

    def counsel(self, mrn: str, d: date, minutes: int, *, status: str = "completed", kind: str = "individual"):
        end_min = 13 * 60 + minutes
        self._add(CounselingSession, counseling_session_id=f"CS-{mrn}-{d:%Y%m%d}", client_mrn=mrn,
                  enrollment_id=f"E-{mrn}", kind=kind, status=status, counselor_id="C001",
                  start=f"{d}T13:00:00-05:00", end=f"{d}T{end_min // 60:02d}:{end_min % 60:02d}:00-05:00",
                  modality="in-person")
        return self

    def week(self, mrn: str, monday: date, days=(0, 2, 4), **kw) -> "Clinic":
        for i in days:
            self.attend(mrn, monday + timedelta(days=i), **kw)
        return self

    def run(self, payer: str = "AETNA", period=PERIOD, rules=RULES):
        return rollup(self.records, payer, *period, rules)


def lines_of(r, mrn):
    return {x.day: x for x in r.lines if x.client_mrn == mrn}


def short_of(r, mrn):
    return {x.day: x.reason for x in r.short if x.client_mrn == mrn}


# -- the cases ------------------------------------------------------------------------------

def test_a_day_of_2_h_59_min_falls_short_by_one_minute():
    c = Clinic().client("A").attend("A", day(0), 150).counsel("A", day(0), 29).week("A", MON, (1, 2, 4))
    r = c.run()
    assert short_of(r, "A") == {day(0): "179 minutes < 180"}
    assert sorted(lines_of(r, "A")) == [day(1), day(2), day(4)]


def test_exactly_3_h_is_billable_and_adds_up_group_and_individual_minutes():
    c = Clinic().client("A").attend("A", day(0), 150).counsel("A", day(0), 30).week("A", MON, (2, 4))
    line = lines_of(c.run(), "A")[day(0)]
    assert (line.minutes, line.hcpcs, line.revenue, line.level) == (180, "H0015", "0906", "IOP-3")
    assert [s.kind for s in line.services] == ["attendance", "counseling_session"]
    assert short_of(c.run(), "A") == {}


def test_a_no_show_counselling_session_adds_no_minutes():
    c = Clinic().client("A").attend("A", day(0), 150).counsel("A", day(0), 30, status="no-show")
    c.week("A", MON, (1, 2, 4))
    assert short_of(c.run(), "A") == {day(0): "150 minutes < 180"}


def test_a_telehealth_day_is_billable_and_marked():
    c = Clinic().client("A").week("A", MON, (0, 4)).attend("A", day(2), modality="telehealth-video")
    lines = lines_of(c.run(), "A")
    assert sorted(lines) == [day(0), day(2), day(4)]
    assert [lines[d].telehealth for d in sorted(lines)] == [False, True, False]


def test_an_absence_is_reported_not_billed():
    c = Clinic().client("A").week("A", MON, (0, 2, 4)).attend("A", day(1), 0, status="absent")
    r = c.run()
    assert short_of(r, "A") == {day(1): "client absent"}
    assert len(lines_of(r, "A")) == 3


def test_a_week_with_only_2_program_days_bills_none_of_them():
    c = Clinic().client("A").week("A", MON, (0, 2)).attend("A", day(4), 0, status="absent")
    c.week("A", day(7), (0, 2, 4))
    r = c.run()
    assert short_of(r, "A") == {day(0): "only 2 program days in week of 2026-01-05 (needs 3)",
                                day(2): "only 2 program days in week of 2026-01-05 (needs 3)",
                                day(4): "client absent"}
    assert sorted(lines_of(r, "A")) == [day(7), day(9), day(11)]


def test_a_short_day_does_not_count_toward_the_week():
    c = Clinic().client("A").week("A", MON, (0, 2)).attend("A", day(4), 120)
    assert short_of(c.run(), "A") == {day(0): "only 2 program days in week of 2026-01-05 (needs 3)",
                                      day(2): "only 2 program days in week of 2026-01-05 (needs 3)",
                                      day(4): "120 minutes < 180"}


def test_a_mid_period_step_down_from_iop6_to_iop3():
    c = Clinic().client("A", levels=(("IOP-6", MON), ("IOP-3", day(7))),
                        schedule=("mon", "tue", "wed", "thu", "fri", "sat"))
    c.week("A", MON, range(6)).week("A", day(7), (0, 2, 4))
    r = c.run()
    lines = lines_of(r, "A")
    assert short_of(r, "A") == {}
    assert [(d.isoformat(), lines[d].level) for d in sorted(lines)] == [
        ("2026-01-05", "IOP-6"), ("2026-01-06", "IOP-6"), ("2026-01-07", "IOP-6"), ("2026-01-08", "IOP-6"),
        ("2026-01-09", "IOP-6"), ("2026-01-10", "IOP-6"),
        ("2026-01-12", "IOP-3"), ("2026-01-14", "IOP-3"), ("2026-01-16", "IOP-3")]
    assert {x.hcpcs for x in lines.values()} == {"H0015"}  # the level changes, the per-diem code does not


def test_a_discharge_mid_week_prorates_the_week_and_bills_nothing_after():
    c = Clinic().client("A", discharged=day(9)).week("A", MON, (0, 2, 4)).week("A", day(7), (0, 2, 4))
    r = c.run()
    # week of 01-12: enrolled Mon-Wed, the schedule (mon, wed, fri) has 2 days there -> 2 are enough
    assert sorted(lines_of(r, "A")) == [day(0), day(2), day(4), day(7), day(9)]
    assert short_of(r, "A") == {day(11): "after discharge (2026-01-14)"}


def test_a_discharge_mid_week_with_strict_weeks():
    c = Clinic().client("A", discharged=day(9)).week("A", MON, (0, 2, 4)).week("A", day(7), (0, 2))
    r = c.run(rules=RULES.model_copy(update={"partial_weeks": "strict"}))
    assert short_of(r, "A") == {day(7): "only 2 program days in week of 2026-01-12 (needs 3)",
                                day(9): "only 2 program days in week of 2026-01-12 (needs 3)"}


def test_a_missing_prior_authorization():
    c = Clinic().client("A", auth=None).week("A", MON)
    r = c.run()
    assert r.lines == []
    assert short_of(r, "A") == {d: f"no prior authorization covering {d}" for d in (day(0), day(2), day(4))}


def test_an_expired_prior_authorization():
    c = Clinic().client("A", auth=(date(2025, 12, 1), day(6))).week("A", MON).week("A", day(7))
    r = c.run()
    assert sorted(lines_of(r, "A")) == [day(0), day(2), day(4)]
    assert short_of(r, "A") == {
        d: f"no prior authorization covering {d} (authorization PA-A-AETNA covers 2025-12-01 to 2026-01-11)"
        for d in (day(7), day(9), day(11))}


def test_two_payers_in_one_period():
    """Aetna until Tuesday 01-13, Cigna from Wednesday: each payer gets its own days; the week rule
    counts the program days of the whole week, whoever pays them."""
    c = Clinic().client("A", payer=None)
    c.coverage("A", "AETNA", end=day(8))
    c.coverage("A", "CIGNA", start=day(9))
    c.week("A", MON).week("A", day(7))
    aetna, cigna = c.run("AETNA"), c.run("CIGNA")
    assert sorted(lines_of(aetna, "A")) == [day(0), day(2), day(4), day(7)]
    assert sorted(lines_of(cigna, "A")) == [day(9), day(11)]
    assert {x.coverage_id for x in aetna.lines} == {"COV-A-AETNA"}
    assert {x.coverage_id for x in cigna.lines} == {"COV-A-CIGNA"}
    assert aetna.short == cigna.short == []
    assert c.run("HZNBCBS").lines == []


def test_the_billing_period_cuts_days_but_not_weeks():
    c = Clinic().client("A").week("A", MON)  # Mon 01-05, Wed 01-07, Fri 01-09
    r = c.run(period=(day(2), day(30)))
    assert sorted(lines_of(r, "A")) == [day(2), day(4)]


def test_a_mental_health_program_bills_s9480_with_revenue_0905():
    c = Clinic().client("P", program="PSY-IOP").week("P", MON, program="PSY-IOP")
    assert {(x.hcpcs, x.revenue) for x in c.run().lines} == {("S9480", "0905")}


# -- rules are data -----------------------------------------------------------------------------------

def test_a_payer_contract_overrides_the_shipped_rules(tmp_path):
    rules = orjson.loads(load_rules.__globals__["MAPPINGS_DIR"].joinpath("payer-rules.json").read_bytes())
    rules["payers"] = {"CIGNA": {"min_minutes_per_day": 120, "min_days_per_week": 2}}
    (tmp_path / "payer-rules.json").write_bytes(orjson.dumps(rules))
    site = load_rules(tmp_path)
    c = Clinic().client("A", payer="CIGNA").week("A", MON, (0, 2), minutes=150)
    assert len(c.run("CIGNA", rules=site.for_payer("CIGNA")).lines) == 2
    assert c.run("CIGNA", rules=site.default).lines == []


@pytest.mark.parametrize("bad, message", [
    ({"default": {"min_minutes_per_day": 180, "min_days_per_week": 3}}, "codes"),
    ({"default": {"min_minutes_per_day": 0, "min_days_per_week": 3, "codes": {}}}, "min_minutes_per_day"),
    ({"default": {"min_minutes_per_day": 180, "min_days_per_week": 3,
                  "codes": {"substance-use": {"hcpcs": "H15", "revenue": "0906"}}}}, "hcpcs"),
])
def test_bad_rules_fail_on_load(tmp_path, bad, message):
    (tmp_path / "payer-rules.json").write_bytes(orjson.dumps(bad))
    with pytest.raises(ConfigError, match=message):
        load_rules(tmp_path)
