"""The transactional outbox: every change to push to an EHR is queued in the transaction that makes it.

A store write hook (``fhir_iop.store.repository.WRITE_HOOKS``) runs inside the writing transaction
after each create, update and delete. For a resource type that some connection pushes (``resources:
{Encounter: push}`` in the connections file), it writes one ``sync_outbox`` row per connection, so
the message commits or rolls back with the resource itself: nothing is lost between "stored" and
"queued", and a rolled-back write queues nothing.

* **No echo**: writes whose ``tx.origin`` starts with ``"sync:"`` (pulled from an EHR) are not queued.
* **Coalescing**: one waiting message per resource and connection. A later write of the same
  resource rewrites the waiting (``pending`` or ``withheld``) message to the newest version and
  operation, so a resource changed ten times before the worker runs is sent once. A message
  already claimed by a worker (``inflight``) is left alone and a new one is queued behind it;
  workers never claim a resource's message while another of the same resource is in flight, so the
  EHR always ends with the newest version.
* **Withheld messages** (the Part 2 gate refused them at send time) are re-evaluated when a Consent
  is written (any Consent, by any origin: all withheld messages go back to ``pending``, cheap
  through the state index; the gate decides again when they are claimed), by ``replay``, and once
  a day (:func:`reopen_withheld_before`, at the start of each push run): a consent written with a
  future start date lets them go on the day it comes into force.
* Configuration: :func:`configure` with the connections (the CLI and the server do that), else
  the file named by ``FHIR_IOP_SYNC_CONFIG``, loaded once. With no connection that pushes, the hook
  returns after one dictionary lookup.

Unchanged writes (a PUT of identical content) do not call the hooks, so loading the same files
again queues nothing. What was stored before a connection existed is queued by :func:`backfill`
(``fhir-iop sync enqueue``). The hook is registered when this module is imported: by the server
(``server/routes/sync.py``), by every ``fhir-iop`` command that opens the store, and by the sync
modules.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, time

from sqlalchemy import and_, insert, select, update

from fhir_iop.store.models import resource, sync_outbox
from fhir_iop.store.repository import WRITE_HOOKS, now

ENV = "FHIR_IOP_SYNC_CONFIG"
#: message states
PENDING, INFLIGHT, SENT, DEAD, WITHHELD = "pending", "inflight", "sent", "dead", "withheld"
STATES = (PENDING, INFLIGHT, SENT, DEAD, WITHHELD)
WAITING = (PENDING, WITHHELD)


@dataclass(frozen=True)
class Targets:
    """Which connections push which resource types: ``by_type[type] -> (connection names)``."""
    by_type: dict

    @classmethod
    def of(cls, connections: dict) -> Targets:
        by_type: dict[str, list[str]] = {}
        for name, conn in (connections or {}).items():
            for rt in conn.push_types:
                by_type.setdefault(rt, []).append(name)
        return cls({t: tuple(sorted(ns)) for t, ns in by_type.items()})


_lock = threading.Lock()
_connections: dict | None = None
_targets: Targets | None = None


def configure(connections: dict | None) -> None:
    """Set the connections the hook queues for (None: read ``FHIR_IOP_SYNC_CONFIG`` again on next use)."""
    global _connections, _targets
    with _lock:
        _connections = connections
        _targets = Targets.of(connections) if connections is not None else None


def connections() -> dict:
    """The configured connections (``{}`` when none)."""
    global _connections, _targets
    if _targets is None:
        with _lock:
            if _targets is None:
                path = os.environ.get(ENV)
                if path:
                    from fhir_iop.sync.config import load
                    _connections = load(path)
                else:
                    _connections = {}
                _targets = Targets.of(_connections)
    return _connections


def targets() -> Targets:
    if _targets is None:
        connections()
    return _targets


def enqueue(conn, connection: str, rt: str, rid: str, version_id: int, operation: str) -> None:
    """Queue (or coalesce into the waiting message) one change of ``rt/rid`` for ``connection``."""
    t = now()
    waiting = and_(sync_outbox.c.connection == connection, sync_outbox.c.resource_type == rt,
                   sync_outbox.c.resource_id == rid, sync_outbox.c.state.in_(WAITING))
    row = conn.execute(select(sync_outbox.c.id, sync_outbox.c.state).where(waiting)
                       .order_by(sync_outbox.c.id).limit(1)).first()
    if row is not None:
        values = dict(version_id=version_id, operation=operation, state=PENDING, updated_at=t)
        if row.state == WITHHELD:  # a new version deserves a new decision now
            values.update(next_attempt_at=t, attempts=0, last_error=None)
        conn.execute(update(sync_outbox).where(sync_outbox.c.id == row.id).values(**values))
        return
    conn.execute(insert(sync_outbox).values(
        connection=connection, resource_type=rt, resource_id=rid, version_id=version_id, operation=operation,
        state=PENDING, attempts=0, next_attempt_at=t, created_at=t, updated_at=t))


def reopen_withheld(conn, connection: str | None = None) -> int:
    """Withheld messages back to pending (a consent changed): the gate decides again."""
    stmt = update(sync_outbox).where(sync_outbox.c.state == WITHHELD)
    if connection:
        stmt = stmt.where(sync_outbox.c.connection == connection)
    t = now()
    return conn.execute(stmt.values(state=PENDING, next_attempt_at=t, updated_at=t)).rowcount


def reopen_withheld_before(store, connection: str, at: datetime) -> int:
    """Withheld messages of ``connection`` last decided before the site's day of ``at`` (UTC) go back
    to pending, so the gate decides them again on each new day: a grant that starts today lets them
    go; one still refused is withheld again and waits for the next day (or the next Consent write).
    At most one decision per message per day; a read first, so a run with nothing to reopen writes
    nothing."""
    from fhir_iop.disclosure.gate import site_timezone
    tz = site_timezone()
    day = at.replace(tzinfo=UTC).astimezone(tz).date()
    day_start = datetime.combine(day, time.min, tzinfo=tz).astimezone(UTC).replace(tzinfo=None)
    stale = and_(sync_outbox.c.connection == connection, sync_outbox.c.state == WITHHELD,
                 sync_outbox.c.updated_at < day_start)
    with store.reading() as tx:
        if tx.conn.execute(select(sync_outbox.c.id).where(stale).limit(1)).first() is None:
            return 0
    with store.transaction() as tx:
        return tx.conn.execute(update(sync_outbox).where(stale)
                               .values(state=PENDING, next_attempt_at=at, updated_at=at)).rowcount


def hook(tx, rid_pk: int, rt: str, rid: str, res: dict | None) -> None:
    """The write hook (see the module docstring)."""
    by_type = targets().by_type
    if not by_type:
        return
    names = by_type.get(rt)
    if rt == "Consent":
        reopen_withheld(tx.conn)
    if not names or (tx.origin or "").startswith("sync:"):
        return
    version_id = tx.conn.execute(select(resource.c.version_id).where(resource.c.rid == rid_pk)).scalar_one()
    operation = "DELETE" if res is None else "PUT"
    for name in names:
        enqueue(tx.conn, name, rt, rid, version_id, operation)


def register() -> None:
    """Put the hook in ``WRITE_HOOKS`` (once). Importing this module does it."""
    if hook not in WRITE_HOOKS:
        WRITE_HOOKS.append(hook)


register()


def backfill(store, connection, types=None, batch: int = 500) -> int:
    """Queue the current version of every stored resource of the types ``connection`` pushes (or
    ``types``) that it has not been sent yet: for a connection added to a store that has data, or
    after an EHR lost records. Resources pulled from a configured EHR (they carry its
    ``<base_url>/<type>`` identifier) are left out; waiting messages are coalesced as usual. How many
    messages were queued or refreshed."""
    from fhir_iop.store.models import resource as res_table
    from fhir_iop.sync.pull import remote_system
    wanted = [t for t in (types or connection.push_types) if t in connection.push_types]
    pulled_systems = {remote_system(c, t) for c in (connections() or {connection.name: connection}).values()
                      for t in wanted} | {remote_system(connection, t) for t in wanted}
    o = sync_outbox.c
    n = 0
    for rt in wanted:
        last = 0
        while True:
            with store.transaction() as tx:
                rows = list(tx.conn.execute(select(res_table.c.rid, res_table.c.id, res_table.c.version_id,
                                                   res_table.c.body)
                                            .where(res_table.c.type == rt, res_table.c.deleted.is_(False),
                                                   res_table.c.rid > last)
                                            .order_by(res_table.c.rid).limit(batch)))
                if not rows:
                    break
                last = rows[-1].rid
                sent = {(r.resource_id, r.version_id) for r in tx.conn.execute(
                    select(o.resource_id, o.version_id).where(o.connection == connection.name, o.resource_type == rt,
                                                              o.state == SENT, o.operation == "PUT",
                                                              o.resource_id.in_([r.id for r in rows])))}
                for r in rows:
                    if (r.id, r.version_id) in sent or _pulled(r.body, pulled_systems):
                        continue
                    enqueue(tx.conn, connection.name, rt, r.id, r.version_id, "PUT")
                    n += 1
    return n


def _pulled(body: str, systems: set) -> bool:
    import orjson
    idents = orjson.loads(body).get("identifier")
    return any(isinstance(i, dict) and i.get("system") in systems
               for i in ([idents] if isinstance(idents, dict) else idents or ()))
