"""One Group per payer: the clients holding a Coverage with that payer (the unit of a payer's Bulk export).

Convention (documented in server/README.md):

* ``Group.identifier`` = the payer id in the site's payer identifier system (``identifier_systems.payer``
  in site.json, the system of ``Coverage.payor.identifier``): ``GET [base]/Group?identifier=<payer
  system>|AETNA`` finds the Group of payer AETNA;
* ``Group.id`` = ``MappingContext.rid("payer-group", payer_id)`` (deterministic, like every id the
  mapping gives);
* ``type`` person, ``actual`` true, ``name`` "Members of <payer name>", ``member.entity`` the Patient
  (``Coverage.beneficiary``) of every Coverage whose payor is that payer and whose status is
  active, in id order; ``quantity`` their number;
* the 42 CFR Part 2 labels when the site is a Part 2 program (being a member says the client is in
  the program). The stored Group lists every member, so it is Part 2 data about no single client:
  the disclosure gate withholds it from every outside recipient on the REST paths (read, search):
  the program finds it by identifier, a payer is given its Group id by the site (``fhir-iop payer
  groups`` prints them) and sees the Group in its export (``_type=Group``: only the members its
  consents let go, ``quantity`` their number; ``fhir_iop.bulk.runner``).

The Groups are derived from the Coverages in the store: :func:`refresh` rebuilds them (idempotent:
an unchanged Group keeps its version). It runs at every ``$export`` kick-off and by
``fhir-iop payer groups --database URL``.
"""

from __future__ import annotations

from collections import defaultdict

from fhir_iop.mapping.common import PART2_LABELS, MappingContext
from fhir_iop.bulk.part2 import patient_of

KIND = "payer-group"


def group_id(ctx: MappingContext, payer_id: str) -> str:
    return ctx.rid(KIND, payer_id)


def payer_of_coverage(cov: dict, ctx: MappingContext) -> tuple[str, str] | None:
    """(payer id, payer name) of a Coverage's first payor with an identifier in the payer system."""
    for p in cov.get("payor") or ():
        ident = p.get("identifier") or {}
        if ident.get("system") == ctx.systems.payer and ident.get("value"):
            return ident["value"], p.get("display") or ident["value"]
    return None


def coverage_period(cov: dict) -> tuple[str | None, str | None]:
    """(first day, last day) of a Coverage as ISO dates (None: open on that side)."""
    period = cov.get("period") or {}
    return (period["start"][:10] if period.get("start") else None,
            period["end"][:10] if period.get("end") else None)


def covered_on(periods, day: str | None) -> bool:
    """Whether ``day`` (an ISO date) falls in one of ``periods`` (:func:`coverage_period`); an undated
    day is covered only by a period open on both sides."""
    return any((start is None or (day is not None and start <= day))
               and (end is None or (day is not None and day <= end)) for start, end in periods)


def payer_of_group(group: dict, ctx: MappingContext) -> str | None:
    for ident in group.get("identifier") or ():
        if ident.get("system") == ctx.systems.payer and ident.get("value"):
            return ident["value"]
    return None


def build(payer_id: str, name: str, members: list[str], ctx: MappingContext) -> dict:
    group = {"resourceType": "Group", "id": group_id(ctx, payer_id)}
    if ctx.settings.part2_program:
        group["meta"] = {"security": [dict(label) for label in PART2_LABELS]}
    group |= {"identifier": [{"system": ctx.systems.payer, "value": payer_id}], "active": True,
              "type": "person", "actual": True, "name": f"Members of {name}", "quantity": len(members)}
    if members:
        group["member"] = [{"entity": {"reference": f"Patient/{pid}"}} for pid in members]
    return group


def refresh(store, ctx: MappingContext | None = None) -> dict[str, str]:
    """Rebuild every payer's Group from the Coverages in the store; {payer id: Group id}."""
    ctx = ctx or MappingContext()
    members: dict[str, set[str]] = defaultdict(set)
    names: dict[str, str] = {}
    existing: set[str] = set()
    with store.reading(snapshot=True) as tx:
        for stored in tx.iter_current(("Coverage",)):
            cov = stored.resource
            payer = payer_of_coverage(cov, ctx)
            if payer is None:
                continue
            names.setdefault(payer[0], payer[1])
            pid = patient_of(cov)
            if cov.get("status") == "active" and pid:
                members[payer[0]].add(pid)
        for stored in tx.iter_current(("Group",)):
            if (payer_id := payer_of_group(stored.resource, ctx)) is not None:
                existing.add(payer_id)
    groups = [build(p, names.get(p, p), sorted(members.get(p, ())), ctx) for p in sorted(set(names) | existing)]
    if groups:
        with store.transaction() as tx:
            tx.put_many(groups)
    return {payer_of_group(g, ctx): g["id"] for g in groups}
