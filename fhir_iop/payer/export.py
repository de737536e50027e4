"""The payment disclosure to one payer for one period: the rollup, 42 CFR Part 2 consent, Claims, and the
resources the Claims point to.

Part 2 (in a Part 2 program, site.json ``part2_program``): a service day is disclosed only when one of
the client's consents covers it (``mapping.consent.covers``) for this payer (``recipient_id`` = the
coverage's ``payer_id``), purpose HPAYMT, and each data class in :data:`DATA_CLASSES`. A client none
of whose days is covered is absent from everything the export returns: the Claims, the resources,
the short-day report and every count (:class:`Export` is built from the disclosed days only). What
is disclosed carries the Part 2 labels, NORDSCLCD (the redisclosure prohibition) among them.

Reading from the FHIR store instead of record files: :mod:`fhir_iop.payer.store`. Each disclosure is
audited by the caller (``fhir-iop payer export --database``, the Bulk Data export in
:mod:`fhir_iop.bulk.runner`) with :func:`consents_used`. Bulk Data ``Group/[id]/$export``:
``server/routes/export.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from pathlib import Path

from fhir_iop import pipeline
from fhir_iop.errors import Problem
from fhir_iop.mapping.common import MappingContext
from fhir_iop.mapping.consent import covers
from fhir_iop.payer.claim import claims
from fhir_iop.payer.rollup import IopRecords, PayerRules, Rollup, rollup
from fhir_iop.records.io import read_records, record_type_for
from fhir_iop.records.model import Consent, default_context

PURPOSE = "HPAYMT"
#: the consent-data-class codes a payment disclosure needs, all of them, on each service day
DATA_CLASSES = ("demographics", "enrollment", "encounters", "coverage")  # what a claim export discloses: Patient, diagnoses, Encounters, Coverage
#: record types the export reads (the rest of a clinic's files are skipped unread)
STEMS = frozenset(IopRecords.__dataclass_fields__)


def read_iop_records(inputs: Iterable[Path], ctx: MappingContext) -> tuple[IopRecords, list[Problem]]:
    """The record types the export needs, from record files or directories (other files are skipped)."""
    records, problems = IopRecords(), []
    context = default_context(ctx.settings.timezone, ctx.terminology)
    for path in pipeline.record_files(list(inputs)):
        model = record_type_for(path)
        if model is None or model.file_stem not in STEMS:
            continue
        for item in read_records(path, context):
            if isinstance(item, Problem):
                problems.append(item)
            else:
                records.add(item[1])
    return records, problems


def consented(consents: list[Consent], payer_id: str, day: date) -> bool:
    return any(all(covers(c, payer_id, PURPOSE, dc, day) for dc in DATA_CLASSES) for c in consents)


def disclosable(r: Rollup, records: IopRecords, require_consent: bool) -> Rollup:
    """The rollup without the days no consent lets go to this payer."""
    if not require_consent:
        return r
    by_client: dict[str, list[Consent]] = {}
    for c in records.consents:
        by_client.setdefault(c.client_mrn, []).append(c)
    ok = lambda mrn, day: consented(by_client.get(mrn, []), r.payer_id, day)  # noqa: E731
    return replace(r, lines=[x for x in r.lines if ok(x.client_mrn, x.day)],
                   short=[x for x in r.short if ok(x.client_mrn, x.day)])


def consents_used(r: Rollup, records: IopRecords) -> dict[str, list[str]]:
    """Per disclosed client (MRN), the ids of the consents that let at least one of its days go to the payer."""
    days: dict[str, set[date]] = {}
    for x in [*r.lines, *r.short]:
        days.setdefault(x.client_mrn, set()).add(x.day)
    out: dict[str, list[str]] = {}
    for c in records.consents:
        if c.client_mrn in days and any(consented([c], r.payer_id, d) for d in days[c.client_mrn]):
            out.setdefault(c.client_mrn, []).append(c.consent_id)
    return {mrn: sorted(out.get(mrn, [])) for mrn in sorted(days)}


@dataclass
class Export:
    rollup: Rollup                    #: disclosed days only
    claims: list[dict]
    resources: list[dict] = field(default_factory=list)   #: what the Claims reference, Claims excluded
    problems: list[Problem] = field(default_factory=list)

    def all(self) -> list[dict]:
        return self.claims + self.resources

    def counts(self) -> dict[str, int]:
        return {"claims": len(self.claims), "billable days": len(self.rollup.lines),
                "short days": len(self.rollup.short), "clients": len({c["patient"]["reference"] for c in self.claims})}


def _wanted(claim_list: list[dict]) -> set[str]:
    refs = set()
    for c in claim_list:
        refs |= {c["patient"]["reference"], c["provider"]["reference"]}
        refs |= {i["coverage"]["reference"] for i in c["insurance"]}
        refs |= {e["reference"] for item in c["item"] for e in item["encounter"]}
    return refs


def disclosed_claims(records: IopRecords, payer_id: str, start: date, end: date, rules: PayerRules,
                     ctx: MappingContext) -> tuple[Rollup, list[dict]]:
    """Rollup → consent filter → Claims (one per client, program and coverage for the whole period)."""
    r = disclosable(rollup(records, payer_id, start, end, rules), records, ctx.settings.part2_program)
    return r, claims(r, records, ctx)


def monthly_claims(records: IopRecords, payer_id: str, rules: PayerRules, ctx: MappingContext,
                   since: date | None = None) -> list[dict]:
    """The disclosed Claims of every calendar month with service days (from the month of ``since`` on):
    what a Bulk Data export, which has no billing period of its own, sends. One rollup over the whole
    span (the week rule looks across month ends anyway), split by month."""
    days = [s.start.date() for s in records.group_sessions] + [c.start.date() for c in records.counseling_sessions]
    if not days:
        return []
    first = max(min(days), since) if since else min(days)
    start, end = first.replace(day=1), max(days)
    if end < start:
        return []
    r = disclosable(rollup(records, payer_id, start, end, rules), records, ctx.settings.part2_program)
    by_month: dict[tuple[int, int], list] = {}
    for line in r.lines:
        by_month.setdefault((line.day.year, line.day.month), []).append(line)
    out = []
    for (y, m), lines in sorted(by_month.items()):
        m_start = date(y, m, 1)
        m_end = (date(y + (m == 12), m % 12 + 1, 1) - timedelta(days=1))
        out += claims(replace(r, start=m_start, end=m_end, lines=lines, short=[]), records, ctx)
    return out


def export(records: IopRecords, payer_id: str, start: date, end: date, rules: PayerRules,
           ctx: MappingContext) -> Export:
    """Rollup → consent filter → Claims, and the Encounters, Patients, Coverages and program Organizations
    they reference (mapped by fhir-iop's own mappings, so the ids match)."""
    r, claim_list = disclosed_claims(records, payer_id, start, end, rules, ctx)
    wanted = _wanted(claim_list)
    map_ctx = MappingContext(settings=ctx.settings, terminology=ctx.terminology)

    def needed(rec) -> bool:  # the indexes every mapping needs are mapped whole; per-client records if wanted
        kind = {"attendance": "attendance", "counseling_sessions": "counseling_session", "clients": "client",
                "coverages": "coverage"}.get(rec.file_stem)
        if kind is None:
            return True
        rt = {"client": "Patient", "coverage": "Coverage"}.get(kind, "Encounter")
        return f"{rt}/{map_ctx.rid(kind, rec.key())}" in wanted

    ordered = (records.programs + records.counselors + records.clients + records.coverages + records.enrollments
               + records.group_sessions + records.attendance + records.counseling_sessions)
    out, problems = [], []
    for item in pipeline.map_records((rec for rec in ordered if needed(rec)), map_ctx):
        if isinstance(item, Problem):
            problems.append(item)
        elif f"{item['resourceType']}/{item['id']}" in wanted:
            out.append(item)
    out.sort(key=lambda res: (res["resourceType"], res["id"]))
    return Export(r, claim_list, out, problems)
