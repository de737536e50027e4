"""Run one Bulk Data export job: stream the store, let through what Part 2 allows, write NDJSON.

Kinds (``params["kind"]``):

* ``group`` — ``Group/[id]/$export`` of a payer Group (:mod:`fhir_iop.bulk.groups`): the members'
  Patient, Coverage (with that payer only), EpisodeOfCare, Condition and the Encounters that began
  on a day an active Coverage of that payer covered (not those another payer, or nobody, paid for:
  minimum necessary, as the Claims), and the payer's
  Claims (computed at export time from the store: reverse mapping → rollup → Claims, one per client,
  program and coverage per calendar month with service days). ``_type=Group`` adds the Group as
  that recipient may see it (only the disclosed members, ``quantity`` their number).
* ``patient`` — ``Patient/$export``: every stored resource about one client, of the requested types.
* ``system`` — ``$export``: every stored resource of the requested types.

``patients`` (the ``patient`` parameter of a Patient or Group export): only those clients' resources
and Claims (a Group export's Group keeps every disclosed member).

Part 2: each resource goes through the disclosure gate (``fhir_iop.bulk.part2.gate`` with the
job's :class:`~fhir_iop.security.access.Access`). For a Group export a member whose Patient the gate
withholds is no member at all: none of its resources, Claims or Group membership is written, so
no file, count or ``quantity`` shows it. What leaves to an outside recipient and is Part 2 data is
marked (``mark``: redisclosure prohibition). After the files are complete, each disclosed client
is audited once (action ``export``) with the Consents that allowed the disclosure.

``_since``: stored resources last updated at or after it; Claims (computed, not stored) of the
months from the one ``_since`` falls in. Stored resources deleted at or after it that the export
would have held (the same kind, types, members, payer and Part 2 gate, judged on their last version)
are reported as the Bulk Data spec requires: ``deleted-<Type>.ndjson`` files of transaction Bundles,
one per resource, each a ``DELETE`` of ``Type/id``, listed in the manifest's ``deleted`` array. A
client learns of a deletion only where it could have received the resource; such a notice is audited
with the client's other disclosures. A Claim month that no longer has service days is not reported.

Memory: one read transaction (``store.reading(snapshot=True)``) streams each type with a
server-side cursor (``Tx.iter_current``, 500 rows a fetch) and each line is written as it comes;
what is kept is the member set and per disclosed client its consent ids. The Claims need the
rollup, which holds the payer's IOP records in memory (as ``fhir-iop payer export`` does).
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections import defaultdict
from datetime import date, datetime
from pathlib import Path

import orjson

from fhir_iop.bulk import jobs
from fhir_iop.bulk.groups import coverage_period, covered_on, payer_of_coverage, payer_of_group
from fhir_iop.bulk.part2 import Decision, gate, labelled, mark, patient_of, record
from fhir_iop.mapping.common import MappingContext
from fhir_iop.store.errors import StoreError
from fhir_iop.store.params import RESOURCE_TYPES
from fhir_iop.store.repository import now

log = logging.getLogger("fhir_iop.bulk")

#: what a payer's Group export contains unless ``_type`` says otherwise
GROUP_TYPES = ("Patient", "Coverage", "EpisodeOfCare", "Condition", "Encounter", "Claim")
#: ``_type`` values a Group export takes
GROUP_ALLOWED = GROUP_TYPES + ("Group",)
#: stored types about one client (the Patient compartment as fhir-iop stores it)
PATIENT_TYPES = tuple(t for t in RESOURCE_TYPES if t not in ("Practitioner", "Organization", "Group"))
#: ``_type`` values a system export takes
SYSTEM_TYPES = tuple(t for t in RESOURCE_TYPES if t != "Group")
BEAT_EVERY = 1000   # rows between updates of the progress text


class Cancelled(Exception):
    pass


class Files:
    """``<Type>.ndjson`` per type in the job's directory, with line counts and sizes; ``deleted``: the
    ``deleted-<Type>.ndjson`` files of the deletions (lines are Bundles, manifest ``deleted``)."""

    def __init__(self, directory: Path, deleted: bool = False):
        self.dir = directory
        self.deleted = deleted
        self.prefix = "deleted-" if deleted else ""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.open: dict[str, object] = {}
        self.counts: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)

    def write(self, rt: str, line: bytes) -> None:
        f = self.open.get(rt)
        if f is None:
            f = self.open[rt] = open(self.dir / f"{self.prefix}{rt}.ndjson", "wb")
        f.write(line)
        f.write(b"\n")
        self.counts[rt] += 1
        self.bytes[rt] += len(line) + 1

    def close(self) -> list[dict]:
        for f in self.open.values():
            f.close()
        if self.deleted:
            return [{"type": "Bundle", "name": f"{self.prefix}{rt}.ndjson", "count": self.counts[rt],
                     "bytes": self.bytes[rt], "deleted": True} for rt in self.open]
        return [{"type": rt, "name": f"{rt}.ndjson", "count": self.counts[rt], "bytes": self.bytes[rt]}
                for rt in self.open]


class Export:
    """One job's work (see the module docstring)."""

    def __init__(self, store, job: jobs.Job, access, directory: Path, ctx: MappingContext, rules=None):
        self.store, self.job, self.access, self.ctx = store, job, access, ctx
        self.params = job.params
        self.dir = directory / job.id
        self.rules = rules
        self.files = Files(self.dir)
        self.deletions = Files(self.dir, deleted=True)
        self.disclosed: dict[str, set[str]] = defaultdict(set)  # Patient id -> Consent refs
        self.rows = 0
        self.progress = "started"
        self.cancelled = threading.Event()
        since = self.params.get("since")
        self.since = datetime.fromisoformat(since) if since else None   # UTC, naive
        #: ``patient``: only these clients' compartments (None: every client the kind takes)
        self.patients: set[str] | None = set(self.params["patients"]) if self.params.get("patients") else None
        #: Group export: member Patient id -> the periods of its active Coverages with the payer
        self.covered: dict[str, list[tuple[str | None, str | None]]] | None = None

    # -- bookkeeping ---------------------------------------------------------------------------

    def tick(self, rt: str) -> None:
        """Per row: stop once cancelled; the progress text the heartbeat thread reports."""
        if self.cancelled.is_set():
            raise Cancelled()
        self.rows += 1
        if self.rows % BEAT_EVERY == 1:
            self.progress = f"{rt}: {sum(self.files.counts.values())} resources written"

    def heartbeat(self, stop: threading.Event) -> None:
        """Runs beside the work (which may spend minutes in the payer rollup without a row to tick):
        the job's heartbeat and progress every few seconds; notices a cancel."""
        while not stop.wait(jobs.HEARTBEAT_SECONDS):
            try:
                if not jobs.beat(self.store, self.job.id, self.progress):
                    self.cancelled.set()
                    return
            except Exception:  # the database is away for a moment: the next beat retries
                log.warning("bulk export %s: heartbeat failed", self.job.id, exc_info=True)

    def disclose(self, res: dict, decision) -> None:
        """Count ``res`` as disclosed to the client (its patient is audited with the Consent that allowed it)."""
        pid = patient_of(res)
        if pid is not None:
            consents = self.disclosed[pid]
            if decision.consent:
                consents.add(decision.consent)

    def emit(self, rt: str, res: dict, body: str | None, decision) -> None:
        self.disclose(res, decision)
        if not self.access.internal and labelled(res):
            self.files.write(rt, orjson.dumps(mark(res)))
        else:
            self.files.write(rt, body.encode() if body is not None else orjson.dumps(res))

    # -- the work ------------------------------------------------------------------------------

    def run(self) -> tuple[list[dict], list[dict]]:
        kind, types = self.params["kind"], self.params["types"]
        errors: list[dict] = []
        with self.store.reading(snapshot=True) as tx:
            g = gate(tx, self.access)
            group, payer, members = None, None, None
            if kind == "group":
                group = tx.read("Group", self.params["group"]).resource
                payer = payer_of_group(group, self.ctx)
                listed = [patient_of({"subject": m.get("entity")}) for m in group.get("member") or ()]
                members = {}   # Patient id -> the Decision that lets its Patient leave
                for pid in filter(None, listed):  # a member whose Patient may not leave is no member
                    try:
                        patient = tx.read("Patient", pid)
                    except StoreError:
                        continue
                    if (decision := g.decide(patient)).allowed:
                        members[pid] = decision
                if payer is not None and "Encounter" in types:  # (no payer's Group: every member Encounter)
                    self.covered = defaultdict(list)
                    for stored in tx.iter_current(("Coverage",)):
                        cov = stored.resource
                        pid = patient_of(cov)
                        if pid in members and cov.get("status") == "active" \
                                and (payer_of_coverage(cov, self.ctx) or ("",))[0] == payer:
                            self.covered[pid].append(coverage_period(cov))
            stored_types = tuple(rt for rt in types if rt not in ("Claim", "Group"))
            for rt in stored_types:
                for stored in tx.iter_current((rt,)):
                    self.tick(rt)
                    if self.since is not None and stored.last_updated < self.since:
                        continue
                    res = stored.resource
                    if not self.in_scope(rt, res, members, payer):
                        continue
                    decision = g.decide(stored)
                    if decision.allowed:
                        self.emit(rt, res, stored.body, decision)
            if self.since is not None and stored_types:
                for stored in tx.iter_deleted(stored_types, self.since):
                    self.tick(stored.type)
                    res = stored.resource  # (its last version before the deletion)
                    if not self.in_scope(stored.type, res, members, payer):
                        continue
                    decision = g.decide(stored)
                    if decision.allowed:
                        self.disclose(res, decision)
                        self.deletions.write(stored.type, orjson.dumps(deletion(stored.type, stored.id)))
            if "Claim" in types and payer is not None:
                errors += self.claims(payer, members)
            if "Group" in types and group is not None:
                view = {**group, "quantity": len(members)}  # the Group as this recipient may see it
                view["member"] = [m for m in group.get("member") or ()
                                  if patient_of({"subject": m.get("entity")}) in members]
                if not view["member"]:
                    del view["member"]
                self.emit("Group", view, None, Decision(True, None, "members disclosed"))
        return self.files.close() + self.deletions.close(), errors

    def in_scope(self, rt: str, res: dict, members: dict | None, payer: str | None) -> bool:
        """Whether ``res`` belongs in this job (before the Part 2 gate): a Patient or Group export holds
        only what is about a client, a Group export only its disclosed members', its payer's Coverage
        and the Encounters that began on a day the payer covered."""
        pid = patient_of(res)
        if self.params["kind"] != "system" and pid is None:
            return False
        if self.patients is not None and pid not in self.patients:
            return False
        if members is not None and pid not in members:
            return False
        if rt == "Encounter" and self.covered is not None:
            began = ((res.get("period") or {}).get("start") or "")[:10] or None
            if not covered_on(self.covered.get(pid, ()), began):
                return False
        return not (rt == "Coverage" and payer is not None
                    and (payer_of_coverage(res, self.ctx) or ("",))[0] != payer)

    def claims(self, payer: str, members: dict) -> list[dict]:
        from fhir_iop.payer.export import monthly_claims
        from fhir_iop.payer.rollup import load_rules
        from fhir_iop.payer.store import read_store_records
        records, problems = read_store_records(self.store, self.ctx)
        rules = (self.rules or load_rules()).for_payer(payer)
        since = self.since.date() if self.since else None
        for claim in monthly_claims(records, payer, rules, self.ctx, since):
            self.tick("Claim")
            if since is not None and date.fromisoformat(claim["billablePeriod"]["end"]) < since:
                continue
            pid = patient_of(claim)
            decision = members.get(pid) if self.patients is None or pid in self.patients else None
            # (see fhir_iop.bulk.part2 on Claims)
            if decision is not None:
                self.emit("Claim", claim, None, decision)
        if not problems:
            return []
        where = sorted({p.where.rsplit(": ", 1)[-1] for p in problems})[:100]
        return [{"resourceType": "OperationOutcome", "issue": [{
            "severity": "warning", "code": "incomplete",
            "diagnostics": f"{len(problems)} stored resource(s) did not map back to IOP records; their "
                           "service days are not in the Claims",
            "expression": where}]}]


def deletion(rt: str, rid: str) -> dict:
    """A line of a ``deleted`` file: a transaction Bundle deleting ``Type/id`` (Bulk Data v2 manifest)."""
    return {"resourceType": "Bundle", "type": "transaction",
            "entry": [{"request": {"method": "DELETE", "url": f"{rt}/{rid}"}}]}


def run_job(store, job_id: str, access, directory: Path, ttl: int, ctx: MappingContext | None = None,
            rules=None) -> None:
    """The whole life of one job in a worker (thread or process); never raises."""
    job = jobs.get(store, job_id)
    if job is None or not jobs.start(store, job_id, now()):
        return  # cancelled before it started
    work = Export(store, job, access, directory, ctx or MappingContext(), rules)
    stop = threading.Event()
    threading.Thread(target=work.heartbeat, args=(stop,), daemon=True, name=f"bulk-export-beat-{job_id[:8]}").start()
    try:
        files, errors = work.run()
        if errors:
            with open(work.dir / "OperationOutcome.ndjson", "wb") as f:
                for oo in errors:
                    f.write(orjson.dumps(oo) + b"\n")
        files = files + ([{"type": "OperationOutcome", "name": "OperationOutcome.ndjson", "count": len(errors),
                           "error": True}] if errors else [])
        if jobs.get(store, job_id) is None:
            raise Cancelled()
        group = [f"Group/{job.params['group']}"] if job.params.get("group") else []
        for pid, consents in sorted(work.disclosed.items()):  # one disclosure per client
            record(store, access, "export", 0, entities=group, patients=[f"Patient/{pid}"],
                   consents=sorted(consents), query=job.request, description=f"bulk export {job_id}")
        if not jobs.finish(store, job_id, files, [], ttl):
            raise Cancelled()
        log.info("bulk export %s completed: %d file(s), %d resource(s), %d client(s)", job_id, len(files),
                 sum(f["count"] for f in files), len(work.disclosed))
    except Cancelled:
        shutil.rmtree(work.dir, ignore_errors=True)
        log.info("bulk export %s cancelled", job_id)
    except Exception:
        log.exception("bulk export %s failed", job_id)
        shutil.rmtree(work.dir, ignore_errors=True)
        jobs.fail(store, job_id, "the export failed; the server log has the details", ttl)
    finally:
        stop.set()
