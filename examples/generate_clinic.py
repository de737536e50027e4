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

Everyone admitted has a treatment plan (problems = the enrollment's diagnoses; interventions by level
of care; two or three goals; reviewed every ~30 days by the primary counsellor; signed by client and
counsellor). The substance-use program adds, per enrollment:

- MAT, prescribed by the psychiatrist: buprenorphine/naloxone film (some inducted a few days after
  admission, the first dose observed in clinic), methadone oral concentrate (observed doses by the
  nurse on program days with take-homes for the days between; after 30 days one observed dose and
  a 6-day take-home a week), extended-release naltrexone (monthly, after 7-14 opioid-free days; also
  for alcohol use), or Sublocade (after at least a week on films, whose order is then stopped).
- An intake drug screen and one random screen a week (point-of-care cup or lab immunoassay; now and
  then an oral-fluid swab), testing the client's MAT analytes beside the usual drugs; a few
  unexpected positives, a few MAT analytes missing, and fentanyl positives confirmed by the lab.
  The MAT-aware ``flag`` is left for fhir-iop to fill in.
- A relapse-prevention plan a few weeks in, and an aftercare plan for clients who complete.
- Part 2 consents signed at intake: to the client's primary-care EHR (most clients) and to the
  payer (clients with coverage); one EHR consent in 40 (the run's third first) is revoked.

These draw from a random stream of their own, so the other files are as without them.

The files are an extract of ``weeks`` weeks from ``start``: about a third of the clients were
admitted before ``start`` and are mid-course; the last referrals are still waiting for admission;
nothing after the last day is known yet. Sessions, doses and screens before ``start`` are not in
the extract (orders, plans and consents written earlier are, as current records).
Datetimes carry the site's UTC offset (-05:00, or -04:00 once daylight saving time starts).

Referrals and outside medications (records that come from referring providers' EHRs) draw from a
random stream of their own too: a referral for each client sent by a referrer (primary care, a
hospital or emergency department, a residential or partial-hospitalization program, a court, an
employer), none for self and family referrals; a stopped outside oral naltrexone for some
substance-use clients and an active outside buprenorphine/naloxone for some psychiatric clients who
also use opioids. ``examples/clinic/`` keeps its hand-written ``referrals.csv`` and
``outside_medications.csv`` (the tests name those records).

Records are written as they are made (CSV through ``csv.writer``, or NDJSON through orjson): memory
holds one small plan per enrollment (the group rosters), never sessions, attendance, doses, screens
or plans.
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

#: who writes the referral, by referral source: (practitioner or None, organization); self and family
#: referrals, and the clinic's own transfers, come without one. Names are the example's own.
REFERRERS = {
    "primary-care": [("Dana Whitfield MD", "Shore Family Medicine"), ("Priya Raman DO", "Riverside Primary Care"),
                     ("Marcus Oyelaran MD", "Bayshore Family Health Center")],
    "hospital": [("Helen Kowalczyk MD", "Jersey Shore University Medical Center"),
                 (None, "Monmouth Medical Center Behavioral Health")],
    "emergency-department": [(None, "Jersey Shore Medical Center Emergency Department"),
                             ("Omar Haddad MD", "Riverview Medical Center Emergency Department")],
    "residential-step-down": [(None, "Seabrook Residential Treatment"), (None, "Pine Ridge Recovery Residence")],
    "php-step-down": [(None, "Oceanview Partial Hospitalization Program"),
                      ("Lena Brooks LCSW", "Coastal Behavioral Health PHP")],
    "court": [(None, "Monmouth County Drug Court"), (None, "Ocean County Probation")],
    "employer": [(None, "Shore Employee Assistance Program")],
    "other": [(None, "Monmouth County Department of Human Services")],
}
#: a referral's reason in words, by ICD-10-CM category (as the referrer would write it)
REASON_TEXT = {"F11": "opioid use", "F10": "alcohol use", "F19": "polysubstance use",
               "F99": "worsening depression and anxiety"}
#: outside medications (another provider prescribed them; RxNorm codes from shared/reference/domain-codes.md):
#: (medication as written, RxNorm, dosage)
OUTSIDE_NALTREXONE = ("naltrexone hydrochloride 50 MG Oral Tablet", "1483744", "50 mg by mouth once a day")
OUTSIDE_BUP_NAL = ("buprenorphine 8 MG / naloxone 2 MG Sublingual Tablet", "351267", "1 tablet sublingual once a day")

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

    def __init__(self, rng: random.Random, cards: dict, early: tuple = (), within: int = 4):
        self.rng, self.cards, self.hand = rng, [c for c, n in cards.items() for _ in range(n)], []
        self.early, self.within = early, within  # cards dealt within the first draws of the first round

    def draw(self):
        if not self.hand:
            self.hand = self.cards[:]
            self.rng.shuffle(self.hand)
            hand = self.hand
            window = list(range(max(0, len(hand) - self.within), len(hand)))  # the next draws (popped last first)
            for card in self.early:
                inside = [i for i in window if hand[i] == card]
                if inside:  # already among the next draws
                    window.remove(inside[0])
                elif window and card in hand[:len(hand) - self.within]:  # swap one from further down in
                    top = window.pop(self.rng.randrange(len(window)))
                    k = hand.index(card)
                    hand[k], hand[top] = hand[top], hand[k]
            self.early = ()
        return self.hand.pop()

    def put_back(self, card) -> None:
        """Return a card that did not fit this draw: it comes up again next."""
        self.hand.append(card)


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
            sink(orjson.dumps({f: _json(row[f]) for f in fields if row.get(f) not in (None, [])},
                              option=orjson.OPT_APPEND_NEWLINE))
        self.counts[stem] += 1

    def close(self) -> None:
        for f in self.streams:
            f.close()


def _cell(v) -> str:
    """A CSV cell: lists `|`-separated, histories `status@date;status@date` (parts in model field
    order, an empty optional part left empty: `fentanyl@detected@1@@`), booleans true/false."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        if v and isinstance(v[0], dict):
            return ";".join("@".join(_cell(x) for x in e.values()) for e in v)
        return "|".join(v)
    return str(v)


def _json(v):
    """An NDJSON value: parts without their empty optional values."""
    if isinstance(v, list) and v and isinstance(v[0], dict):
        return [{k: x for k, x in e.items() if x is not None} for e in v]
    return v


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
    """Write the clinic's record files (one per record type) to ``out_dir``; return the record count
    per file stem."""
    if fmt not in ("csv", "ndjson"):
        raise ValueError(f"format {fmt!r}: use csv or ndjson")
    if start.weekday() != 0:
        raise ValueError(f"start {start} is not a Monday")
    out = Files(Path(out_dir), fmt)
    try:
        Clinic(random.Random(seed), out, clients, weeks, start, random.Random(f"{seed}/care"),
               random.Random(f"{seed}/referrals")).run()
    finally:
        out.close()
    return dict(out.counts)


class Clinic:
    def __init__(self, rng: random.Random, out: Files, clients: int, weeks: int, start: date,
                 care_rng: random.Random, referral_rng: random.Random | None = None):
        self.rng, self.out, self.clients, self.weeks, self.start = rng, out, clients, weeks, start
        self.last_day = start + timedelta(weeks=weeks, days=-1)
        self.care_rng = care_rng
        self.referral_rng = referral_rng or random.Random("referrals")
        self.referrals = self.outside_medications = 0
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
        self.care = Care(self.care_rng, out, start, last_day, self.support["peer-specialist"])
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
            payer = write_coverage(rng, i, mrn, birth, referred, admitted if admitted <= last_day else None, out) \
                if rng.random() < 0.92 else None
            c = self.enroll(mrn, program, referred, admitted, family_contact, payer)
            if c["reason"] == "transferred":  # moved to the clinic's other program
                other = next(p for p in PROGRAMS if p != program)
                self.enroll(mrn, other, c["discharged"], weekday_on_or_after(c["discharged"] + ONE_DAY),
                            family_contact, payer, transferred_in=True)
        write_groups(rng, start, self.weeks, self.rosters, self.leads, self.support, out)

    def enroll(self, mrn, program, referred, admitted, family_contact, payer, transferred_in=False) -> dict:
        """One enrollment record, its counselling sessions, its place in a group's roster, and its
        clinical records (MAT, drug screens, care plans, consents)."""
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
        if not transferred_in:
            self.referred(mrn, program, referred, c, row["diagnoses"])
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
        nurse = self.support["nurse"][n % len(self.support["nurse"])]
        self.care.enrollment(eid, mrn, program, c, row["diagnoses"], primary, team, plan, track, family_contact,
                             nurse, payer)
        return c

    def referred(self, mrn: str, program: str, referred: date, c: dict, dx: list[str]) -> None:
        """The referral that brought the client (from a referrer with an EHR: not self, family or the
        clinic's own transfer) and the medications another provider had prescribed: a stopped oral
        naltrexone for some clients with alcohol or opioid use, an active buprenorphine/naloxone from
        primary care for some psychiatric clients who also use opioids. Its own random stream."""
        rng = self.referral_rng
        who = REFERRERS.get(c["source"])
        practitioner = None
        if who:
            practitioner, organization = rng.choice(who)
            self.referrals += 1
            reason = REASON_TEXT.get(dx[0][:3], "substance use")
            self.out.write("referrals", referral_id=f"R{self.referrals:06d}", client_mrn=mrn,
                           status="completed" if c["admitted"] is not None else "active", requested_on=referred,
                           program_id=program, level=c["levels"][0][0], referring_practitioner=practitioner,
                           referring_organization=organization, reason_icd10cm=dx[:1], reason_text=reason,
                           note=rng.choice((None, None, "Please call to schedule intake.",
                                            "Client agrees to IOP; family supportive.")))
        prescribes = c["source"] in ("primary-care", "hospital") and practitioner  # (a court prescribes nothing)
        prescriber = f"{practitioner} ({organization})" if prescribes else None
        if program == "SUD-IOP" and dx[0][:3] in ("F10", "F11") and rng.random() < 0.15:
            medication, rxnorm, dosage = OUTSIDE_NALTREXONE
            began = referred - timedelta(days=rng.randint(60, 180))
            self.outside(mrn, medication, rxnorm, "stopped", began, referred - timedelta(days=rng.randint(7, 45)),
                         dosage, prescriber, referred)
        elif program == "PSY-IOP" and any(d[:3] == "F11" for d in dx) and rng.random() < 0.5:
            medication, rxnorm, dosage = OUTSIDE_BUP_NAL
            pcp, practice = rng.choice(REFERRERS["primary-care"])  # office-based buprenorphine from primary care
            self.outside(mrn, medication, rxnorm, "active", referred - timedelta(days=rng.randint(30, 400)), None,
                         dosage, f"{pcp} ({practice})", referred)

    def outside(self, mrn, medication, rxnorm, status, began, ended, dosage, prescriber, recorded) -> None:
        self.outside_medications += 1
        self.out.write("outside_medications", outside_medication_id=f"OM{self.outside_medications:06d}",
                       client_mrn=mrn, medication=medication, rxnorm=rxnorm, status=status, start=began, end=ended,
                       dosage=dosage, prescriber=prescriber, recorded_on=recorded)

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


# -- substance-use care: MAT, drug screens, care plans, consents ------------------------------------

NALTREXONE = ("naltrexone-xr-inj-380", 380, "intramuscular", "mo")
MAT = {  # kind -> (drug, dose in mg, route, frequency unit)
    "bup-film": ("bup-nx-film-8-2", None, "sublingual", "d"),
    "methadone": ("methadone-oral-conc-10", None, "oral", "d"),
    "naltrexone": NALTREXONE,
    "sublocade": ("bup-xr-inj-300", 300, "subcutaneous", "mo"),
}
MAT_ANALYTES = {"bup-nx-film-8-2": ("buprenorphine", "norbuprenorphine"),  # mat-drug-to-analyte
                "bup-xr-inj-300": ("buprenorphine", "norbuprenorphine"),
                "bup-xr-inj-100": ("buprenorphine", "norbuprenorphine"),
                "methadone-oral-conc-10": ("methadone", "eddp")}
SCREEN = ("opiates", "fentanyl", "cocaine", "amphetamines", "cannabinoids", "benzodiazepines")
UDS5 = ("amphetamines", "cocaine", "cannabinoids", "opiates", "pcp")
ORAL_FLUID = ("opiates", "fentanyl", "cocaine", "amphetamines", "cannabinoids", "benzodiazepines",
              "buprenorphine", "methadone")  # parent drugs: no metabolites in oral fluid
CUTOFFS = {  # ng/mL
    "point-of-care": dict(opiates=300, fentanyl=1, cocaine=150, amphetamines=500, cannabinoids=50,
                          benzodiazepines=300, buprenorphine=10, norbuprenorphine=10, methadone=300,
                          eddp=300, pcp=25),
    "lab-immunoassay": dict(opiates=300, fentanyl=1, cocaine=150, amphetamines=500, cannabinoids=20,
                            benzodiazepines=200, buprenorphine=5, norbuprenorphine=5, methadone=150,
                            eddp=100, pcp=25, etg=500),
    "oral-fluid": dict(opiates=40, fentanyl=1, cocaine=20, amphetamines=50, cannabinoids=4,
                       benzodiazepines=10, buprenorphine=5, methadone=20),
}
LAB = "Garden State Toxicology Laboratory"

EHR_RECIPIENTS = (("RIVERSIDE-PC", "Riverside Primary Care", npi("147258036")),
                  ("BAYSHORE-FHC", "Bayshore Family Health Center", npi("163074185")),
                  ("MONMOUTH-IM", "Monmouth Internal Medicine Associates", npi("129384756")))

GOALS = {  # (description, target)
    "F11": ("Stop using opioids and fentanyl", "negative opioid and fentanyl screens for 8 weeks in a row"),
    "F10": ("Stop drinking", "no alcohol for 60 days, by self-report and EtG screens"),
    "F19": ("Stop using cocaine and other drugs", "negative screens for 8 weeks in a row"),
    "daily": ("Take my medication every day as prescribed", "every screen positive for my medication"),
    "monthly": ("Get my injection every month", "no missed or late injections"),
    "F99": ("Feel less depressed and more like myself", "PHQ-9 below 10"),
}
SUD_GOALS = (("Come to my groups", "attend at least 90% of scheduled groups"),
             ("Build a sober support network", "a home group and a sponsor; three meetings a week"),
             ("Handle cravings without using", "use a coping skill from my plan when cravings hit"),
             ("Get back to work", "back at work part-time"),
             ("Repair things with my family", "a sober family activity every week"))
PSY_GOALS = (("Use coping skills instead of isolating when I am overwhelmed", "skills diary 5 days a week"),
             ("Keep a steady sleep routine", "7 hours a night, 5 nights a week"),
             ("Manage panic and worry", "GAD-7 below 10"),
             ("Stay out of the hospital", "no emergency visits or admissions during the program"),
             ("Come to my groups", "attend at least 90% of scheduled groups"))
TRIGGERS = ("Payday", "Arguments with my partner", "Driving past my old neighborhood", "Being alone on weekends",
            "Stress at work", "Chronic back pain", "Running into people I used with", "Boredom in the evenings",
            "Holidays and family gatherings", "Not sleeping", "Feeling left out", "Watching the game at a bar")
WARNING_SIGNS = ("Skipping groups or meetings", "Isolating from family", "Romanticizing past use",
                 "Staying up all night", "Snapping at people", "Thinking I can use just once",
                 "Lying about small things", "Keeping cash on me", "Stopping my medication")
COPING = ("Call my sponsor", "Go to a meeting", "Play the tape forward", "Urge surfing for 20 minutes",
          "Walk or go to the gym", "Text the group chat", "HALT check: hungry, angry, lonely, tired?",
          "Leave the situation", "Pray or meditate for ten minutes", "Write in my journal")
CONTACTS = {"Sponsor": MALE + FEMALE, "Sister": FEMALE, "Brother": MALE, "Mom": FEMALE, "Dad": MALE,
            "Friend from NA": MALE + FEMALE, "Friend from AA": MALE + FEMALE, "Cousin": MALE + FEMALE,
            "Home group member": MALE + FEMALE, "Partner": MALE + FEMALE}
OUTPATIENT = ("Weekly outpatient therapy at Harbor Light OP", "Weekly outpatient therapy at Harbor Light OP",
              "Biweekly therapy with an outpatient counselor near home")
MUTUAL_HELP = ("SMART Recovery Tuesdays", "AA home group Thursday nights at St. Mark's",
               "NA Sunday evening meeting in Asbury Park", "Celebrate Recovery Fridays in Freehold")
AFTERCARE_MORE = ("Harbor Light alumni group, first Wednesday of the month",
                  "Weekly check-in with a peer recovery coach", "Monthly psychiatric follow-up at Harbor Light",
                  "Vocational rehabilitation intake at the county office")
MAT_AFTERCARE = {"bup-film": "Buprenorphine continued by Riverside Primary Care",
                 "methadone": "Methadone dosing continued at the Shore Opioid Treatment Program",
                 "naltrexone": "Monthly Vivitrol injection at Riverside Primary Care",
                 "sublocade": "Monthly Sublocade injection at Riverside Primary Care"}


def num(x: float):
    """A number as written: 48 rather than 48.0."""
    return int(x) if float(x).is_integer() else round(x, 2)


@dataclass(slots=True)
class Order:
    mat_id: str
    drug: str
    dose: float
    route: str
    unit: str
    start: date
    end: date | None  # None: open (still running on the extract's last day)

    def covers(self, d: date) -> bool:
        return self.start <= d and (self.end is None or d <= self.end)


class Care:
    """The substance-use program's clinical records for one enrollment at a time: MAT orders with their
    in-clinic doses and take-home supplies, weekly random drug screens, care plans with goals, and Part 2
    consents. Draws from its own random stream, so the other record files stay as they were."""

    def __init__(self, rng: random.Random, out: Files, start: date, last_day: date, peers=()):
        self.rng, self.out, self.start, self.last_day, self.peers = rng, out, start, last_day, set(peers)
        self.n = dict.fromkeys(("mat", "adm", "disp", "screen", "plan", "consent", "acc"), 0)
        self.oud = Deck(rng, {"bup-film": 4, "methadone": 3, "naltrexone": 1, "sublocade": 1, "none": 2},
                        early=("sublocade", "methadone", "methadone", "naltrexone", "bup-film", "bup-film"), within=8)
        self.aud = Deck(rng, {"naltrexone": 1, "none": 3})
        self.bup_late = Deck(rng, {"at admission": 2, "induction": 1})  # bup started in the program
        self.positive = Deck(rng, {"positive": 1, "negative": 17}, early=("positive",), within=12)
        self.drug = Deck(rng, {"fentanyl": 1, "cocaine": 2, "cannabinoids": 2}, early=("fentanyl",))
        self.missing = Deck(rng, {"absent": 1, "present": 17})  # MAT expected but not detected
        self.oral = Deck(rng, {"oral-fluid": 1, "urine": 79}, early=("oral-fluid",), within=30)
        self.ehr = Deck(rng, {"consent": 4, "none": 1})
        self.ehr_consents = 0
        self.revoke_pending = False  # one EHR consent in 40 (the third of the run first) is revoked

    def next_id(self, kind: str, prefix: str, width: int = 6) -> str:
        self.n[kind] += 1
        return f"{prefix}{self.n[kind]:0{width}d}"

    def enrollment(self, eid: str, mrn: str, program: str, c: dict, dx: list, primary: str, team: list,
                   plan: Plan, track: str, family_contact: bool, nurse: str, payer: tuple | None) -> None:
        admitted, until = c["admitted"], c["discharged"] or self.last_day
        sud = program == "SUD-IOP"
        orders, kind = self.mat(eid, mrn, c, dx, team[1], plan, nurse) if sud else ([], None)
        if sud:
            self.screens(eid, mrn, dx, plan, track, admitted, until, orders)
        self.care_plans(eid, mrn, program, c, dx, primary, plan, family_contact, team, kind)
        if sud:
            self.consents(mrn, program, admitted, until, payer)

    # -- MAT ---------------------------------------------------------------------------------------

    def mat(self, eid, mrn, c, dx, prescriber, plan: Plan, nurse) -> tuple[list[Order], str | None]:
        """Decide the client's MAT and write its orders, doses and take-home supplies."""
        rng = self.rng
        admitted, discharged = c["admitted"], c["discharged"]
        until = discharged or self.last_day
        if any(d.startswith("F11") for d in dx):
            kind = self.oud.draw()
        elif any(d.startswith("F10") for d in dx):
            kind = self.aud.draw()
        else:
            return [], None
        if kind == "none":
            return [], None
        first = admitted
        if kind == "naltrexone":  # after 7-14 days opioid-free (alcohol: once withdrawal is over)
            first = admitted + timedelta(days=rng.randint(7, 14) if dx[0].startswith("F11") else rng.randint(2, 6))
        elif kind == "bup-film" and self.bup_late.draw() == "induction":
            first = admitted + timedelta(days=rng.randint(2, 10))
        switch = admitted + timedelta(days=rng.randint(8, 14)) if kind == "sublocade" else None
        if kind == "sublocade" and switch + timedelta(days=7) > until:
            self.oud.put_back(kind)  # too short a stay to see the switch: the next client gets it
            kind, switch = "bup-film", None
        first = weekday_on_or_after(first)
        if first > until:  # starts after discharge or after the extract: not known here
            return [], None
        ended = "stopped" if c["reason"] in ("left-against-advice", "non-attendance") else "completed"
        on_hold = discharged is None and _current(plan.statuses, self.last_day) == "on-hold"

        def order(drug, dose, route, unit, start, end=None, status=None) -> Order:
            mat_id = self.next_id("mat", "MAT")
            if end is None and discharged:
                end, status = discharged, ended
            status = status or ("on-hold" if on_hold else "active")
            self.out.write("mat_medications", mat_id=mat_id, client_mrn=mrn, enrollment_id=eid, drug=drug,
                           dose=num(dose), dose_unit="mg", route=route, frequency_count=1, frequency_period=1,
                           frequency_unit=unit, prescriber_id=prescriber, start=start, end=end, status=status)
            return Order(mat_id, drug, dose, route, unit, start, end)

        orders = []
        if kind in ("bup-film", "sublocade"):
            dose = weighted(rng, {16: 5, 8: 2, 12: 1, 24: 1})
            if switch:  # seven days or more on films first, then the monthly injection
                switch = weekday_on_or_after(switch)
                orders.append(order("bup-nx-film-8-2", dose, "sublingual", "d", first,
                                    switch - ONE_DAY, "stopped"))
            else:
                orders.append(order("bup-nx-film-8-2", dose, "sublingual", "d", first))
                if first > admitted and first >= self.start and plan.active_on(first):  # induction, observed
                    self.administer(orders[0], mrn, first, time(10, rng.randrange(0, 60, 5)), 8, nurse)
        if kind == "sublocade":
            third = switch + timedelta(days=56)  # 300 mg for two months, then 100 mg maintenance
            if third <= until:
                orders.append(order("bup-xr-inj-300", 300, "subcutaneous", "mo", switch, third - ONE_DAY,
                                    "completed"))
                orders.append(order("bup-xr-inj-100", 100, "subcutaneous", "mo", third))
            else:
                orders.append(order("bup-xr-inj-300", 300, "subcutaneous", "mo", switch))
            for o in orders[1:]:
                self.injections(o, mrn, plan, nurse)
        elif kind == "naltrexone":
            stop = first + timedelta(days=28)  # some decline the second injection
            if rng.random() < 0.25 and stop < until:
                orders.append(order("naltrexone-xr-inj-380", 380, "intramuscular", "mo", first, stop, "stopped"))
            else:
                orders.append(order("naltrexone-xr-inj-380", 380, "intramuscular", "mo", first))
            self.injections(orders[0], mrn, plan, nurse)
        elif kind == "methadone":
            dose = rng.randrange(60, 125, 5)
            orders.append(order("methadone-oral-conc-10", dose, "oral", "d", first))
            self.methadone(orders[0], mrn, plan, nurse)
        return orders, kind

    def administer(self, o: Order, mrn: str, d: date, t: time, dose: float, nurse: str, status="completed"):
        self.out.write("mat_administrations", administration_id=self.next_id("adm", "MA", 7), mat_id=o.mat_id,
                       client_mrn=mrn, administered_at=at(d, t), dose=num(dose), dose_unit="mg", route=o.route,
                       status=status, performer_id=nurse)

    def injections(self, o: Order, mrn: str, plan: Plan, nurse: str):
        """Monthly injections (every 28 days) while the order runs, in the extract, on days in care."""
        d = o.start
        while d <= min(o.end or self.last_day, self.last_day):
            if d >= self.start and plan.active_on(d):
                self.administer(o, mrn, d, time(self.rng.randint(10, 15), self.rng.randrange(0, 60, 5)),
                                o.dose, nurse)
            d = weekday_on_or_after(d + timedelta(days=28))

    def methadone(self, o: Order, mrn: str, plan: Plan, nurse: str):
        """Observed dosing in clinic on program days, with take-homes for the days in between; after 30
        days on methadone (earned take-home privileges) one observed dose a week and 6 days to take home."""
        rng = self.rng
        mL = o.dose / 10  # 10 mg/mL oral concentrate
        d = max(o.start, self.start)
        while d <= (o.end or self.last_day):
            days = plan.days_on(d)
            weekday = DAYS[d.weekday()]
            if weekday in days and plan.active_on(d):
                privileged = (d - o.start).days >= 30
                if not privileged or weekday == days[0]:
                    t = time(rng.randint(6, 8), rng.randrange(0, 60, 5))  # before work and morning groups
                    missed = not privileged and rng.random() < 0.03
                    self.administer(o, mrn, d, t, o.dose, nurse, "not-done" if missed else "completed")
                    later = [k for k in range(1, 8) if DAYS[(d.weekday() + k) % 7] in days]
                    supply = 6 if privileged else later[0] - 1
                    if supply and not missed and d != o.end:
                        self.out.write("mat_dispenses", dispense_id=self.next_id("disp", "MD", 7), mat_id=o.mat_id,
                                       client_mrn=mrn, dispensed_at=at(d, plus(t, 5)), quantity=num(mL * supply),
                                       quantity_unit="mL", days_supply=supply, status="completed",
                                       performer_id=nurse)
            d += ONE_DAY

    # -- drug screens ------------------------------------------------------------------------------

    def screens(self, eid, mrn, dx, plan: Plan, track: str, admitted: date, until: date, orders: list[Order]):
        """An intake screen on admission, then one random screen a week while in care."""
        rng = self.rng
        mat = list(dict.fromkeys(a for o in orders for a in MAT_ANALYTES.get(o.drug, ())))
        alcohol = any(d.startswith("F10") for d in dx)
        week0 = monday_on_or_after(max(admitted, self.start) - timedelta(days=6))
        for week in range((until - week0).days // 7 + 1):
            monday = week0 + timedelta(weeks=week)
            days = [monday + timedelta(days=k) for k in range(6)]
            days = [d for d in days if max(admitted, self.start) <= d <= until and plan.active_on(d)]
            if not days:
                continue
            d = admitted if admitted in days else rng.choice(days)
            if d == admitted:
                t = time(10, rng.randrange(0, 60, 5))  # at intake
            elif track == "morning":
                t = time(12, rng.randrange(5, 50, 5))  # called in after group
            else:
                t = time(17, rng.randrange(10, 55, 5))  # called in before group
            self.screen(eid, mrn, d, t, mat, alcohol, orders)

    def screen(self, eid, mrn, d: date, t: time, mat: list, alcohol: bool, orders: list[Order]):
        rng = self.rng
        oral = self.oral.draw() == "oral-fluid"
        if oral:
            specimen, method, panel = "oral-fluid", "point-of-care", "oral-fluid-screen"
            analytes = [a for a in ORAL_FLUID if a in SCREEN or a in mat]
        else:
            specimen = "urine"
            lab = d < self.last_day - ONE_DAY and rng.random() < 0.35  # results come back in a day or two
            method = "lab-immunoassay" if lab else "point-of-care"
            panel = "uds-5" if lab and not mat and rng.random() < 0.4 else "uds-screen"
            analytes = list(UDS5) if panel == "uds-5" else list(SCREEN) + mat
            if lab and alcohol and panel == "uds-screen":
                analytes.append("etg")
        on = {a for o in orders if o.covers(d) for a in MAT_ANALYTES.get(o.drug, ())}
        absent = bool(on & set(analytes)) and self.missing.draw() == "absent"
        used = set()
        if self.positive.draw() == "positive":
            drug = self.drug.draw()
            used.add(drug if drug in analytes else "cocaine")
        if "buprenorphine" in mat and not on and rng.random() < 0.3:
            used |= {"buprenorphine", "norbuprenorphine"}  # before induction: street buprenorphine
        cutoffs = CUTOFFS["oral-fluid" if oral else method]
        results = [dict(analyte=a, result="detected" if (a in on and not absent) or a in used else "not-detected",
                        cutoff=cutoffs.get(a), measured=None, flag=None) for a in analytes]
        collected = at(d, t)
        if method == "point-of-care":
            resulted, lab_name, accession = at(d, plus(t, rng.randint(5, 15))), None, None
        else:
            resulted = at(d + ONE_DAY, time(rng.randint(7, 13), rng.randrange(0, 60, 5)))
            lab_name, accession = LAB, self.accession(d)
        observed = oral or rng.random() < 0.3
        sid = self.next_id("screen", "DS")
        self.out.write("drug_screens", screen_id=sid, client_mrn=mrn, enrollment_id=eid, specimen=specimen,
                       collected_at=collected, observed=observed, method=method, panel=panel, results=results,
                       status="final", resulted_at=resulted, performing_lab=lab_name, accession_number=accession)
        if "fentanyl" in used and not oral and d + timedelta(days=3) <= self.last_day:  # sent for confirmation
            fent, norfent = round(rng.uniform(2, 40), 1), round(rng.uniform(10, 150), 1)
            self.out.write("drug_screens", screen_id=self.next_id("screen", "DS"), client_mrn=mrn, enrollment_id=eid,
                           specimen=specimen, collected_at=collected, observed=observed, method="confirmation",
                           panel="fentanyl",
                           results=[dict(analyte="fentanyl", result="detected", cutoff=0.5, measured=fent, flag=None),
                                    dict(analyte="norfentanyl", result="detected", cutoff=1, measured=norfent,
                                         flag=None)],
                           status="final", resulted_at=at(d + timedelta(days=3), time(11, 40)),
                           performing_lab=LAB, accession_number=self.accession(d))

    def accession(self, d: date) -> str:
        return f"GS{d:%y%m%d}-{self.next_id('acc', '', 5)}"

    # -- care plans ----------------------------------------------------------------------------------

    def care_plans(self, eid, mrn, program, c, dx, primary, plan: Plan, family_contact, team, mat_kind):
        """A treatment plan for everyone; for the SUD program a relapse-prevention plan once written,
        and an aftercare plan for clients who completed treatment."""
        rng = self.rng
        admitted, discharged, reason = c["admitted"], c["discharged"], c["reason"]
        until = discharged or self.last_day
        sud = program == "SUD-IOP"
        if discharged is None:
            status, goal_status = "active", "on-hold" if _current(plan.statuses, until) == "on-hold" else "active"
        elif reason in ("left-against-advice", "non-attendance"):
            status, goal_status = "revoked", "cancelled"
        else:
            status = "completed"
            goal_status = "completed" if reason in ("treatment-completed", "stepped-down") else "cancelled"
        created = weekday_on_or_after(admitted + timedelta(days=rng.randint(0, 3)))
        created = created if created <= until else admitted
        level = _current(plan.levels, created)
        interventions = [("group-therapy", 6 if level == "IOP-6" else 3, 1, "wk"),
                         ("individual-counseling", 1, 1, "wk")]
        if family_contact:
            interventions.append(("family-counseling", 1, 2, "wk"))
        if sud:
            interventions.append(("drug-screen", 1, 1, "wk"))
        if mat_kind:
            interventions.append(("mat", 1, 1, MAT[mat_kind][3]))
        if sud and len(team) > 2:
            interventions.append(("peer-support" if team[2] in self.peers else "case-management", 1, 1, "wk"))
        if not sud:
            interventions.append(("psychiatric-follow-up", 1, 1, "mo"))
        first = GOALS.get(dx[0][:3]) or GOALS["F19"]
        goals = [first]
        if mat_kind:
            goals.append(GOALS["daily" if MAT[mat_kind][3] == "d" else "monthly"])
        pool = SUD_GOALS if sud else PSY_GOALS
        goals += rng.sample(pool, rng.randint(2, 3) - len(goals)) if len(goals) < 3 else []
        reviews, r = [], created + timedelta(days=30)
        while (r := weekday_on_or_after(r + timedelta(days=rng.randint(-2, 2)))) <= until:
            reviews.append(r)
            r += timedelta(days=30)
        self.plan(eid, mrn, "treatment", "Individualized treatment plan", status, created, created, discharged,
                  primary, dx, goals, goal_status, interventions, reviews)
        if not sud:
            return
        written = weekday_on_or_after(admitted + timedelta(days=rng.randint(12, 21)))
        if written <= until:  # worked out in individual sessions in the first weeks
            ends = discharged if discharged and reason not in ("treatment-completed", "stepped-down") else None
            self.plan(eid, mrn, "relapse-prevention", "Relapse-prevention plan",
                      "completed" if ends else "active", written, written, ends, primary, dx, [], None,
                      [("mutual-help", 3, 1, "wk")], [],
                      triggers=rng.sample(TRIGGERS, 3), warning_signs=rng.sample(WARNING_SIGNS, 3),
                      coping_strategies=rng.sample(COPING, rng.randint(3, 4)),
                      support_contacts=[f"{who} {rng.choice(CONTACTS[who])} 732-555-01{rng.randrange(100):02d}"
                                        for who in rng.sample(list(CONTACTS), 2)]
                      + ["Harbor Light front desk 732-555-0100"])
        if reason == "treatment-completed":
            written = max(admitted, weekday_on_or_after(discharged - timedelta(days=rng.randint(4, 7))))
            steps = [rng.choice(OUTPATIENT), rng.choice(MUTUAL_HELP)]
            steps += ["Sober living at Oak House"] if rng.random() < 0.35 else []
            steps += rng.sample(AFTERCARE_MORE, rng.randint(0, 2))
            if mat_kind:
                steps.insert(0, MAT_AFTERCARE[mat_kind])
            aftercare = [("outpatient-therapy", 1, 1, "wk"), ("mutual-help", 3, 1, "wk")]
            if mat_kind:
                aftercare.append(("mat", 1, 1, MAT[mat_kind][3]))
            self.plan(eid, mrn, "aftercare", "Aftercare plan", "active", written, discharged, None, primary, dx,
                      [("Stay connected to recovery after the program",
                        "weekly outpatient therapy and three meetings a week for 90 days")], "active",
                      aftercare, [], aftercare_steps=steps, due=discharged + timedelta(days=90))

    def plan(self, eid, mrn, kind, title, status, created, start, end, author, problems, goals, goal_status,
             interventions, reviews, due=None, **lists):
        pid = self.next_id("plan", "CP")
        goal_ids = [f"{pid}-G{k}" for k in range(1, len(goals) + 1)]
        signed = min(created + timedelta(days=self.rng.choice((0, 0, 0, 1))), end or self.last_day, self.last_day)
        self.out.write("care_plans", plan_id=pid, client_mrn=mrn, enrollment_id=eid, kind=kind, title=title,
                       status=status, created_on=created, start=start, end=end, author_id=author,
                       problems=list(problems), goal_ids=goal_ids,
                       interventions=[dict(activity=a, count=n, period=p, unit=u) for a, n, p, u in interventions],
                       reviews=[dict(reviewed_on=r, reviewer_id=author) for r in reviews],
                       signatures=[dict(signer="client", signed_on=signed),
                                   dict(signer="counselor", signed_on=created)],
                       **lists)
        for gid, (description, target) in zip(goal_ids, goals):
            self.out.write("care_plan_goals", goal_id=gid, plan_id=pid, client_mrn=mrn, description=description,
                           target=target, start=start,
                           due=due or start + timedelta(weeks=self.rng.choice((4, 6, 8, 12))), status=goal_status)

    # -- consents -----------------------------------------------------------------------------------

    def consents(self, mrn, program, admitted, until, payer):
        """Part 2 consents signed at intake: to the client's primary care EHR (most clients) and to the
        payer (clients with coverage); valid a year unless revoked."""
        rng = self.rng
        if self.ehr.draw() == "consent":
            self.ehr_consents += 1
            if self.ehr_consents % 40 == 3:
                self.revoke_pending = True
            rid, name, recipient_npi = rng.choice(EHR_RECIPIENTS)
            signed = admitted
            revoked = None
            if self.revoke_pending and (until - signed).days >= 14:
                revoked = weekday_on_or_after(signed + timedelta(days=rng.randint(7, (until - signed).days)))
                revoked = revoked if revoked <= until else None
                self.revoke_pending = revoked is None
            self.consent(mrn, program, rid, name, "ehr", recipient_npi, ["TREAT", "COC"],
                         ["enrollment", "encounters", "drug-screens", "medications", "care-plans"], signed, revoked)
        if payer:
            self.consent(mrn, program, payer[0], payer[1], "payer", None, ["HPAYMT"],
                         ["demographics", "enrollment", "encounters", "coverage"], admitted, None)

    def consent(self, mrn, program, rid, name, kind, recipient_npi, purposes, classes, signed, revoked):
        self.out.write("consents", consent_id=self.next_id("consent", "CNS"), client_mrn=mrn, program_id=program,
                       recipient_id=rid, recipient_name=name, recipient_kind=kind, recipient_npi=recipient_npi,
                       purposes=purposes, data_classes=classes, signed_on=signed, start=signed,
                       end=signed + timedelta(days=365), revoked_on=revoked)


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


def write_coverage(rng, i: int, mrn: str, birth: date, referred: date, admitted: date | None,
                   out: Files) -> tuple[str, str]:
    """Medicaid (enrolled some time last year) or a commercial plan (plan year from January 1, on
    a parent's plan up to age 26); prior authorization from admission for 30, 45 or 60 days.
    Returns the payer's id and name."""
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
    return payer_id, payer_name


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
