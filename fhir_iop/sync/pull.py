"""Incremental pull from an EHR: nothing lost, nothing doubled, the cursor moved only with the data.

    from fhir_iop.sync.pull import pull
    result = pull(store, connection)            # every type the connection pulls; PullResult counts

Per connection and resource type, ``sync_state.cursor`` holds the EHR's ``meta.lastUpdated`` up to
which everything is stored. A run pages by that cursor itself (keyset paging)::

    GET [base]/[type]?_lastUpdated=ge<cursor>&_sort=_lastUpdated&_count=<page size>

and, after storing a page, asks again from the newest ``lastUpdated`` on it instead of following the
EHR's ``next`` link. Offset-paged servers (``_offset`` in their next links; sekmet is one) shift
their pages when a resource is updated during the paging — the resource moves to the end and the
first one of the next page slides onto the page already read, and is never seen. Asking again from
the cursor cannot skip anything. Only when a whole page carries the *same* ``lastUpdated`` as the
cursor (more resources at one instant than a page holds) does the run follow ``next`` until the
instant changes.

``ge`` rather than ``gt``: several resources can share one instant, and a page can end in the
middle of them; ``gt`` would lose the rest. What ``ge`` brings again is recognised: within a run
by (id, versionId), across runs (a crash, a kill, the next schedule) because storing is idempotent
— the pulled resource's id in our store is derived from the connection, type and EHR id, and an
update with identical content is ``unchanged`` (no new version, no write hooks). A duplicated page
(the EHR or a proxy sending the same page twice) is absorbed the same way.

Each page is validated (structure) and stored in ONE store transaction
``store.transaction(origin="sync:<connection>")`` that also moves the cursor, so a kill between
pages loses nothing and the next run starts after the last committed page. The cursor only moves
forward (the state row is locked and the newer of the two kept), and a resource the other pull
created first is updated instead, so two pulls of the same connection at once do no harm.

The EHR must honour ``_lastUpdated`` and ``_sort``: the connection sends ``Prefer:
handling=strict`` (an EHR that does not know a parameter answers 400) and the first page's
``Bundle.link[self]`` is checked; a parameter missing from it was ignored, and the pull of that
type stops with an error saying so rather than mistaking the order.

Ids and references (see :func:`localize`): a pulled resource is stored under
``uuid5(connection, type, EHR id)`` — the EHR's ids may collide with ours or another EHR's — with
the EHR id kept as an ``identifier`` (system ``[base]/[type]``, use ``secondary``) and
``meta.source`` ``[base]/[type]/[id]/_history/[version]``. References to the EHR (``Type/id`` or
``[base]/Type/id``) of a stored type are rewritten to the derived id, so they resolve here once the
target is pulled too (in any order); references to types not stored here become absolute URLs at
the EHR. A resource that fails structure validation is not stored (counted as ``invalid``, its
id logged, the reason in the run's last error) and does not hold up the others.

Our clients (see :func:`link_client`): a pulled Patient that carries the MRN of one of the site's clients
— under the site's MRN system or one of ``mrn_match_systems`` in ``mappings/site.json`` (systems under
which an EHR or HIE records the site's MRN) — is the EHR's record of that client. It is stored as the
EHR's resource all the same (its own id, the EHR's demographics as the EHR has them), with a ``link``
``{other: Patient/<the client's Patient>, type: seealso}`` (R4: "another patient resource known to contain
data about the same person"); our Patient is never written by a pull. References of other pulled
resources to that Patient are pointed at the client's Patient (:func:`point_at_clients`) when the linked
Patient is stored by then — a pull takes the types in the connection's order, so list Patient first.
What was stored before its Patient was linked still maps to the client: the reverse mapping
(:mod:`fhir_iop.mapping.client`) resolves a linked Patient to the client it links to, reads it as one client
record (the EHR's demographics fill the client's empty fields) and never as a second client — as it does
for a pulled Patient carrying a client's MRN that was pulled before the client was loaded (no link yet).
Resources of the connection stored before the link appeared (another pull order, a bulk pull's
files) are rewritten then (:func:`repoint_stored`); the reverse mapping resolves references through
the link in any case.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from fhir_iop.audit import patient_of
from fhir_iop.store.errors import Conflict, Gone, Invalid, NotFound
from fhir_iop.store.models import resource, search_reference, sync_run, sync_state
from fhir_iop.store.params import RESOURCE_TYPES, split_reference
from fhir_iop.store.repository import Store, Tx, now
from fhir_iop.sync.client import EhrClient, EhrError
from fhir_iop.sync.config import Connection

log = logging.getLogger(__name__)

#: namespace of the ids of pulled resources (uuid5 of "connection/type/ehr-id")
NAMESPACE = uuid.UUID("6f0b7c8e-2a51-5b1e-9d6c-3f1e0a7b9c42")


def local_id(connection: str, rtype: str, remote_id: str) -> str:
    """Our id for the EHR's ``rtype/remote_id`` pulled over ``connection``."""
    return str(uuid.uuid5(NAMESPACE, f"{connection}/{rtype}/{remote_id}"))


def remote_system(connection: Connection, rtype: str) -> str:
    """The identifier system under which a pulled resource keeps its EHR id."""
    return f"{connection.base_url}/{rtype}"


def parse_instant(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt.astimezone(UTC) if dt.tzinfo else dt.replace(tzinfo=UTC)


def _rewrite_refs(node, connection: Connection, stored_types) -> None:
    base = connection.base_url + "/"
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and not ref.startswith(("#", "urn:")):
            local = not ref.startswith(("http://", "https://"))
            if local or ref.startswith(base):
                t, i = split_reference(ref if local else ref[len(base):])
                if t and i:
                    node["reference"] = f"{t}/{local_id(connection.name, t, i)}" if t in stored_types \
                        else f"{base}{t}/{i}"
        for k, v in node.items():
            if k != "contained" and isinstance(v, (dict, list)):
                _rewrite_refs(v, connection, stored_types)
    elif isinstance(node, list):
        for v in node:
            _rewrite_refs(v, connection, stored_types)


def localize(resource: dict, connection: Connection, stored_types=RESOURCE_TYPES) -> dict:
    """The EHR's resource as we store it: our id, the EHR id as identifier and meta.source, references
    to the EHR rewritten (see the module docstring). ``resource`` is not changed."""
    res = orjson.loads(orjson.dumps(resource))
    rtype, rid = res["resourceType"], str(res.get("id") or "")
    meta = dict(res.get("meta") or {})
    version = meta.pop("versionId", None)
    meta.pop("lastUpdated", None)
    meta["source"] = f"{connection.base_url}/{rtype}/{rid}" + (f"/_history/{version}" if version else "")
    res["meta"] = meta
    res["id"] = local_id(connection.name, rtype, rid)
    _rewrite_refs({k: v for k, v in res.items() if k not in ("meta", "contained")}, connection, stored_types)
    for c in res.get("contained") or ():  # contained resources' references to the EHR too
        if isinstance(c, dict):
            _rewrite_refs({k: v for k, v in c.items() if k != "meta"}, connection, stored_types)
    system = remote_system(connection, rtype)
    if _has_identifier(rtype):
        ids = [i for i in res.get("identifier") or () if not (isinstance(i, dict) and i.get("system") == system)]
        res["identifier"] = [*ids, {"use": "secondary", "system": system, "value": rid}]
    return res


_NO_IDENTIFIER = {"Bundle", "Binary", "Parameters", "OperationOutcome", "Provenance", "AuditEvent"}


def _has_identifier(rtype: str) -> bool:
    return rtype not in _NO_IDENTIFIER


# -- state ------------------------------------------------------------------------------------------

def read_state(tx_or_conn, connection: str, rtype: str, lock: bool = False):
    conn = getattr(tx_or_conn, "conn", tx_or_conn)
    stmt = select(sync_state).where(sync_state.c.connection == connection, sync_state.c.resource_type == rtype)
    if lock:
        stmt = stmt.with_for_update()
    return conn.execute(stmt).first()


def write_state(tx: Tx, connection: str, rtype: str, **values) -> None:
    """Upsert the state row (inside the caller's transaction)."""
    values["updated_at"] = now()
    where = (sync_state.c.connection == connection, sync_state.c.resource_type == rtype)
    if tx.conn.execute(update(sync_state).where(*where).values(**values)).rowcount:
        return
    try:
        with tx.conn.begin_nested():
            tx.conn.execute(insert(sync_state).values(connection=connection, resource_type=rtype, **values))
    except IntegrityError:  # another pull of the same connection created the row meanwhile
        tx.conn.execute(update(sync_state).where(*where).values(**values))


def _later(a: str | None, b: str | None) -> str | None:
    """The later of two instants (as the EHR wrote them)."""
    if a is None or b is None:
        return a or b
    return a if parse_instant(a) >= parse_instant(b) else b


# -- storing ----------------------------------------------------------------------------------------

@dataclass
class PullResult:
    """Counts per outcome (created, updated, unchanged, invalid, skipped), per type, and errors."""
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # type -> what went wrong (ids only)
    pages: int = 0

    def add(self, rtype: str, outcome: str, n: int = 1) -> None:
        c = self.counts.setdefault(rtype, {})
        c[outcome] = c.get(outcome, 0) + n

    def total(self, outcome: str | None = None) -> int:
        return sum(n for c in self.counts.values() for k, n in c.items() if outcome in (None, k))

    def by_outcome(self) -> dict[str, int]:
        """The counts summed over the resource types: outcome -> number."""
        out: dict[str, int] = {}
        for per_type in self.counts.values():
            for k, n in per_type.items():
                out[k] = out.get(k, 0) + n
        return out

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_json(self) -> dict:
        return {"counts": self.counts, "errors": self.errors, "pages": self.pages}


def link_client(tx: Tx, patient: dict, ctx=None) -> str | None:
    """The id of our client's Patient that this pulled Patient (localized) carries the MRN of, or None.
    ``ctx``: a :class:`~fhir_iop.mapping.common.MappingContext` (the site's, by default)."""
    if ctx is None:
        from fhir_iop.mapping.common import MappingContext
        ctx = MappingContext()
    systems = {ctx.systems.mrn, *ctx.settings.mrn_match_systems}
    for ident in patient.get("identifier") or ():
        if isinstance(ident, dict) and ident.get("system") in systems and isinstance(ident.get("value"), str):
            ours = ctx.rid("client", ident["value"])
            try:
                tx.read("Patient", ours)
            except (NotFound, Gone):
                continue
            return ours
    return None


def _linked(tx: Tx, pid: str, cache: dict[str, str | None]) -> str | None:
    """Our client's Patient id when the stored Patient ``pid`` is a pulled record linked to it."""
    if pid not in cache:
        try:
            links = tx.read("Patient", pid).resource.get("link") or ()
        except (NotFound, Gone):
            links = ()
        cache[pid] = next((split_reference(lk["other"]["reference"])[1] for lk in links
                           if lk.get("type") == "seealso" and (lk.get("other") or {}).get("reference", "").startswith(
                               "Patient/")), None)
    return cache[pid]


def point_at_clients(tx: Tx, node, cache: dict[str, str | None]) -> None:
    """References to a pulled Patient linked to one of our clients point at the client's Patient instead."""
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and ref.startswith("Patient/") and (ours := _linked(tx, ref[8:], cache)):
            node["reference"] = f"Patient/{ours}"
        for v in node.values():
            if isinstance(v, (dict, list)):
                point_at_clients(tx, v, cache)
    elif isinstance(node, list):
        for v in node:
            point_at_clients(tx, v, cache)


def repoint_stored(tx: Tx, connection: Connection, pulled_pid: str, ours: str) -> int:
    """Resources of this connection stored before their Patient was linked: point them at our client's
    Patient (found through the store's reference index). Returns how many were rewritten."""
    stmt = select(resource.c.type, resource.c.id).distinct().select_from(
        search_reference.join(resource, resource.c.rid == search_reference.c.rid)).where(
        search_reference.c.target_type == "Patient", search_reference.c.target_id == pulled_pid,
        resource.c.deleted.is_(False), resource.c.type != "Patient",
        resource.c.type.in_(RESOURCE_TYPES))  # not AuditEvents (append-only; they name the patient too)
    n = 0
    for rtype, rid in tx.conn.execute(stmt).all():
        res = tx.read(rtype, rid).resource
        if not str((res.get("meta") or {}).get("source", "")).startswith(connection.base_url + "/"):
            continue  # not pulled over this connection: not ours to rewrite
        point_at_clients(tx, {k: v for k, v in res.items() if k not in ("meta", "id")}, {pulled_pid: ours})
        n += tx.update(rtype, rid, res).outcome != "unchanged"
    return n


def store_batch(tx: Tx, connection: Connection, resources: Iterable[dict], result: PullResult,
                types: tuple[str, ...] | None = None) -> None:
    """Store pulled resources (localized, structure-validated) in ``tx``; invalid ones are counted."""
    links: dict[str, str | None] = {}  # pulled Patient id -> our client's Patient id (None: not linked)
    ctx = None
    written_refs: dict[str, str | None] = {}  # what this batch wrote -> its patient, for the audit
    for res in resources:
        rtype = res.get("resourceType")
        if not isinstance(rtype, str) or not res.get("id") or rtype not in RESOURCE_TYPES or (
                types is not None and rtype not in types):
            result.add(str(rtype), "skipped")
            continue
        local = localize(res, connection)
        if rtype == "Patient":
            if ctx is None:
                from fhir_iop.mapping.common import MappingContext
                ctx = MappingContext()
            ours = link_client(tx, local, ctx)
            kept = [lk for lk in local.get("link") or () if not (isinstance(lk, dict) and lk.get("type") == "seealso"
                    and (lk.get("other") or {}).get("reference") == f"Patient/{ours}")]
            local.pop("link", None)
            if kept or ours:
                local["link"] = [*kept, *([{"other": {"reference": f"Patient/{ours}"}, "type": "seealso"}]
                                          if ours else [])]
            links[local["id"]] = ours
        else:
            point_at_clients(tx, {k: v for k, v in local.items() if k not in ("meta", "id")}, links)
        try:
            try:
                written = tx.update(rtype, local["id"], local)
            except Conflict:  # another pull created it meanwhile (its savepoint is rolled back): update that
                written = tx.update(rtype, local["id"], local)
        except Invalid as e:
            result.add(rtype, "invalid")
            result.errors.setdefault(rtype, f"{rtype}/{res.get('id')} (EHR id) is not valid R4: {e}")
            log.warning("sync %s: %s/%s (EHR id) not stored: not valid R4 (%d issue(s))", connection.name, rtype,
                        res.get("id"), len(getattr(e, "issues", None) or ()))
            continue
        result.add(rtype, written.outcome)
        if written.outcome != "unchanged":
            written_refs[f"{rtype}/{local['id']}"] = patient_of(local)
        if rtype == "Patient" and links.get(local["id"]) and written.outcome != "unchanged":
            if n := repoint_stored(tx, connection, local["id"], links[local["id"]]):
                log.info("sync %s: %d resource(s) stored before Patient/%s was linked now point at the client",
                         connection.name, n, local["id"])
    audit_writes(tx, connection, written_refs)


#: at most this many written resources are named in one AuditEvent (the count is always in its description)
MAX_AUDITED = 1000


def audit_writes(tx: Tx, connection: Connection, written: dict[str, str | None]) -> None:
    """One AuditEvent per stored batch, in the batch's own transaction: every write is audited, pulls too."""
    if not written:
        return
    from fhir_iop.audit import record
    from fhir_iop.security.access import Access
    refs = list(written)[:MAX_AUDITED]
    record(tx, Access(client_id=connection.origin), "update", 0, entities=refs,
           patients=sorted({p for p in (written[r] for r in refs) if p}),
           description=f"{len(written)} resource(s) pulled from EHR connection {connection.name}")


# -- incremental pull -------------------------------------------------------------------------------

def _key(res: dict) -> tuple[str, str]:
    return str(res.get("id")), str((res.get("meta") or {}).get("versionId", ""))


def pull_type(store: Store, client: EhrClient, rtype: str, result: PullResult, max_pages: int | None = None) -> None:
    """Pull one resource type until the EHR has nothing newer (see the module docstring)."""
    connection = client.connection
    with store.reading() as tx:
        row = read_state(tx, connection.name, rtype)
    cursor = row.cursor if row is not None and row.cursor else connection.since
    seen: set[tuple[str, str]] = set()  # (id, version) stored in this run at the cursor instant
    count = connection.page_size
    pages = 0
    while True:
        params = [("_sort", "_lastUpdated"), ("_count", str(count))]
        if cursor:
            params.append(("_lastUpdated", f"ge{cursor}"))
        search = client.search(rtype, params)
        try:
            page = next(search, None)
            if page is not None and page.ignored:  # a glitch (a stale or duplicated page) or an EHR that ignores
                search.close()
                search = client.search(rtype, params)
                page = next(search, None)
            if page is None:
                return
            if page.ignored:
                raise EhrError(200, f"{connection.name}: GET {rtype}: the EHR ignored "
                                    f"{', '.join(sorted(page.ignored))}; an incremental pull needs _lastUpdated "
                                    f"and _sort=_lastUpdated", transient=False)
            while True:
                matches = page.resources
                fresh = [r for r in matches if _key(r) not in seen]
                stamps = [(parse_instant((r.get("meta") or {}).get("lastUpdated")), (r.get("meta") or {}).get(
                    "lastUpdated")) for r in matches]
                stamps = [s for s in stamps if s[0] is not None]
                newest = max(stamps)[1] if stamps else None
                if stamps and cursor and parse_instant(cursor) and max(stamps)[0] < parse_instant(cursor):
                    newest = None  # older than the cursor: an EHR that ignored ge (checked above) or a stale page
                with store.transaction(origin=connection.origin) as tx:
                    state = read_state(tx, connection.name, rtype, lock=True)
                    store_batch(tx, connection, fresh, result, (rtype,))
                    new_cursor = _later(state.cursor if state is not None else None, _later(cursor, newest))
                    write_state(tx, connection.name, rtype, cursor=new_cursor, next_url=None)
                pages += 1
                result.pages += 1
                moved = new_cursor != cursor and parse_instant(new_cursor) != parse_instant(cursor)
                if moved:
                    seen = {_key(r) for r in matches if (r.get("meta") or {}).get("lastUpdated") and parse_instant(
                        r["meta"]["lastUpdated"]) == parse_instant(new_cursor)}
                    cursor = new_cursor
                else:
                    seen.update(_key(r) for r in matches)
                log.info("sync %s: %s page %d: %d resource(s), %d new", connection.name, rtype, pages, len(matches),
                         len(fresh))
                if max_pages is not None and pages >= max_pages:
                    return
                if not page.link("next") or not matches:
                    return
                if moved:
                    break  # ask again from the new cursor (keyset paging)
                # the whole page sits at the cursor instant: follow the EHR's paging through that instant
                page = next(search, None)
                if page is None:
                    return
        finally:
            search.close()


def pull(store: Store, connection: Connection, types: Iterable[str] | None = None, client: EhrClient | None = None,
         max_pages: int | None = None) -> PullResult:
    """Pull every type the connection pulls (or ``types``); one ``sync_run`` row records the run.
    An error in one type is recorded and the other types still run."""
    types = tuple(types or connection.pull_types)
    unknown = [t for t in types if t not in RESOURCE_TYPES]
    result = PullResult()
    for t in unknown:
        result.errors[t] = f"{t} is not a resource type stored here"
    own = client is None
    client = client or EhrClient(connection)
    with store.transaction() as tx:
        run_id = tx.conn.execute(insert(sync_run).values(connection=connection.name, direction="pull",
                                                         started_at=now())).inserted_primary_key[0]
    try:
        for rtype in types:
            if rtype in unknown:
                continue
            try:
                pull_type(store, client, rtype, result, max_pages)
            except EhrError as e:
                result.errors[rtype] = e.message
                log.warning("sync %s: pull of %s stopped: %s", connection.name, rtype, e.loggable)  # not the EHR text (it may quote PHI)
    finally:
        if own:
            client.close()
        last_error = "; ".join(f"{t}: {m}" for t, m in result.errors.items()) or None
        with store.transaction() as tx:
            tx.conn.execute(update(sync_run).where(sync_run.c.id == run_id).values(
                ended_at=now(), counts=orjson.dumps(result.as_json()).decode(), last_error=last_error))
    return result


def find_pulled(tx: Tx, connection: Connection, rtype: str, remote_id: str):
    """Our stored copy of the EHR's ``rtype/remote_id`` (None if not pulled)."""
    try:
        return tx.read(rtype, local_id(connection.name, rtype, remote_id))
    except NotFound:
        return None
