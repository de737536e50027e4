#!/usr/bin/env python
"""Generate a realistic IOP clinic as IOP record files: deterministic, streamed, any size.

    python examples/generate_clinic.py OUT_DIR [--clients 25] [--weeks 10] [--seed 2026] [--format csv|ndjson]

The clinic is Harbor Light Recovery Center in Neptune, NJ (site time zone America/New_York). It runs
two ASAM level 2.1 Intensive Outpatient Programs: an adult substance-use IOP (``SUD-IOP``) and a
psychiatric IOP (``PSY-IOP``). Each has a morning track (09:00-12:00) and an evening track
(18:00-21:00), Monday to Saturday, in open (rolling-admission) groups. A weekday follows a fixed
curriculum (process, psychoeducation, a weekly family group on Wednesday, skills, twelve-step
facilitation in the SUD program, process); topics rotate week by week. Groups meet in person,
except Saturday evenings, a few snow days and the odd session by video (rarely by phone).

A client's course: referred, admitted 3-14 days later on a weekday, IOP-6 (the six weekly groups)
for 2-4 weeks, stepped down to IOP-3 (Mon/Wed/Fri or Tue/Thu/Sat) on a Monday, discharged after
6-12 weeks in all (``completed``, or ``stepped-down`` to outpatient care). Along the way some go
on hold for a few days (detox, a medical stay), a few step back up to IOP-6, some leave against
advice (or are discharged for non-attendance), and a few are transferred: stepped up to a higher
level of care, or moved to the clinic's other program (a second enrollment of the same client).
Each client has a primary counsellor (one of the program's clinicians, who also lead the groups)
and a care team of two or three; individual counselling is weekly with the primary counsellor, and
clients with a family contact also have a family session every other week.
Staff and groups grow with ``clients``: one group per track for every ~40 clients of the run, one
clinician per ~20, one psychiatrist, nurse, case manager and peer specialist per ~150.

The files are an extract of ``weeks`` weeks from ``start``: about a third of the clients were
admitted before ``start`` and are mid-course; the last referrals are still waiting for admission;
nothing after the last day is known yet. Sessions before ``start`` are not in the extract.
Datetimes carry the site's UTC offset (-05:00, or -04:00 once daylight saving time starts).

Records are written as they are made (CSV through ``csv.writer``, or NDJSON through orjson): memory
holds one small plan per enrollment (the group rosters), never sessions or attendance.
"""

from __future__ import annotations

import argparse
import csv
import random
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson

from fhir_iop.records.model import RECORD_TYPES

TZ = ZoneInfo("America/New_York")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
IOP6_DAYS = DAYS[:6]
IOP3_DAYS = (("mon", "wed", "fri"), ("tue", "thu", "sat"))
TRACKS = {"morning": (time(9), time(12)), "evening": (time(18), time(21))}
GROUP_SIZE = 40  # clients one open group takes in over a run (about ten in the room at a time)
CASELOAD = 20    # clients a primary counsellor takes on over a run (about ten at a time)
ONE_DAY = timedelta(days=1)


def npi(base9: str) -> str:
    """A 10-digit NPI: 9 digits plus the Luhn check digit computed over the prefix 80840."""
    total = 0
    for i, ch in enumerate(reversed("80840" + base9)):
        n = int(ch) * (2 if i % 2 == 0 else 1)
        total += n - 9 if n > 9 else n
    return base9 + str((10 - total % 10) % 10)


SITE = dict(phone="732-555-0100", city="Neptune", state="NJ", postal_code="07753")
PROGRAMS = {  # program_id -> the rest of its record
    "SUD-IOP": dict(name="Harbor Light Adult Substance Use IOP", kind="substance-use",
                    npi=npi("154321098"), address_line="1200 Corlies Avenue, Suite 200", **SITE),
    "PSY-IOP": dict(name="Harbor Light Adult Psychiatric IOP", kind="mental-health",
                    npi=npi("154321106"), address_line="1200 Corlies Avenue, Suite 300", **SITE),
}
PROGRAM_SHARE = {"SUD-IOP": 0.65, "PSY-IOP": 0.35}
TRACK_SHARE = {"morning": 0.4, "evening": 0.6}  # working clients prefer evenings

# Curriculum: Monday..Saturday session kind per program; topics rotate week by week.
WEEK = {"SUD-IOP": ("process", "psychoeducation", "family", "skills", "twelve-step", "process"),
        "PSY-IOP": ("process", "psychoeducation", "family", "skills", "psychoeducation", "process")}
TOPICS = {
    "process": ("check-in",),
    "psychoeducation": ("triggers", "cognitive-distortions", "relapse-prevention", "cravings",
                        "stress-management"),
    "skills": ("coping-skills", "emotion-regulation", "communication", "stress-management"),
    "family": ("family-roles", "communication", "recovery-supports"),
    "twelve-step": ("twelve-step-intro", "recovery-supports"),
}
PSY_TOPICS = {"psychoeducation": ("triggers", "cognitive-distortions", "relapse-prevention",
                                  "stress-management", "emotion-regulation"),
              "family": ("communication", "recovery-supports", "emotion-regulation")}
CO_FACILITATOR = {"twelve-step": "peer-specialist", "family": "case-manager", "psychoeducation": "nurse"}

# Diagnoses: ICD-10-CM codes from profiles/ValueSet-sud-diagnoses.json (the ones with displays).
SUD_DX = {"F11.20": 35, "F10.20": 30, "F19.20": 10, "F10.10": 10, "F11.10": 8, "F11.90": 7}
PSY_DX = "F99"  # the only mental-health code in the verified list

REFERRALS = {
    "SUD-IOP": {"residential-step-down": 25, "php-step-down": 10, "self": 12, "family": 10,
                "court": 10, "primary-care": 10, "emergency-department": 8, "hospital": 5,
                "employer": 6, "other": 4},
    "PSY-IOP": {"php-step-down": 30, "hospital": 20, "primary-care": 20, "self": 10, "family": 8,
                "emergency-department": 8, "employer": 4},
}
STEP_DOWN_FROM = {"residential-step-down", "php-step-down", "hospital", "emergency-department"}

PAYERS = [  # payer_id, payer_name, weight, member id
    ("NJMCD", "NJ Medicaid", 35, lambda r: str(r.randrange(10**11, 10**12))),
    ("HZNBCBS", "Horizon BCBS NJ", 25, lambda r: f"3HZN{r.randrange(10**8, 10**9)}"),
    ("AETNA", "Aetna", 15, lambda r: f"W{r.randrange(10**8, 10**9)}"),
    ("UHC", "UnitedHealthcare", 10, lambda r: f"{r.randrange(10**8, 10**9)}"),
    ("CIGNA", "Cigna", 8, lambda r: f"U{r.randrange(10**7, 10**8)}01"),
    ("AMERIHEALTH", "AmeriHealth New Jersey", 7, lambda r: f"AHN{r.randrange(10**7, 10**8)}"),
]

MALE = ("James", "Michael", "Robert", "John", "David", "William", "Joseph", "Anthony", "Christopher",
        "Daniel", "Matthew", "Kevin", "Brian", "Luis", "Carlos", "Jose", "Miguel", "Raj", "Amit",
        "Tyrone", "DeShawn", "Marcus", "Kwame", "Sean", "Patrick", "Wei", "Minh", "Tomasz", "Eli")
FEMALE = ("Mary", "Jennifer", "Linda", "Patricia", "Elizabeth", "Jessica", "Sarah", "Ashley", "Amanda",
          "Nicole", "Maria", "Ana", "Rosa", "Carmen", "Priya", "Anjali", "Keisha", "Aaliyah", "Tanisha",
          "Siobhan", "Colleen", "Mei", "Linh", "Agnieszka", "Francesca", "Rachel", "Leah", "Megan", "Kayla")
FAMILY = ("Smith", "Johnson", "Williams", "Rodriguez", "Garcia", "Martinez", "Patel", "Shah", "Kim",
          "Nguyen", "O'Brien", "Murphy", "Kowalski", "Russo", "Esposito", "Romano", "Cohen", "Goldberg",
          "Jackson", "Brown", "Davis", "Thompson", "Rivera", "Torres", "Santos", "Oliveira", "Okafor",
          "Mensah", "Chen", "Wang", "Sullivan", "McCarthy", "Nowak", "Lopez", "Gonzalez", "Perez",
          "Washington", "Robinson", "Lee", "Walsh", "Fitzgerald", "Reyes", "Cruz", "Morales", "Ramos")
TOWNS = (("Neptune", "07753", "732"), ("Asbury Park", "07712", "732"), ("Long Branch", "07740", "732"),
         ("Freehold", "07728", "732"), ("Red Bank", "07701", "732"), ("Toms River", "08753", "732"),
         ("Lakewood", "08701", "732"), ("Brick", "08723", "732"), ("Edison", "08817", "732"),
         ("New Brunswick", "08901", "732"), ("Trenton", "08608", "609"), ("Newark", "07102", "973"),
         ("Elizabeth", "07201", "908"), ("Jersey City", "07306", "201"), ("Camden", "08102", "856"))
STREETS = ("Main Street", "Broad Street", "Ocean Avenue", "Bangs Avenue", "Route 35", "Park Place",
           "Washington Street", "Maple Avenue", "Central Avenue", "Monmouth Road", "Elm Street")


def weighted(rng: random.Random, table: dict):
    return rng.choices(list(table), weights=list(table.values()))[0]


class Deck:
    """Draws in fixed proportions, so that even a small clinic shows every case: each round of
    draws deals every card once, in a shuffled order."""

    def __init__(self, rng: random.Random, cards: dict):
        self.rng, self.cards, self.hand = rng, [c for c, n in cards.items() for _ in range(n)], []

    def draw(self):
        if not self.hand:
            self.hand = self.cards[:]
            self.rng.shuffle(self.hand)
        return self.hand.pop()


def weekday_on_or_after(d: date) -> date:
    """The first day on or after ``d`` when the clinic admits and discharges (not a weekend or holiday)."""
    while d.weekday() >= 5 or (d.month, d.day) in ((1, 1), (7, 4), (12, 25)):
        d += ONE_DAY
    return d


def monday_on_or_after(d: date) -> date:
    return d + timedelta(days=-d.weekday() % 7)


def at(d: date, t: time) -> str:
    """A local date and time with the site's UTC offset, e.g. 2026-01-05T18:00:00-05:00."""
    return datetime.combine(d, t, TZ).isoformat()


def plus(t: time, minutes: int) -> time:
    return (datetime.combine(date.min, t) + timedelta(minutes=minutes)).time()


def plain(name: str) -> str:
    return name.lower().replace("'", "")


def phone(rng: random.Random, area: str = "732") -> str:
    return f"{area}-555-01{rng.randrange(100):02d}"  # 555-0100..0199: reserved for fiction


# -- output ------------------------------------------------------------------------------------

class Files:
    """One file per record type; columns (and NDJSON keys) in model field order."""

    def __init__(self, out_dir: Path, fmt: str):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.fmt, self.streams, self.sinks, self.counts = fmt, [], {}, {}
        for model in RECORD_TYPES:
            stem, fields = model.file_stem, list(model.model_fields)
            if fmt == "csv":
                f = open(out_dir / f"{stem}.csv", "w", newline="", encoding="utf-8")
                w = csv.writer(f, lineterminator="\n")
                w.writerow(fields)
                self.sinks[stem] = (fields, frozenset(fields), w.writerow)
            else:
                f = open(out_dir / f"{stem}.ndjson", "wb")
                self.sinks[stem] = (fields, frozenset(fields), f.write)
            self.streams.append(f)
            self.counts[stem] = 0

    def write(self, stem: str, **row) -> None:
        fields, known, sink = self.sinks[stem]
        assert row.keys() <= known, row.keys() - known
        if self.fmt == "csv":
            sink([_cell(row.get(f)) for f in fields])
        else:
            sink(orjson.dumps({f: row[f] for f in fields if row.get(f) not in (None, [])},
                              option=orjson.OPT_APPEND_NEWLINE))
        self.counts[stem] += 1

    def close(self) -> None:
        for f in self.streams:
            f.close()


def _cell(v) -> str:
    """A CSV cell: lists `|`-separated, histories `status@date;status@date`."""
    if v is None:
        return ""
    if isinstance(v, list):
        if v and isinstance(v[0], dict):
            return ";".join("@".join(str(x) for x in e.values()) for e in v)
        return "|".join(v)
    return str(v)


# -- staff --------------------------------------------------------------------------------------

def n_groups(clients: int, program: str, track: str) -> int:
    return max(1, round(clients * PROGRAM_SHARE[program] * TRACK_SHARE[track] / GROUP_SIZE))


def make_staff(rng: random.Random, clients: int, out: Files):
    """Clinicians per program (primary counsellors; each leads at most one morning and one
    evening group) and the shared psychiatrists, nurses, case managers and peer specialists."""
    clinicians: dict[str, list[str]] = {}
    support: dict[str, list[str]] = {}
    offices: dict[str, str] = {}
    n_support = max(1, clients // 150)
    jobs = []  # (program or role, role, credentials)
    for program in PROGRAMS:
        n = max(max(n_groups(clients, program, t) for t in TRACKS) + (program == "SUD-IOP"),
                round(clients * PROGRAM_SHARE[program] / CASELOAD))
        creds = (("counselor", "LCADC"), ("therapist", "LCSW, LCADC")) if program == "SUD-IOP" \
            else (("therapist", "LCSW"), ("therapist", "LPC"))
        jobs += [(program, *creds[k % 2]) for k in range(n)]
    for role, cred in (("psychiatrist", "MD"), ("nurse", "RN"), ("case-manager", None),
                       ("peer-specialist", "CPRS")):
        jobs += [(role, role, cred)] * n_support
    for k, (team, role, cred) in enumerate(jobs, 1):
        cid = f"C{k:03d}"
        given, family = rng.choice(MALE + FEMALE), rng.choice(FAMILY)
        licensed = role in ("counselor", "therapist", "psychiatrist", "nurse")
        out.write("counselors", counselor_id=cid, family_name=family, given_names=[given], role=role,
                  credentials=cred, npi=npi(f"1{rng.randrange(10**8):08d}") if licensed else None,
                  phone=f"732-555-01{k % 100:02d}",
                  email=f"{given[0].lower()}{plain(family)}@harborlight.example.org")
        (clinicians if team in PROGRAMS else support).setdefault(team, []).append(cid)
        offices[cid] = f"Office {200 + k}"
    return clinicians, support, offices


# -- enrollments ----------------------------------------------------------------------------------

@dataclass(slots=True)
class Plan:
    """What the group and counselling schedules need to know about one enrollment."""
    enrollment_id: str
    mrn: str
    statuses: list  # [(status, since)]
    levels: list    # [(level, since)]
    iop3_days: tuple
    absence: float  # this client's chance of missing a group

    def active_on(self, d: date) -> bool:
        return _current(self.statuses, d) == "active"

    def days_on(self, d: date) -> tuple:
        return IOP6_DAYS if _current(self.levels, d) == "IOP-6" else self.iop3_days


def _current(history: list, d: date):
    now = None
    for value, since in history:
        if since > d:
            break
        now = value
    return now


def plan_course(rng, outcome: str, program: str, referred: date, admitted: date, last_day: date,
                transferred_in: bool = False) -> dict:
    """One enrollment's course as status and level histories, cut at the extract's last day."""
    source = "other" if transferred_in else weighted(rng, REFERRALS[program])
    intensive = source in STEP_DOWN_FROM or rng.random() < (0.5 if program == "SUD-IOP" else 0.3)
    weeks6 = rng.randint(2, 4) if intensive else 0
    total = (weeks6 + rng.randint(4, 8)) * 7 if intensive else rng.randint(6, 10) * 7
    hold = rng.random() < 0.15
    hold_from = weekday_on_or_after(admitted + timedelta(days=rng.randint(7, 24)))
    resume = weekday_on_or_after(hold_from + timedelta(days=rng.randint(4, 10)))
    total += (resume - hold_from).days if hold else 0
    if outcome == "left-against-advice":
        terminal, discharged = "left-against-advice", admitted + timedelta(days=rng.randint(8, total * 2 // 3))
        reason = "non-attendance" if rng.random() < 0.3 else "left-against-advice"
    elif outcome in ("transferred", "stepped-up") and not transferred_in:  # to the other program / to PHP
        terminal, discharged = "transferred", admitted + timedelta(days=rng.randint(10, total - 7))
        reason = outcome
    elif outcome != "stepped-down":
        terminal, discharged, reason = "completed", admitted + timedelta(days=total), "treatment-completed"
    else:
        terminal, discharged, reason = "stepped-down", admitted + timedelta(days=total), "stepped-down"
    discharged = weekday_on_or_after(discharged)

    statuses = [("referred", referred), ("active", admitted)]
    if hold and hold_from < discharged:
        statuses.append(("on-hold", hold_from))
        if resume < discharged:
            statuses.append(("active", resume))
    statuses.append((terminal, discharged))
    levels = [("IOP-6" if intensive else "IOP-3", admitted)]
    if intensive:
        step_down = monday_on_or_after(admitted + timedelta(weeks=weeks6))
        levels.append(("IOP-3", step_down))
        if rng.random() < 0.05:  # a relapse: back to six days a week for a while
            levels.append(("IOP-6", step_down + timedelta(weeks=2)))
    levels = [lv for lv in levels if lv[1] < discharged]
    if admitted > last_day:  # still waiting for admission: the level recommended at referral
        return dict(source=source, statuses=statuses[:1], levels=[(levels[0][0], referred)],
                    admitted=None, discharged=None, reason=None, absence=0.0)
    out = discharged <= last_day
    return dict(source=source, statuses=[s for s in statuses if s[1] <= last_day],
                levels=[lv for lv in levels if lv[1] <= last_day], admitted=admitted,
                discharged=discharged if out else None, reason=reason if out else None,
                absence=rng.uniform(0.15, 0.35) if terminal == "left-against-advice" else rng.uniform(0.02, 0.08))


def diagnoses(rng, program: str) -> list[str]:
    if program == "PSY-IOP":
        return [PSY_DX] + ([weighted(rng, SUD_DX)] if rng.random() < 0.2 else [])  # co-occurring use
    first = weighted(rng, SUD_DX)
    if rng.random() < 0.3:  # polysubstance: a second substance, never the same one twice
        other = {c: w for c, w in SUD_DX.items() if c[:3] != first[:3]}
        return [first, weighted(rng, other)]
    return [first]


# -- the clinic -----------------------------------------------------------------------------------

def generate(out_dir: Path, clients: int = 25, weeks: int = 10, seed: int = 2026,
             start: date = date(2026, 1, 5), fmt: str = "csv") -> dict[str, int]:
    """Write the clinic's eight record files to ``out_dir``; return the record count per file stem."""
    if fmt not in ("csv", "ndjson"):
        raise ValueError(f"format {fmt!r}: use csv or ndjson")
    if start.weekday() != 0:
        raise ValueError(f"start {start} is not a Monday")
    out = Files(Path(out_dir), fmt)
    try:
        Clinic(random.Random(seed), out, clients, weeks, start).run()
    finally:
        out.close()
    return dict(out.counts)


class Clinic:
    def __init__(self, rng: random.Random, out: Files, clients: int, weeks: int, start: date):
        self.rng, self.out, self.clients, self.weeks, self.start = rng, out, clients, weeks, start
        self.last_day = start + timedelta(weeks=weeks, days=-1)
        self.groups = {(p, t): n_groups(clients, p, t) for p in PROGRAMS for t in TRACKS}
        self.rosters = {(p, t, g): [] for (p, t), n in self.groups.items() for g in range(n)}
        self.joined = dict.fromkeys(self.groups, 0)    # clients per program and track so far
        self.admitted_to = dict.fromkeys(PROGRAMS, 0)  # clients per program so far
        self.bookings = {}  # (counselor, slot kind) -> per weekly slot, the courses booked in it
        self.enrollments = self.counseling_sessions = 0
        self.outcomes = Deck(rng, {"completed": 10, "stepped-down": 5, "left-against-advice": 3,
                                   "transferred": 1, "stepped-up": 1})
        self.arrivals = Deck(rng, {"in treatment": 6, "new": 13, "waiting": 1})

    def run(self) -> None:
        rng, out, start, last_day = self.rng, self.out, self.start, self.last_day
        for pid, program in PROGRAMS.items():
            out.write("programs", program_id=pid, **program)
        self.clinicians, self.support, self.offices = make_staff(rng, self.clients, out)
        self.leads = {(p, t, g): self.clinicians[p][(g + t_index) % len(self.clinicians[p])]
                      for p in PROGRAMS for t_index, t in enumerate(TRACKS) for g in range(self.groups[p, t])}
        for i in range(self.clients):
            mrn = f"M{100001 + i}"
            birth, family_contact = write_client(rng, mrn, start, out)
            arrival = self.arrivals.draw()
            if arrival == "in treatment":  # when the extract starts
                admitted = weekday_on_or_after(start - timedelta(days=rng.randint(3, 28)))
                referred = admitted - timedelta(days=rng.randint(3, 14))
            elif arrival == "waiting":  # referred in the last week, admission still to come
                referred = last_day - timedelta(days=rng.randint(0, 6))
                admitted = weekday_on_or_after(last_day + timedelta(days=rng.randint(1, 10)))
            else:  # referred and (mostly) admitted during the extract
                referred = start + timedelta(days=rng.randint(-7, self.weeks * 7 - 1))
                admitted = weekday_on_or_after(referred + timedelta(days=rng.randint(3, 14)))
            program = "SUD-IOP" if rng.random() < PROGRAM_SHARE["SUD-IOP"] else "PSY-IOP"
            if rng.random() < 0.92:
                write_coverage(rng, i, mrn, birth, referred, admitted if admitted <= last_day else None, out)
            c = self.enroll(mrn, program, referred, admitted, family_contact)
            if c["reason"] == "transferred":  # moved to the clinic's other program
                other = next(p for p in PROGRAMS if p != program)
                self.enroll(mrn, other, c["discharged"], weekday_on_or_after(c["discharged"] + ONE_DAY),
                            family_contact, transferred_in=True)
        write_groups(rng, start, self.weeks, self.rosters, self.leads, self.support, out)

    def enroll(self, mrn, program, referred, admitted, family_contact, transferred_in=False) -> dict:
        """One enrollment record, its counselling sessions, and its place in a group's roster."""
        rng = self.rng
        c = plan_course(rng, self.outcomes.draw(), program, referred, admitted, self.last_day, transferred_in)
        self.enrollments += 1
        eid = f"E{self.enrollments:06d}"
        track = "evening" if rng.random() < TRACK_SHARE["evening"] else "morning"
        iop3 = IOP3_DAYS[0] if rng.random() < 0.75 else IOP3_DAYS[1]
        row = dict(enrollment_id=eid, client_mrn=mrn, program_id=program, referral_source=c["source"],
                   status_history=[{"status": s, "since": d} for s, d in c["statuses"]],
                   level_history=[{"level": lv, "since": d} for lv, d in c["levels"]],
                   admitted_on=c["admitted"], discharged_on=c["discharged"],
                   discharge_reason=c["reason"], diagnoses=diagnoses(rng, program))
        if c["admitted"] is None:  # not admitted yet: no counsellor, team or schedule
            self.out.write("enrollments", **row)
            return c
        n = self.joined[program, track]
        self.joined[program, track] += 1
        group = n % self.groups[program, track]
        staff = self.clinicians[program]
        primary = staff[self.admitted_to[program] % len(staff)]
        self.admitted_to[program] += 1
        third = "case-manager" if program == "PSY-IOP" or rng.random() < 0.5 else "peer-specialist"
        team = [primary, self.support["psychiatrist"][n % len(self.support["psychiatrist"])]]
        if rng.random() < 0.7:
            team.append(self.support[third][n % len(self.support[third])])
        start_t, end_t = TRACKS[track]
        self.out.write("enrollments", **row, primary_counselor=primary, care_team=team,
                       schedule_days=list(IOP6_DAYS if c["levels"][-1][0] == "IOP-6" else iop3),
                       schedule_start=start_t.strftime("%H:%M"), schedule_end=end_t.strftime("%H:%M"),
                       track=track)
        plan = Plan(eid, mrn, c["statuses"], c["levels"], iop3, c["absence"])
        self.rosters[program, track, group].append(plan)
        self.counseling(plan, primary, c["admitted"], c["discharged"] or self.last_day, family_contact)
        return c

    def book(self, counselor: str, kind: str, slots: int, first: date, last: date) -> int:
        """The first of the counsellor's weekly slots free from ``first`` to ``last``."""
        booked = self.bookings.setdefault((counselor, kind), [[] for _ in range(slots)])
        for k, courses in enumerate(booked):
            if all(last < a or b < first for a, b in courses):
                courses.append((first, last))
                return k
        return self.rng.randrange(slots)  # a full caseload: double-booked

    def counseling(self, plan: Plan, counselor: str, first: date, last: date, family_contact: bool):
        """Weekly individual sessions in one of 20 slots (Mon-Fri, 13:00-16:00) and, for clients
        with a family contact, family sessions at 17:00 every other week."""
        rng = self.rng
        k = self.book(counselor, "individual", 20, first, last)
        fk = self.book(counselor, "family", 10, first, last) if family_contact else None
        for week in range(self.weeks):
            d = self.start + timedelta(weeks=week, days=k % 5)
            if plan.active_on(d):
                minutes = weighted(rng, {60: 4, 55: 2, 45: 3, 30: 1})
                self.session(plan, counselor, "individual", d, time(13 + k // 5), minutes)
            if fk is not None and week % 2 == fk // 5:
                d = self.start + timedelta(weeks=week, days=fk % 5)
                if plan.active_on(d):
                    kind = "family-with-client" if rng.random() < 0.8 else "family-without-client"
                    self.session(plan, counselor, kind, d, time(17), rng.choice((50, 60)))

    def session(self, plan: Plan, counselor: str, kind: str, d: date, t: time, minutes: int):
        r, m = self.rng.random(), self.rng.random()
        status = ("no-show" if r < 0.04 + plan.absence / 2 else
                  "cancelled" if r < 0.1 + plan.absence / 2 else "completed")
        modality = "in-person" if m < 0.8 else "telehealth-video" if m < 0.97 else "telehealth-phone"
        self.counseling_sessions += 1
        self.out.write("counseling_sessions", counseling_session_id=f"CS{self.counseling_sessions:07d}",
                       client_mrn=plan.mrn, enrollment_id=plan.enrollment_id, kind=kind, status=status,
                       counselor_id=counselor, start=at(d, t), end=at(d, plus(t, minutes)),
                       modality=modality, location=self.offices[counselor] if modality == "in-person" else None)


def write_client(rng: random.Random, mrn: str, start: date, out: Files) -> tuple[date, bool]:
    """One client; returns the birth date and whether they have a family contact."""
    g = rng.random()
    gender = "male" if g < 0.58 else "female" if g < 0.985 else "other" if g < 0.995 else "unknown"
    names = MALE if gender == "male" else FEMALE if gender == "female" else MALE + FEMALE
    given = [rng.choice(names)] + ([rng.choice(names)] if rng.random() < 0.25 else [])
    family = rng.choice(FAMILY)
    age_days = int(rng.triangular(19, 69, 32) * 365.25)
    birth = start - timedelta(days=min(max(age_days, 19 * 366), 69 * 365 - 1))
    town, zip_code, area = rng.choice(TOWNS)
    housed = rng.random() < 0.96
    contact = rng.random() < 0.65
    out.write("clients", mrn=mrn, family_name=family, given_names=given, birth_date=birth, gender=gender,
              phone=phone(rng, area) if rng.random() < 0.92 else None,
              email=f"{given[0].lower()}.{plain(family)}{rng.randrange(10, 100)}@example."
                    f"{rng.choice(('com', 'net', 'org'))}" if rng.random() < 0.45 else None,
              address_line=f"{rng.randint(1, 2400)} {rng.choice(STREETS)}"
                           + (f", Apt {rng.randint(1, 30)}{rng.choice('ABCD')}" if rng.random() < 0.3 else "")
                           if housed else None,
              city=town if housed else None, state="NJ" if housed else None,
              postal_code=zip_code if housed else None,
              emergency_contact_name=f"{rng.choice(MALE + FEMALE)} "
                                     f"{family if rng.random() < 0.6 else rng.choice(FAMILY)}" if contact else None,
              emergency_contact_phone=phone(rng, area) if contact else None)
    return birth, contact


def write_coverage(rng, i: int, mrn: str, birth: date, referred: date, admitted: date | None, out: Files):
    """Medicaid (enrolled some time last year) or a commercial plan (plan year from January 1, on
    a parent's plan up to age 26); prior authorization from admission for 30, 45 or 60 days."""
    payer_id, payer_name, _, member = rng.choices(PAYERS, weights=[p[2] for p in PAYERS])[0]
    if payer_id == "NJMCD":
        relationship, cov_start = "self", date(referred.year - 1, rng.randint(1, 12), 1)
    else:
        young = (referred - birth).days < 26 * 365
        relationship = weighted(rng, {"self": 40, "child": 60} if young else {"self": 80, "spouse": 20})
        cov_start = date(referred.year, 1, 1)
    pa = dict(prior_auth_number=f"{payer_id[:3]}-{admitted:%y%m}-{rng.randrange(10**5, 10**6)}",
              prior_auth_start=admitted, prior_auth_end=admitted + timedelta(days=rng.choice((29, 44, 59)))) \
        if admitted else {}
    out.write("coverages", coverage_id=f"COV{i + 1:06d}", client_mrn=mrn, payer_id=payer_id,
              payer_name=payer_name, member_id=member(rng), status="active",
              subscriber_relationship=relationship, start=cov_start, **pa)


def write_groups(rng, start: date, weeks: int, rosters: dict, leads: dict, support: dict, out: Files):
    """Every group on every day it has clients, then one attendance row per scheduled client."""
    modalities = Deck(rng, {"in-person": 45, "telehealth-video": 4, "telehealth-phone": 1})
    for day in range(weeks * 7):
        d = start + timedelta(days=day)
        if d.weekday() == 6:
            continue
        weekday, week = DAYS[d.weekday()], day // 7
        snow_day = rng.random() < 0.04  # the whole clinic meets by video
        booked = set()  # (track, support staff) co-facilitating today
        for (program, track, g), roster in rosters.items():
            present = [p for p in roster if p.active_on(d) and weekday in p.days_on(d)]
            if not present:
                continue
            kind = WEEK[program][d.weekday()]
            topics = (PSY_TOPICS if program == "PSY-IOP" else {}).get(kind) or TOPICS[kind]
            facilitators = [leads[program, track, g]]
            if (helper := CO_FACILITATOR.get(kind)) and (kind != "psychoeducation" or weekday == "tue"):
                staff = support[helper]  # the first one free at this hour, if any
                free = [c for c in staff[g % len(staff):] + staff[:g % len(staff)] if (track, c) not in booked]
                if free:
                    facilitators.append(free[0])
                    booked.add((track, free[0]))
            modality = modalities.draw()
            if modality == "in-person" and (snow_day or (weekday == "sat" and track == "evening")):
                modality = "telehealth-video"
            t0, t1 = TRACKS[track]
            sid = f"GS-{program[:3]}-{d:%Y%m%d}-{track[:3].upper()}{g + 1}"
            out.write("group_sessions", session_id=sid, program_id=program,
                      topic=topics[(week + d.weekday()) % len(topics)], kind=kind, facilitators=facilitators,
                      start=at(d, t0), end=at(d, t1), modality=modality,
                      location=f"{program[:3]} Group Room {g + 1}" if modality == "in-person" else None)
            for p in present:
                r = rng.random()
                if r < p.absence:
                    status, minutes = "absent", 0
                elif r < p.absence + 0.03:
                    status, minutes = "excused", 0
                elif r < p.absence + 0.09:
                    status, minutes = "late", 180 - rng.choice((15, 20, 30, 45))
                elif r < p.absence + 0.13:
                    status, minutes = "left-early", rng.choice((60, 90, 120, 150))
                else:
                    status, minutes = "present", 180
                out.write("attendance", session_id=sid, client_mrn=p.mrn, enrollment_id=p.enrollment_id,
                          status=status, minutes_attended=minutes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    ap.add_argument("--clients", type=int, default=25)
    ap.add_argument("--weeks", type=int, default=10)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--start", type=date.fromisoformat, default=date(2026, 1, 5), help="first day (a Monday)")
    ap.add_argument("--format", choices=("csv", "ndjson"), default="csv")
    args = ap.parse_args()
    counts = generate(args.out_dir, args.clients, args.weeks, args.seed, args.start, args.format)
    for stem, n in counts.items():
        print(f"{n:>9,}  {args.out_dir / f'{stem}.{args.format}'}")


if __name__ == "__main__":
    main()
