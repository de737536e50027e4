"""Push: send the outbox's messages to their EHR, each at most once in effect, Part 2 checked.

One message at a time (:func:`push`):

1. **Claim** a batch in a short write transaction: ``SELECT … FOR UPDATE SKIP LOCKED`` on
   PostgreSQL (two workers never claim the same row; a row another worker holds is skipped, not
   waited for), ``BEGIN IMMEDIATE`` on SQLite (one writer at a time). Claimed rows go ``inflight``
   with ``lease_owner`` (the worker) and ``lease_expires``; the lease of each message is renewed
   just before it is sent (a message whose lease went to another worker meanwhile is skipped), so
   ``lease`` only has to outlast one message's send (its HTTP attempts and timeouts). Due: ``pending`` with
   ``next_attempt_at`` reached, or ``inflight`` whose lease ran out (its worker died). A message is
   not claimed while another message of the same resource is in flight, so versions go in order.
2. **Part 2 gate**: the stored version is read and ``fhir_iop.disclosure.Gate(tx,
   Access(client_id="sync:<connection>", recipient=<connection.recipient>,
   purpose=<connection.purpose>)).decide(...)`` must allow it (a connection without ``recipient``
   gets no Part 2 data at all: it is never taken for the program itself). A refused message is not sent: it
   becomes ``withheld`` with the gate's reason. Withheld messages are decided again when any
   Consent is written (the outbox hook reopens them), on the first run of each site day (a consent
   with a future start comes into force) and by ``replay --state withheld``; a consent
   revoked while messages wait stops them at the next claim, because the gate runs at send time.
3. **Send** by conditional update on the resource's identifier, ``PUT [type]?identifier=system|value``
   (one request per message, no transaction Bundle: one message's refusal or dead letter never
   holds back the others, and each gets its own audit entry and error). The identifier is the
   first one whose system is one of the site's IOP identifier systems (``site.json``), else, for a
   resource without one whose id is a UUID (the mapping's deterministic ids), ``urn:ietf:rfc:3986``
   ``urn:uuid:<id>`` (added to the copy sent). That identifier makes the send idempotent: a retry,
   a crash between the EHR's answer and our commit, or a second worker after a lost lease updates
   the same record on the EHR instead of creating another. What is sent: the stored version
   marked by ``fhir_iop.disclosure.mark`` (Part 2 labels incl. NORDSCLCD and the 42 CFR 2.32
   notice) when it is Part 2 data, without our id and version metadata; local references
   (``Patient/<id>``) become logical references by identifier (the one the reference carries, or
   the ``urn:uuid`` one), because the EHR knows our resources by identifier only — except
   references to resources pulled from that same EHR, which become its own ``Type/<its id>``.
   A resource pulled from that EHR and changed here goes back as ``PUT [type]/<its id>`` (an
   update of the EHR's own record, idempotent too); pulled writes themselves are never queued.
   A deletion is a conditional ``DELETE [type]?identifier=…``, sent only if the resource was sent
   to that EHR before.
4. **Record**: ``sent`` (with the EHR's Location and version) and an AuditEvent
   (``fhir_iop.audit.record(tx, access, "push", consents=[...])``) in one transaction. Errors:
   a 4xx other than 408/409/412/429 is permanent: ``dead`` at once, ``last_error`` the EHR's
   reason (its OperationOutcome text). Anything else (429, 5xx, 408/409/412, timeouts, connection
   errors, broken answers) is retried: ``pending`` again at ``now + min(backoff_max, backoff·2^(n-1))``
   with jitter (×0.5–1.0), never earlier than the EHR's ``Retry-After``; after ``max_attempts``
   attempts the message is ``dead``. :func:`replay` puts dead letters back to ``pending``.

Options per connection (``push:`` in the connections file): ``batch`` (50), ``max_attempts`` (8),
``lease`` (seconds, 300: longer than one message's send takes, retries and timeouts included),
``backoff`` (10 s), ``backoff_max`` (3600 s). The EhrClient retries quick transient failures itself
(``retries:`` of the connection) within one attempt.

Logs and ``last_error`` name connection, resource type and id, status and the EHR's reason; never
a body or an identifier value.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import orjson
from sqlalchemy import and_, exists, func, insert, or_, select, update

from fhir_iop.security.access import Access
from fhir_iop.store.models import sync_outbox, sync_run
from fhir_iop.store.repository import now
from fhir_iop.sync.outbox import DEAD, INFLIGHT, PENDING, SENT, STATES, WITHHELD, reopen_withheld_before

log = logging.getLogger(__name__)

#: 4xx statuses that are worth trying again (timeout, conflict, precondition, throttling)
RETRYABLE_4XX = frozenset({408, 409, 412, 429})
URI_SYSTEM = "urn:ietf:rfc:3986"
_UUID_LEN = 36


@dataclass(frozen=True)
class Options:
    batch: int = 50
    max_attempts: int = 8
    lease: float = 300.0
    backoff: float = 10.0
    backoff_max: float = 3600.0

    @classmethod
    def of(cls, connection) -> Options:
        from fhir_iop.errors import ConfigError
        from fhir_iop.sync.config import duration
        raw = dict(getattr(connection, "push", None) or {})
        unknown = set(raw) - {"batch", "max_attempts", "lease", "backoff", "backoff_max"}
        if unknown:
            raise ConfigError(f"connections.{connection.name}.push: unknown key(s) {', '.join(sorted(unknown))}")
        where = f"connections.{connection.name}.push"
        try:
            o = cls(batch=int(raw.get("batch", 50)), max_attempts=int(raw.get("max_attempts", 8)),
                    lease=duration(raw.get("lease", 300), f"{where}.lease"),
                    backoff=duration(raw.get("backoff", 10), f"{where}.backoff"),
                    backoff_max=duration(raw.get("backoff_max", 3600), f"{where}.backoff_max"))
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: batch and max_attempts must be integers") from None
        if not 1 <= o.batch <= 1000 or not 1 <= o.max_attempts <= 100 or o.lease <= 0:
            raise ConfigError(f"{where}: batch must be 1-1000, max_attempts 1-100, lease positive")
        return o


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


#: the recipient of a connection that names none: an outside party no consent can name, so only
#: data that is not Part 2 data goes to it (an EHR is never "the program itself" by omission)
NO_RECIPIENT = "(no recipient configured)"


def access_for(connection) -> Access:
    """Who a push acts as: the connection's recipient and purpose (Part 2)."""
    return Access(client_id=f"sync:{connection.name}", recipient=connection.recipient or NO_RECIPIENT,
                  purpose=connection.purpose)


def permanent(status: int | None) -> bool:
    """A failure that trying again will not fix: a 4xx other than 408/409/412/429."""
    return status is not None and 400 <= status < 500 and status not in RETRYABLE_4XX


def delay(attempts: int, opts: Options, retry_after: float | None, rand: Callable[[], float] = random.random
          ) -> float:
    """Seconds before the next attempt: exponential backoff with jitter, at least ``Retry-After``."""
    base = min(opts.backoff_max, opts.backoff * 2 ** max(0, attempts - 1))
    wait = base * (0.5 + 0.5 * rand())
    return max(wait, retry_after or 0.0)


# -- what is sent --------------------------------------------------------------------------------

def _site_systems() -> tuple[str, ...]:
    from fhir_iop.settings import load_settings
    return tuple(load_settings(None).identifier_systems.model_dump().values())


def _uuid_identifier(rid: str) -> dict | None:
    try:
        return {"system": URI_SYSTEM, "value": f"urn:uuid:{uuid.UUID(rid)}"} if len(rid) == _UUID_LEN else None
    except ValueError:
        return None


def identifier_of(res: dict, rid: str | None = None) -> dict | None:
    """The identifier the EHR knows this resource by (see the module docstring), or None."""
    idents = res.get("identifier")
    idents = [idents] if isinstance(idents, dict) else (idents or [])
    systems = _site_systems()
    for ident in idents:
        if isinstance(ident, dict) and ident.get("system") in systems and ident.get("value"):
            return {"system": ident["system"], "value": ident["value"]}
    return _uuid_identifier(rid or res.get("id") or "")


def _logical(ref: dict, resolve=None) -> dict:
    target = ref.get("reference")
    if not isinstance(target, str) or target.startswith(("#", "urn:", "http://", "https://")):
        return ref
    parts = target.split("/")
    if len(parts) != 2:
        return ref
    remote = resolve(parts[0], parts[1]) if resolve else None
    if remote:  # a resource pulled from this EHR: its own reference there
        return {**ref, "reference": f"{parts[0]}/{remote}"}
    ident = ref.get("identifier") if isinstance(ref.get("identifier"), dict) else _uuid_identifier(parts[1])
    if ident is None:
        return ref
    out = {k: v for k, v in ref.items() if k != "reference"}
    out["type"], out["identifier"] = parts[0], ident
    return out


def _rewrite(value, resolve=None):
    if isinstance(value, dict):
        if "reference" in value and isinstance(value.get("reference"), str):
            value = _logical(value, resolve)
        return {k: _rewrite(v, resolve) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, resolve) for v in value]
    return value


def remote_id(res: dict | None, connection) -> str | None:
    """The EHR's id of a resource pulled from that EHR (the identifier ``fhir_iop.sync.pull`` gives
    it: system ``<base_url>/<type>``), or None."""
    from fhir_iop.sync.pull import remote_system
    if not res:
        return None
    system = remote_system(connection, res.get("resourceType"))
    idents = res.get("identifier")
    for i in [idents] if isinstance(idents, dict) else (idents or ()):
        if isinstance(i, dict) and i.get("system") == system and i.get("value"):
            return i["value"]
    return None


def outgoing(res: dict, ident: dict | None, resolve=None, remote: str | None = None) -> dict:
    """The copy of a (marked) resource that goes to the EHR: references resolved by ``resolve(type,
    id) -> the EHR's id`` where the target came from that EHR, else by identifier. ``remote``: the
    resource itself came from that EHR: it goes back under the EHR's id (no identifier added)."""
    out = _rewrite({k: v for k, v in res.items() if k not in ("id", "meta")}, resolve)
    if remote is not None:
        meta = {k: v for k, v in (res.get("meta") or {}).items() if k not in ("versionId", "lastUpdated", "source")}
        return {"resourceType": res["resourceType"], "id": remote, **({"meta": meta} if meta else {}),
                **{k: v for k, v in out.items() if k != "resourceType"}}
    meta = {k: v for k, v in (res.get("meta") or {}).items() if k not in ("versionId", "lastUpdated", "source")}
    if meta:
        out["meta"] = meta
    idents = res.get("identifier")
    if isinstance(idents, list) and not any(i.get("system") == ident["system"] and i.get("value") == ident["value"]
                                            for i in idents if isinstance(i, dict)):
        out["identifier"] = [*idents, ident]
    elif idents is None and res.get("resourceType") not in _SINGLE_IDENTIFIER:
        out["identifier"] = [ident]
    return {"resourceType": res["resourceType"], **{k: v for k, v in out.items() if k != "resourceType"}}


#: R4 types whose ``identifier`` is 0..1 (not a list)
_SINGLE_IDENTIFIER = frozenset({"QuestionnaireResponse", "Bundle"})


# -- the outbox ------------------------------------------------------------------------------------

def claim(store, connection: str, worker: str, batch: int, lease: float, at: datetime | None = None) -> list:
    """Claim up to ``batch`` due messages of ``connection`` for ``worker`` (see the module docstring)."""
    at = at or now()
    o, o2 = sync_outbox, sync_outbox.alias("busy")
    due = or_(and_(o.c.state == PENDING, o.c.next_attempt_at <= at),
              and_(o.c.state == INFLIGHT, o.c.lease_expires <= at))
    busy = exists().where(o2.c.connection == o.c.connection, o2.c.resource_type == o.c.resource_type,
                          o2.c.resource_id == o.c.resource_id, o2.c.state == INFLIGHT, o2.c.lease_expires > at,
                          o2.c.id != o.c.id)
    pick = select(o.c.id).where(o.c.connection == connection, due, ~busy).order_by(o.c.id).limit(batch) \
        .with_for_update(skip_locked=True)
    with store.transaction() as tx:
        ids = [r.id for r in tx.conn.execute(pick)]
        if not ids:
            return []
        tx.conn.execute(update(o).where(o.c.id.in_(ids)).values(
            state=INFLIGHT, lease_owner=worker, lease_expires=at + timedelta(seconds=lease), updated_at=at))
        return list(tx.conn.execute(select(o).where(o.c.id.in_(ids)).order_by(o.c.id)))


def _finish(tx, msg, worker: str, **values) -> bool:
    """Record a message's outcome, if the worker still holds it (False: the lease went to another)."""
    done = tx.conn.execute(update(sync_outbox).where(sync_outbox.c.id == msg.id, sync_outbox.c.state == INFLIGHT,
                                                     sync_outbox.c.lease_owner == worker)
                           .values(lease_owner=None, lease_expires=None, updated_at=now(), **values))
    return done.rowcount == 1


def _renew(store, msg, worker: str, lease: float, at: datetime | None = None) -> bool:
    """Extend the lease of one claimed message just before it is sent (False: no longer ours).
    So a message is held ``lease`` seconds from its own send, however long its batch took."""
    t = at or now()
    with store.transaction() as tx:
        done = tx.conn.execute(update(sync_outbox).where(
            sync_outbox.c.id == msg.id, sync_outbox.c.state == INFLIGHT, sync_outbox.c.lease_owner == worker)
            .values(lease_expires=t + timedelta(seconds=lease)))
        return done.rowcount == 1


def _was_sent(conn, msg) -> bool:
    o = sync_outbox.c
    return conn.execute(select(o.id).where(o.connection == msg.connection, o.resource_type == msg.resource_type,
                                           o.resource_id == msg.resource_id, o.state == SENT, o.operation == "PUT")
                        .limit(1)).first() is not None


@dataclass
class Prepared:
    """What to do for one message: ``body``/``identifier`` to send, or a ``verdict`` without sending."""
    body: dict | None = None
    identifier: dict | None = None
    remote: str | None = None  # the EHR's id, for a resource pulled from that EHR
    decision: object = None
    patient: str | None = None
    verdict: str | None = None  # withheld, dead, skip
    reason: str | None = None


def prepare(store, connection, msg) -> Prepared:
    """Read the message's version and ask the Part 2 gate (no HTTP, no write)."""
    from fhir_iop.disclosure import Gate, labelled, mark, patient_of
    from fhir_iop.store.errors import StoreError
    access = access_for(connection)
    rt, rid = msg.resource_type, msg.resource_id
    with store.reading() as tx:
        if msg.operation == "DELETE":
            if not _was_sent(tx.conn, msg):
                return Prepared(verdict="skip", reason="deleted before it was ever sent: nothing to delete")
            prior = _last_body(tx, rt, rid, msg.version_id)
            remote = remote_id(prior, connection)
            ident = identifier_of(prior, rid) if prior else _uuid_identifier(rid)
            if ident is None and remote is None:
                return Prepared(verdict="dead", reason=f"{rt}/{rid} has no identifier to delete it by on the EHR")
            return Prepared(identifier=ident, remote=remote, patient=patient_of(prior) if prior else None)
        try:
            stored = tx.vread(rt, rid, str(msg.version_id))
        except StoreError as e:
            return Prepared(verdict="dead", reason=f"{rt}/{rid} version {msg.version_id} cannot be read: {e.code}")
        res = stored.resource
        decision = Gate(tx, access).decide(stored)
        if not decision.allowed:
            why = (f"no consent of the patient covers recipient {connection.recipient} for {connection.purpose}"
                   if connection.recipient else "the connection names no Part 2 recipient (recipient:), so only "
                                                "data that is not Part 2 data goes to it")
            return Prepared(verdict="withheld", decision=decision,
                            reason=f"withheld by the Part 2 gate ({decision.reason}): {why}")
        remote = remote_id(res, connection)
        ident = identifier_of(res, rid)
        if ident is None and remote is None:
            return Prepared(verdict="dead", reason=f"{rt}/{rid} has no IOP identifier and no UUID id to update by")
        if decision.reason != "not labelled" or labelled(res):
            res = mark(res)
        body = outgoing(res, ident, _resolver(tx, connection), remote)
        return Prepared(body=body, identifier=ident, remote=remote, decision=decision, patient=patient_of(res))


def _resolver(tx, connection):
    """``(type, id) -> the EHR's id`` for references to resources pulled from ``connection``."""
    from fhir_iop.store.errors import StoreError
    cache: dict[tuple[str, str], str | None] = {}

    def resolve(rt: str, rid: str) -> str | None:
        if (rt, rid) not in cache:
            try:
                cache[(rt, rid)] = remote_id(tx.read(rt, rid).resource, connection)
            except StoreError:
                cache[(rt, rid)] = None
        return cache[(rt, rid)]
    return resolve


def _last_body(tx, rt: str, rid: str, deleted_version: int) -> dict | None:
    from fhir_iop.store.errors import StoreError
    for vid in range(deleted_version - 1, 0, -1):
        try:
            return tx.vread(rt, rid, str(vid)).resource
        except StoreError:
            continue
    return None


_PHI_KEYS = frozenset({"family", "given", "text", "birthDate", "display", "line", "postalCode"})


def _phi_strings(value, out: set, key: str | None = None, in_identifier: bool = False) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _phi_strings(v, out, k, in_identifier or k in ("identifier", "valueIdentifier"))
    elif isinstance(value, list):
        for v in value:
            _phi_strings(v, out, key, in_identifier)
    elif isinstance(value, str) and len(value) >= 3 and (key in _PHI_KEYS or (in_identifier and key == "value")):
        out.add(value)


def scrub(message: str, body: dict | None, identifier: dict | None = None) -> str:
    """The EHR's error text without the identifier values, names, birth dates, addresses and
    displays of what was sent (an EHR may echo them: ``last_error`` keeps ids and reasons only)."""
    found: set[str] = set()
    _phi_strings(body or {}, found)
    if identifier and identifier.get("value"):
        found.add(identifier["value"])
    for value in sorted(found, key=len, reverse=True):
        message = message.replace(value, "[…]")
    return message


def send_one(store, connection, client, msg, worker: str, opts: Options, at: datetime | None = None) -> str:
    """Process one claimed message; its new state (sent, pending, dead, withheld) or ``lost`` (lease gone)."""
    from fhir_iop.audit import record
    from fhir_iop.sync.client import EhrError
    rt, rid = msg.resource_type, msg.resource_id
    if not _renew(store, msg, worker, opts.lease, at):
        return "lost"  # the batch took longer than the lease and another worker has it now
    prep = prepare(store, connection, msg)
    if prep.verdict:
        state = {"withheld": WITHHELD, "dead": DEAD, "skip": SENT}[prep.verdict]
        with store.transaction() as tx:
            ok = _finish(tx, msg, worker, state=state, last_error=prep.reason,
                         sent_at=(at or now()) if state == SENT else None)
        log.info("sync %s: %s %s/%s: %s", connection.name, msg.operation, rt, rid, prep.verdict)
        return state if ok else "lost"
    attempts = msg.attempts + 1
    try:
        if msg.operation == "DELETE":
            if prep.remote is not None:
                status = client.delete(rt, prep.remote)
            else:
                status = client.delete(rt, params={"identifier": f"{prep.identifier['system']}|{prep.identifier['value']}"})
            location = version = None
        elif prep.remote is not None:  # pulled from this EHR, changed here: an update of its own record
            status, location, version = client.update(prep.body)
        else:
            status, location, version = client.conditional_update(prep.body, prep.identifier)
    except EhrError as e:
        transient = not permanent(e.status)  # no answer, 5xx, 408/409/412/429, a broken answer
        reason = scrub(e.message, prep.body, prep.identifier)[:2000]
        if not transient or attempts >= opts.max_attempts:
            values = dict(state=DEAD, attempts=attempts, last_error=reason)
            verdict = DEAD
        else:
            wait = delay(attempts, opts, e.retry_after)
            values = dict(state=PENDING, attempts=attempts, last_error=reason,
                          next_attempt_at=(at or now()) + timedelta(seconds=wait))
            verdict = PENDING
        with store.transaction() as tx:
            ok = _finish(tx, msg, worker, **values)
        log.warning("sync %s: %s %s/%s attempt %d: %s -> %s", connection.name, msg.operation, rt, rid, attempts,
                    e.status or "no answer", verdict)
        return verdict if ok else "lost"
    access = access_for(connection)
    with store.transaction() as tx:
        ok = _finish(tx, msg, worker, state=SENT, attempts=attempts, last_error=None, sent_at=at or now(),
                     remote_location=(location or "")[:512] or None, remote_version=(version or "")[:64] or None,
                     consent=getattr(prep.decision, "consent", None))
        consent = getattr(prep.decision, "consent", None)
        record(tx, access, "push", 0, entities=[f"{rt}/{rid}"],
               patients=[f"Patient/{prep.patient}"] if prep.patient else [],
               consents=[consent] if consent else [],
               description=f"{msg.operation} to EHR connection {connection.name} (HTTP {status})")
    log.info("sync %s: %s %s/%s -> HTTP %s", connection.name, msg.operation, rt, rid, status)
    return SENT if ok else "lost"


def push(store, connection, client=None, worker: str | None = None, limit: int | None = None,
         at: Callable[[], datetime] = now) -> Counter:
    """Send every due message of ``connection`` (batch after batch, until none is due or ``limit``
    messages were handled); counts per outcome. One ``sync_run`` row records the run (none when
    nothing was due)."""
    from fhir_iop.sync.client import EhrClient
    opts = Options.of(connection)
    worker = worker or worker_id()
    counts: Counter = Counter()
    own = client is None
    client = client or EhrClient(connection)
    run_id = None  # a run is recorded once it has something to do (an idle loop writes nothing)
    last_error = None
    reopen_withheld_before(store, connection.name, at())  # a new day: a consent may have come into force
    try:
        while limit is None or sum(counts.values()) < limit:
            batch = opts.batch if limit is None else min(opts.batch, limit - sum(counts.values()))
            msgs = claim(store, connection.name, worker, batch, opts.lease, at())
            if not msgs:
                break
            if run_id is None:
                run_id = _run_start(store, connection.name, "push", worker)
            for msg in msgs:
                outcome = send_one(store, connection, client, msg, worker, opts, at())
                counts[outcome] += 1
                if outcome in (DEAD, PENDING, WITHHELD):
                    last_error = f"{msg.resource_type}/{msg.resource_id}: {_last_error(store, msg.id)}"
    except Exception as e:
        last_error = f"{type(e).__name__}: {e}"[:2000]
        raise
    finally:
        if run_id is not None:
            _run_end(store, run_id, counts, last_error)
        if own:
            client.close()
    return counts


def _last_error(store, msg_id: int) -> str | None:
    with store.reading() as tx:
        return tx.conn.execute(select(sync_outbox.c.last_error).where(sync_outbox.c.id == msg_id)).scalar()


def _run_start(store, connection: str, direction: str, worker: str) -> int:
    with store.transaction() as tx:
        return tx.conn.execute(insert(sync_run).values(connection=connection, direction=direction, worker=worker,
                                                       started_at=now())).inserted_primary_key[0]


def _run_end(store, run_id: int, counts: Counter, last_error: str | None) -> None:
    with store.transaction() as tx:
        tx.conn.execute(update(sync_run).where(sync_run.c.id == run_id).values(
            ended_at=now(), counts=orjson.dumps(dict(counts)).decode(), last_error=last_error))


# -- operations on the outbox -----------------------------------------------------------------------

def replay(store, connection: str | None = None, ids=None, states=(DEAD,)) -> int:
    """Dead letters (or withheld messages) back to ``pending``, due now, attempts reset; how many."""
    o = sync_outbox.c
    stmt = update(sync_outbox).where(o.state.in_(tuple(states)))
    if connection:
        stmt = stmt.where(o.connection == connection)
    if ids:
        stmt = stmt.where(o.id.in_([int(i) for i in ids]))
    t = now()
    with store.transaction() as tx:
        return tx.conn.execute(stmt.values(state=PENDING, attempts=0, next_attempt_at=t, updated_at=t,
                                           lease_owner=None, lease_expires=None)).rowcount


def counts(store, connection: str | None = None) -> dict[str, dict[str, int]]:
    """Messages per connection and state."""
    o = sync_outbox.c
    stmt = select(o.connection, o.state, func.count()).group_by(o.connection, o.state)
    if connection:
        stmt = stmt.where(o.connection == connection)
    out: dict[str, dict[str, int]] = {}
    with store.reading() as tx:
        for name, state, n in tx.conn.execute(stmt):
            out.setdefault(name, dict.fromkeys(STATES, 0))[state] = n
    return out


def dead_letters(store, connection: str | None = None, limit: int = 100) -> list[dict]:
    o = sync_outbox.c
    stmt = select(sync_outbox).where(o.state == DEAD).order_by(o.id).limit(limit)
    if connection:
        stmt = stmt.where(o.connection == connection)
    with store.reading() as tx:
        return [{"id": r.id, "connection": r.connection, "resource": f"{r.resource_type}/{r.resource_id}",
                 "version": r.version_id, "operation": r.operation, "attempts": r.attempts,
                 "error": r.last_error, "updated": r.updated_at.isoformat() + "Z"} for r in tx.conn.execute(stmt)]


def status(store, connections: dict | None = None, connection: str | None = None, dead_limit: int = 20) -> dict:
    """Per connection: message counts per state, pull cursors and bulk job state per type, the last
    run of each direction (start, end, counts, last error), the oldest dead letters. Connections
    that appear only in the store (no longer configured) are listed too."""
    from fhir_iop.store.models import sync_state
    per_state = counts(store, connection)
    names = set(per_state) | set(connections or {})
    with store.reading() as tx:
        states = list(tx.conn.execute(select(sync_state).order_by(sync_state.c.connection, sync_state.c.resource_type)))
        runs = list(tx.conn.execute(select(sync_run).where(
            sync_run.c.id.in_(select(func.max(sync_run.c.id)).group_by(sync_run.c.connection, sync_run.c.direction)))))
    names |= {s.connection for s in states} | {r.connection for r in runs}
    if connection:
        names &= {connection}
    out = {}
    for name in sorted(names):
        conn = (connections or {}).get(name)
        out[name] = {
            "configured": conn is not None,
            "push_types": list(conn.push_types) if conn else [],
            "pull_types": list(conn.pull_types) if conn else [],
            "messages": per_state.get(name, dict.fromkeys(STATES, 0)),
            "cursors": {s.resource_type: {"cursor": s.cursor, "next": bool(s.next_url),
                                          "bulk": s.bulk_state, "updated": s.updated_at.isoformat() + "Z"}
                        for s in states if s.connection == name},
            "runs": {r.direction: {"started": r.started_at.isoformat() + "Z",
                                   "ended": r.ended_at.isoformat() + "Z" if r.ended_at else None,
                                   "counts": orjson.loads(r.counts) if r.counts else None,
                                   "last_error": r.last_error}
                     for r in runs if r.connection == name},
            "dead_letters": dead_letters(store, name, dead_limit),
        }
    return out
