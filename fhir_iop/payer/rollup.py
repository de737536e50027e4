"""The per-diem rollup: IOP records → billable service days and short days with their reason.

Pure domain logic on IOP records (no FHIR here). Per client, enrollment and service day it adds up
the minutes actually attended: group attendance (``minutes_attended``) and completed counselling
sessions (their minutes). A day then has to pass, in this order:

1. inside the enrollment (not before admission, not after discharge);
2. attended at all (else "client absent");
3. at least ``min_minutes_per_day`` minutes (H0015: "at least 3 hours/day");
4. covered by the payer's prior authorization (when ``require_prior_auth``);
5. one of at least ``min_days_per_week`` days of that week that passed 1-3 (H0015: "at least 3
   days/week"). A week cut by admission or discharge asks, with ``partial_weeks = "prorate"``, only
   for as many days as the client's schedule has in the enrolled part of it (``"strict"``: the full
   number; ``"exempt"``: none).

The week rule looks at the whole week even when the billing period cuts it, and at days under any
payer: it is about the program the client attended, not about who pays. A day belongs to the payer
whose coverage of the client is in force that day; a day no coverage of this payer covers is not
this payer's and is not reported.

Telehealth days are billable and marked (``telehealth``): the minutes a client attended by video or
telephone. No place-of-service code is derived: CMS POS 02/10 are unconfirmed (domain-codes.md §3d,
§9.5), so the mark travels as a fhir-iop extension on the Claim item.

Rules are data (``mappings/payer-rules.json``, validated on load; a site's ``payer-rules.json`` in
``--mappings`` replaces it, and its ``payers`` entries override single fields per payer).
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fhir_iop.errors import ConfigError
from fhir_iop.records.model import (Attendance, Client, Consent, CounselingSession, Counselor, Coverage,
                                    Enrollment, GroupSession, Program)
from fhir_iop.terminology import MAPPINGS_DIR

RULES_FILE = "payer-rules.json"
_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
IN_PERSON = "in-person"


# -- rules ----------------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BillingCodes(_Strict):
    hcpcs: str = Field(pattern=r"^[A-Z][0-9]{4}$")
    """HCPCS Level II per-diem code (H0015, S9480)."""
    revenue: str = Field(pattern=r"^[0-9]{4}$")
    """NUBC revenue code (0905, 0906)."""


class PayerRules(_Strict):
    """One payer's rule for a billable IOP day."""

    min_minutes_per_day: int = Field(ge=1, le=24 * 60)
    min_days_per_week: int = Field(ge=0, le=7)
    week_starts_on: Literal["mon", "sun"] = "mon"
    partial_weeks: Literal["prorate", "strict", "exempt"] = "prorate"
    require_prior_auth: bool = True
    counseling_kinds: tuple[str, ...] = ("individual", "family-with-client", "family-without-client")
    codes: dict[str, BillingCodes]
    """Billing codes per program kind (program-kind CodeSystem)."""


class RulesFile(_Strict):
    default: PayerRules
    payers: dict[str, dict] = Field(default_factory=dict)

    def for_payer(self, payer_id: str) -> PayerRules:
        override = self.payers.get(payer_id)
        if not override:
            return self.default
        try:
            return PayerRules.model_validate(self.default.model_dump() | override)
        except ValidationError as e:
            raise ConfigError(f"{RULES_FILE}: payers.{payer_id}: {e}") from e


def load_rules(mappings: str | os.PathLike | None = None) -> RulesFile:
    """The shipped rules, or the site's ``payer-rules.json`` when its mappings directory has one."""
    extra = mappings or os.environ.get("FHIR_IOP_MAPPINGS")
    path = MAPPINGS_DIR / RULES_FILE
    if extra and (Path(extra) / RULES_FILE).is_file():
        path = Path(extra) / RULES_FILE
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the payer rules: {e}") from e
    data.pop("_comment", None)
    try:
        rules = RulesFile.model_validate(data)
        for payer_id in rules.payers:
            rules.for_payer(payer_id)
        return rules
    except ValidationError as e:
        raise ConfigError(f"{path}: invalid payer rules: {e}") from e


# -- input ----------------------------------------------------------------------------------------

@dataclass
class IopRecords:
    """The record types the rollup and the payer export read (each a list of validated records)."""

    programs: list[Program] = field(default_factory=list)
    counselors: list[Counselor] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)
    coverages: list[Coverage] = field(default_factory=list)
    enrollments: list[Enrollment] = field(default_factory=list)
    group_sessions: list[GroupSession] = field(default_factory=list)
    attendance: list[Attendance] = field(default_factory=list)
    counseling_sessions: list[CounselingSession] = field(default_factory=list)
    consents: list[Consent] = field(default_factory=list)

    def add(self, rec) -> None:
        bucket = getattr(self, rec.file_stem, None)
        if bucket is not None:
            bucket.append(rec)


# -- output ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Service:
    """One service of a day: what it is (for the Encounter reference), minutes, modality."""

    kind: Literal["attendance", "counseling_session"]
    key: str
    minutes: int
    modality: str


@dataclass
class ServiceDay:
    """One client's services of one day in one enrollment, and the verdict."""

    client_mrn: str
    enrollment_id: str
    program_id: str
    day: date
    level: str
    services: list[Service] = field(default_factory=list)
    coverage_id: str | None = None
    reason: str | None = None          #: why the day is not billable (None: billable)

    @property
    def minutes(self) -> int:
        return sum(s.minutes for s in self.services)

    @property
    def attended(self) -> list[Service]:
        return [s for s in self.services if s.minutes > 0]

    @property
    def telehealth(self) -> bool:
        return any(s.modality != IN_PERSON for s in self.attended)

    @property
    def billable(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class BillableLine:
    client_mrn: str
    enrollment_id: str
    program_id: str
    coverage_id: str
    day: date
    level: str
    minutes: int
    telehealth: bool
    hcpcs: str
    revenue: str
    services: tuple[Service, ...]


@dataclass(frozen=True)
class ShortDay:
    client_mrn: str
    enrollment_id: str
    day: date
    minutes: int
    reason: str

    def __str__(self) -> str:
        return f"{self.client_mrn} {self.day} ({self.enrollment_id}): {self.reason}"


@dataclass
class Rollup:
    payer_id: str
    start: date
    end: date
    lines: list[BillableLine] = field(default_factory=list)
    short: list[ShortDay] = field(default_factory=list)

    @property
    def clients(self) -> list[str]:
        return sorted({x.client_mrn for x in self.lines} | {x.client_mrn for x in self.short})


# -- the rollup -----------------------------------------------------------------------------------

def _level_on(e: Enrollment, day: date) -> str:
    level = e.level_history[0].level
    for change in e.level_history:
        if change.since <= day:
            level = change.level
    return level


def _covers(c: Coverage, day: date) -> bool:
    return c.status == "active" and (c.start is None or c.start <= day) and (c.end is None or day <= c.end)


def _week_start(day: date, starts_on: str) -> date:
    offset = day.weekday() if starts_on == "mon" else (day.weekday() + 1) % 7
    return day - timedelta(days=offset)


def _required_days(e: Enrollment, week: date, rules: PayerRules) -> int:
    if rules.partial_weeks == "strict":
        return rules.min_days_per_week
    week_days = [week + timedelta(days=i) for i in range(7)]
    enrolled = [d for d in week_days if (e.admitted_on is None or d >= e.admitted_on)
                and (e.discharged_on is None or d <= e.discharged_on)]
    if len(enrolled) == 7:
        return rules.min_days_per_week
    if rules.partial_weeks == "exempt":
        return 0
    scheduled = [d for d in enrolled if not e.schedule_days or _WEEKDAYS[d.weekday()] in e.schedule_days]
    return min(rules.min_days_per_week, len(scheduled))


def service_days(records: IopRecords, rules: PayerRules) -> list[ServiceDay]:
    """Every client's service days (all payers, all dates), in client, enrollment, day order."""
    sessions = {s.session_id: s for s in records.group_sessions}
    enrollments = {e.enrollment_id: e for e in records.enrollments}
    days: dict[tuple[str, str, date], ServiceDay] = {}

    def day_of(mrn: str, enrollment_id: str, day: date) -> ServiceDay | None:
        e = enrollments.get(enrollment_id)
        if e is None or e.client_mrn != mrn:
            return None  # the record validation / mapping reports these
        key = (mrn, enrollment_id, day)
        if key not in days:
            days[key] = ServiceDay(mrn, enrollment_id, e.program_id, day, _level_on(e, day))
        return days[key]

    for a in records.attendance:
        s = sessions.get(a.session_id)
        if s is None:
            continue
        if d := day_of(a.client_mrn, a.enrollment_id, s.start.date()):
            d.services.append(Service("attendance", f"{a.session_id}/{a.client_mrn}", a.minutes_attended,
                                      s.modality))
    for c in records.counseling_sessions:
        if c.kind not in rules.counseling_kinds:
            continue
        if d := day_of(c.client_mrn, c.enrollment_id, c.start.date()):
            d.services.append(Service("counseling_session", c.counseling_session_id,
                                      c.minutes if c.status == "completed" else 0, c.modality))
    return [days[k] for k in sorted(days)]


def rollup(records: IopRecords, payer_id: str, start: date, end: date, rules: PayerRules) -> Rollup:
    """Billable lines and short days of ``payer_id`` between ``start`` and ``end`` (both included)."""
    enrollments = {e.enrollment_id: e for e in records.enrollments}
    kinds = {p.program_id: p.kind for p in records.programs}
    coverages: dict[str, list[Coverage]] = defaultdict(list)
    for c in records.coverages:
        coverages[c.client_mrn].append(c)
    out = Rollup(payer_id, start, end)

    days = service_days(records, rules)
    for d in days:  # rules 1-4, on every day (the week rule needs the days outside the period too)
        e = enrollments[d.enrollment_id]
        cov = next((c for c in sorted(coverages[d.client_mrn], key=lambda c: c.coverage_id)
                    if c.payer_id == payer_id and _covers(c, d.day)), None)
        d.coverage_id = cov.coverage_id if cov else None
        if e.admitted_on is None or d.day < e.admitted_on:
            d.reason = f"before admission ({e.admitted_on or 'not admitted'})"
        elif e.discharged_on is not None and d.day > e.discharged_on:
            d.reason = f"after discharge ({e.discharged_on})"
        elif not d.attended:
            d.reason = "client absent"
        elif d.minutes < rules.min_minutes_per_day:
            d.reason = f"{d.minutes} minutes < {rules.min_minutes_per_day}"
        elif rules.require_prior_auth and cov is not None and not (
                cov.prior_auth_number and (cov.prior_auth_start is None or cov.prior_auth_start <= d.day)
                and (cov.prior_auth_end is None or d.day <= cov.prior_auth_end)):
            if cov.prior_auth_number:
                d.reason = (f"no prior authorization covering {d.day} (authorization {cov.prior_auth_number} "
                            f"covers {cov.prior_auth_start or '…'} to {cov.prior_auth_end or '…'})")
            else:
                d.reason = f"no prior authorization covering {d.day}"

    weeks: dict[tuple[str, str, date], list[ServiceDay]] = defaultdict(list)
    for d in days:  # rule 5: days that passed 1-3, whoever pays them
        if d.reason is None or d.reason.startswith("no prior authorization"):
            weeks[(d.client_mrn, d.enrollment_id, _week_start(d.day, rules.week_starts_on))].append(d)
    for (_, enrollment_id, week), program_days in weeks.items():
        need = _required_days(enrollments[enrollment_id], week, rules)
        if len(program_days) < need:
            for d in program_days:
                if d.reason is None:
                    d.reason = (f"only {len(program_days)} program day{'s' if len(program_days) != 1 else ''} "
                                f"in week of {week} (needs {need})")

    for d in days:
        if d.coverage_id is None or not (start <= d.day <= end):
            continue
        codes = rules.codes.get(kinds.get(d.program_id, ""))
        if d.reason is None and codes is None:
            d.reason = f"no billing code for program kind {kinds.get(d.program_id)!r} in the payer rules"
        if d.reason is None:
            out.lines.append(BillableLine(d.client_mrn, d.enrollment_id, d.program_id, d.coverage_id, d.day,
                                          d.level, d.minutes, d.telehealth, codes.hcpcs, codes.revenue,
                                          tuple(d.attended)))
        else:
            out.short.append(ShortDay(d.client_mrn, d.enrollment_id, d.day, d.minutes, d.reason))
    return out
