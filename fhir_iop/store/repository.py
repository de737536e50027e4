"""The FHIR store: versioned resources, history and search over SQLAlchemy Core.

``Store.transaction()`` gives a :class:`Tx`: every interaction on it runs in one database
transaction that commits when the block ends and rolls back if it raises, so a FHIR transaction
Bundle is atomic. Each write structure-validates the resource (fhir.resources R4B), stamps
``meta.versionId``/``meta.lastUpdated``, keeps the version in ``resource_version`` and rewrites the
resource's search index rows.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple
from urllib.parse import parse_qsl

import orjson
from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from fhir_iop.fhir import r4
from fhir_iop.store import search
from fhir_iop.store.engine import WRITE, autocommit, make_engine, upgrade
from fhir_iop.store.errors import Conflict, Gone, Invalid, NotFound, PreconditionFailed
from fhir_iop.store.models import INDEX_TABLES, resource, resource_version
from fhir_iop.store.params import RESOURCE_TYPES, Registry, index_rows, load_registry
from fhir_iop.store.readers import HeldReaders

ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_TABLES = {"token": INDEX_TABLES["token"], "string": INDEX_TABLES["string"], "date": INDEX_TABLES["date"],
           "reference": INDEX_TABLES["reference"], "quantity": INDEX_TABLES["quantity"]}


@dataclass(frozen=True)
class Stored:
    """One version of a resource as stored; ``body`` is its JSON text (None once deleted)."""
    type: str
    id: str
    version_id: int
    last_updated: datetime  # UTC, naive
    deleted: bool
    body: str | None
    method: str | None = None

    @property
    def resource(self) -> dict:
        return orjson.loads(self.body)


@dataclass(frozen=True)
class Written:
    """The outcome of a write: ``created`` (201), ``updated`` or ``unchanged`` (200), ``deleted``."""
    stored: Stored
    outcome: str


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def instant(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


def check_type(rt: str) -> None:
    if rt not in RESOURCE_TYPES:
        raise NotFound(f"resource type {rt!r} is not supported here (supported: {', '.join(RESOURCE_TYPES)})")


def check_id(rid: str) -> None:
    if not ID.match(rid or ""):
        raise Invalid(f"{rid!r} is not a valid resource id ([A-Za-z0-9-.], 1-64 characters)", status=400)


def _content(res: dict) -> dict:
    """The resource without the server-stamped meta, to tell a no-op update."""
    out = dict(res)
    meta = {k: v for k, v in (res.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    if meta:
        out["meta"] = meta
    else:
        out.pop("meta", None)
    return out


def structure_issues(res: dict) -> list[dict]:
    """OperationOutcome issues for what fhir.resources (R4B models) finds structurally wrong."""
    rt = str(res.get("resourceType"))
    return [{"severity": "error", "code": "structure", "diagnostics": msg,
             "expression": [loc if loc.startswith(rt) else f"{rt}.{loc}"]}
            for loc, msg in r4.structure_errors(res)]


#: called in the writing transaction after each write as ``hook(tx, rid_pk, type, id, resource_or_None)``
#: (None: deleted); ``tx.origin`` tells where the write came from. Modules that keep tables derived
#: from resources (the Part 2 access index, the sync outbox) register here, so what they derive
#: commits or rolls back with the resource itself.
WRITE_HOOKS: list = []


def _part2_index(tx, rid_pk, rt, rid, res) -> None:
    """The Part 2 access index (fhir_iop.disclosure) is kept with every write, whoever writes."""
    from fhir_iop.disclosure.index import hook
    hook(tx, rid_pk, rt, rid, res)


WRITE_HOOKS.append(_part2_index)

_CURRENT = select(resource).where(resource.c.type == bindparam("t"), resource.c.id == bindparam("i"))
_CURRENT_LOCKED = _CURRENT.with_for_update()


class CurrentRow(NamedTuple):
    """The current row of a resource, as :meth:`Tx._current` reads it."""
    rid: int
    version_id: int
    last_updated: datetime
    deleted: bool
    body: str | None


#: the read of one current resource, the facade's hottest statement, sent on the DBAPI cursor of the
#: SQLAlchemy connection (SQLAlchemy's documented "working with the DBAPI cursor directly"): the same
#: statement as ``_CURRENT``, without the per-statement execution and result machinery
#: (tests/test_store_schema.py compares both); the driver's own parameter style
_CURRENT_SQL = {
    "sqlite": "SELECT rid, version_id, last_updated, deleted, body FROM resource WHERE type = ? AND id = ?",
    "postgresql": "SELECT rid, version_id, last_updated, deleted, body FROM resource WHERE type = %s AND id = %s",
}


class Store:
    def __init__(self, url: str, registry: Registry | None = None, migrate: bool = True, read_cache_mb: float = 0,
                 **engine_kwargs):
        self.url = url
        self.engine = make_engine(url, **engine_kwargs)
        self._reader = autocommit(self.engine, **engine_kwargs)
        #: the reader connection each thread keeps between reads (fhir_iop.store.readers)
        self._held = HeldReaders(self._reader)
        self.registry = registry or load_registry()
        #: called (in order) by ``dispose`` before the engine goes: what still has to reach the store
        #: (the facade's audit spool) gets there first
        self.on_dispose: list = []
        if migrate:
            upgrade(self.engine)
        #: current rows kept in this process (PostgreSQL only, ``read_cache_mb`` > 0; fhir_iop.store.cache)
        self.cache = None
        if read_cache_mb > 0 and self.engine.dialect.name == "postgresql":
            from fhir_iop.store.cache import ReadCache
            self.cache = ReadCache(self._reader, int(read_cache_mb * 1024 * 1024))

    def dispose(self) -> None:
        while self.on_dispose:
            self.on_dispose.pop(0)()
        self._held.close()
        if self.cache is not None:
            self.cache.close()
        if self.engine.dialect.name != "sqlite":  # the readers' own pool (engine.autocommit)
            self._reader.dispose()
        self.engine.dispose()

    @contextmanager
    def transaction(self, origin: str | None = None) -> Iterator[Tx]:
        """A write transaction: commits at the end of the block, rolls back on an exception.

        ``origin`` says where what is written comes from (None: this program, its files and API
        clients; ``"sync:<connection>"``: pulled from an EHR), for the write hooks."""
        with self.engine.connect().execution_options(**WRITE) as conn:
            with conn.begin():
                tx = Tx(conn, self.registry, origin=origin)
                yield tx
            if self.cache is not None and tx.written:  # committed: this process reads its own writes
                self.cache.drop(tx.written)

    @contextmanager
    def reading(self, snapshot: bool = False) -> Iterator[Tx]:
        """Reads: each statement in autocommit mode, on the calling thread's reader connection
        (``fhir_iop.store.readers``), or all in one read transaction (``snapshot``; needed to stream
        with a server-side cursor)."""
        if snapshot:
            with self.engine.connect() as conn, conn.begin():
                yield Tx(conn, self.registry, read_only=True)
            return
        conn, held = self._held.connection()
        try:
            yield Tx(conn, self.registry, read_only=True, cache=self.cache)
        except DBAPIError:
            if held:  # the connection's state is unknown: the next read gets a fresh one
                self._held.drop()
            raise
        finally:
            if not held:
                conn.close()


class Tx:
    """The interactions, inside one database transaction."""

    def __init__(self, conn, registry: Registry, read_only: bool = False, origin: str | None = None, cache=None):
        self.conn, self.registry, self.read_only, self.origin = conn, registry, read_only, origin
        #: the store's read cache, for current reads outside write transactions (None: the database)
        self.cache = cache
        #: (type, id) of what this transaction wrote
        self.written: set[tuple[str, str]] = set()
        #: the Part 2 gate of whoever this transaction serves (``fhir_iop.disclosure.Gate``; None: the
        #: program itself). Every read path sees only what it lets go: a withheld resource is
        #: reported exactly like a missing one, and counts, pages and includes leave it out.
        self.gate = None

    # -- reads ------------------------------------------------------------------------------------

    def visible(self, table):
        """The gate's SQL condition on ``table`` (anything with a ``rid`` column), or None."""
        g = self.gate
        if g is None or getattr(g, "unrestricted", False):
            return None
        return g.visible_clause(table)

    def _current(self, rt: str, rid: str, lock: bool = False):
        cache = self.cache
        if cache is not None and not lock and cache.usable():
            row, generation = cache.get(rt, rid)
            if row is None:
                row = self._current_row(rt, rid, lock)
                if row is not None:
                    cache.put(rt, rid, row, generation)
            return row
        return self._current_row(rt, rid, lock)

    def _current_row(self, rt: str, rid: str, lock: bool = False):
        sql = None if lock else _CURRENT_SQL.get(self.conn.dialect.name)
        if sql is None:
            return self.conn.execute(_CURRENT_LOCKED if lock else _CURRENT, {"t": rt, "i": rid}).first()
        dbapi_conn = self.conn.connection.dbapi_connection
        cur = dbapi_conn.cursor()
        try:
            cur.execute(sql, (rt, rid))
            row = cur.fetchone()
        except self.conn.dialect.dbapi.Error as e:
            # raised as SQLAlchemy raises its own, the connection invalidated when it is gone
            dialect = self.conn.dialect
            gone = dialect.is_disconnect(e, dbapi_conn, cur)
            if gone:
                self.conn.invalidate(e)
            raise DBAPIError.instance(sql, (rt, rid), e, dialect.dbapi.Error, connection_invalidated=gone,
                                      dialect=dialect) from e
        finally:
            cur.close()
        if row is None:
            return None
        pk, vid, when, deleted, body = row
        if isinstance(when, str):  # SQLite: SQLAlchemy's DateTime storage format, ISO 8601 with a space
            when = datetime.fromisoformat(when)
        return CurrentRow(pk, vid, when, bool(deleted), body)

    def _current_visible(self, rt: str, rid: str):
        """The current row if the gate lets this transaction see it (None: missing or withheld)."""
        cond = self.visible(resource)
        if cond is None:
            return self._current(rt, rid)
        return self.conn.execute(select(resource).where(resource.c.type == rt, resource.c.id == rid, cond)).first()

    def _sees(self, row) -> bool:
        cond = self.visible(resource)
        return cond is None or self.conn.execute(select(resource.c.rid).where(resource.c.rid == row.rid, cond)) \
            .first() is not None

    def read(self, rt: str, rid: str) -> Stored:
        check_type(rt)
        row = self._current_visible(rt, rid)
        if row is None:
            raise NotFound(f"{rt}/{rid} is not known")
        if row.deleted:
            raise Gone(f"{rt}/{rid} was deleted (version {row.version_id})")
        return Stored(rt, rid, row.version_id, row.last_updated, False, row.body)

    def vread(self, rt: str, rid: str, vid: str) -> Stored:
        check_type(rt)
        if not vid.isdigit() or int(vid) > 2 ** 31 - 1:  # (a version id past the column's range: none)
            raise NotFound(f"{rt}/{rid}/_history/{vid[:20]} is not known")
        stmt = select(resource_version).where(resource_version.c.type == rt, resource_version.c.id == rid,
                                              resource_version.c.version_id == int(vid))
        if (cond := self.visible(resource_version)) is not None:
            stmt = stmt.where(cond)
        row = self.conn.execute(stmt).first()
        if row is None:
            raise NotFound(f"{rt}/{rid}/_history/{vid} is not known")
        if row.deleted:
            raise Gone(f"{rt}/{rid} version {vid} is a deletion")
        return Stored(rt, rid, row.version_id, row.last_updated, False, row.body, row.method)

    def search(self, q: search.Query) -> search.SearchResult:
        check_type(q.type)
        return search.run(self.conn, q, self.registry, self.visible)

    def match(self, rt: str, query: str, limit: int = 2) -> list[Stored]:
        """Current resources matching a conditional-interaction query (unknown parameters are errors)."""
        check_type(rt)
        params = parse_qsl(query, keep_blank_values=True)
        if not params:
            raise Invalid("a conditional interaction needs search criteria", status=400)
        q = search.parse(self.registry, rt, params, strict=True)
        q.count, q.offset, q.total, q.sort, q.include, q.revinclude = limit, 0, "none", [], [], []
        r = search.run(self.conn, q, self.registry, self.visible)
        return [self.read(t, i) for t, i, _ in r.matches]

    def history(self, rt: str | None = None, rid: str | None = None, since: datetime | None = None,
                count: int = 50, offset: int = 0) -> tuple[int, list[Stored]]:
        """Versions newest first: of one resource, of a type, or of everything."""
        conds = []
        if rt is not None:
            check_type(rt)
            conds.append(resource_version.c.type == rt)
        if rid is not None:
            conds.append(resource_version.c.id == rid)
            if self._current_visible(rt, rid) is None:
                raise NotFound(f"{rt}/{rid} is not known")
        if since is not None:
            conds.append(resource_version.c.last_updated >= since)
        if (cond := self.visible(resource_version)) is not None:
            conds.append(cond)
        total = self.conn.execute(select(func.count()).select_from(resource_version).where(*conds)).scalar_one()
        stmt = select(resource_version).where(*conds).order_by(
            resource_version.c.last_updated.desc(), resource_version.c.rid.desc(),
            resource_version.c.version_id.desc()).limit(count).offset(offset)
        return total, [Stored(r.type, r.id, r.version_id, r.last_updated, r.deleted, r.body, r.method)
                       for r in self.conn.execute(stmt)]

    def count(self, rt: str | None = None) -> int:
        stmt = select(func.count()).select_from(resource).where(resource.c.deleted.is_(False))
        if rt:
            stmt = stmt.where(resource.c.type == rt)
        return self.conn.execute(stmt).scalar_one()

    def iter_current(self, types: tuple[str, ...] = RESOURCE_TYPES) -> Iterator[Stored]:
        stmt = select(resource).where(resource.c.deleted.is_(False), resource.c.type.in_(types)) \
            .order_by(resource.c.rid).execution_options(yield_per=500)
        for r in self.conn.execute(stmt):
            yield Stored(r.type, r.id, r.version_id, r.last_updated, False, r.body)

    def iter_deleted(self, types: tuple[str, ...], since: datetime) -> Iterator[Stored]:
        """The resources of ``types`` deleted at or after ``since`` and not written again since, each as
        its last version before the deletion (``deleted`` True, ``body`` that version's, ``last_updated``
        the time of the deletion): what a Bulk Data export ``_since`` reports as deleted."""
        live = resource_version.alias("live")
        last_live = select(func.max(live.c.version_id)).where(live.c.rid == resource.c.rid,
                                                              live.c.deleted.is_(False)).scalar_subquery()
        stmt = select(resource.c.type, resource.c.id, resource.c.last_updated, resource_version.c.version_id,
                      resource_version.c.body) \
            .select_from(resource.join(resource_version, (resource_version.c.rid == resource.c.rid)
                                       & (resource_version.c.version_id == last_live))) \
            .where(resource.c.deleted.is_(True), resource.c.type.in_(types), resource.c.last_updated >= since) \
            .order_by(resource.c.rid).execution_options(yield_per=500)
        for r in self.conn.execute(stmt):
            yield Stored(r.type, r.id, r.version_id, r.last_updated, True, r.body)

    # -- writes -----------------------------------------------------------------------------------

    def _writable(self) -> None:
        if self.read_only:
            raise RuntimeError("a write on a read connection: use Store.transaction()")

    def _validate(self, res: dict, rt: str | None = None, structure: bool = True) -> None:
        self._writable()
        if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
            raise Invalid("the body is not a FHIR resource (no resourceType)", status=400)
        if rt is not None and res["resourceType"] != rt:
            raise Invalid(f"the body is a {res['resourceType']}, the URL names {rt}", status=400)
        check_type(res["resourceType"])
        issues = structure_issues(res) if structure else [  # unchecked writes still never carry a NUL
            {"severity": "error", "code": "structure", "diagnostics": msg, "expression": [loc]}
            for loc, msg in r4.text_errors(res)]
        if issues:
            raise Invalid(f"{res['resourceType']} is not valid R4 ({len(issues)} issue(s))", issues)

    def _stamp(self, res: dict, vid: int, when: datetime) -> str:
        res = dict(res)
        res["meta"] = {**(res.get("meta") or {}), "versionId": str(vid), "lastUpdated": instant(when)}
        try:
            return orjson.dumps(res).decode()
        except TypeError:  # an integer beyond 64 bits (a decimal such as 1E+245 read from XML)
            return json.dumps(res, ensure_ascii=False, separators=(",", ":"))

    def _index(self, rid_pk: int, res: dict | None, replace: bool, key: tuple[str, str] | None = None) -> None:
        if replace:
            for table in _TABLES.values():
                self.conn.execute(delete(table).where(table.c.rid == rid_pk))
        rt, rid = key or (res["resourceType"], res["id"])
        self.written.add((rt, rid))
        for hook in WRITE_HOOKS:
            hook(self, rid_pk, rt, rid, res)
        if res is None:
            return
        for kind, rows in index_rows(res, self.registry.for_type(res["resourceType"])).items():
            if rows:
                self.conn.execute(insert(_TABLES[kind]), [{"rid": rid_pk, "type": res["resourceType"], **r}
                                                          for r in rows])

    def _insert(self, res: dict, method: str) -> Written:
        rt, rid = res["resourceType"], res["id"]
        when = now()
        body = self._stamp(res, 1, when)
        try:
            with self.conn.begin_nested():
                pk = self.conn.execute(insert(resource).values(type=rt, id=rid, version_id=1, last_updated=when,
                                                               deleted=False, body=body)).inserted_primary_key[0]
        except IntegrityError:
            raise Conflict(f"{rt}/{rid} was created by another request at the same time; retry") from None
        self.conn.execute(insert(resource_version).values(rid=pk, version_id=1, type=rt, id=rid, last_updated=when,
                                                          method=method, deleted=False, body=body))
        self._index(pk, res, replace=False)
        return Written(Stored(rt, rid, 1, when, False, body, method), "created")

    def _replace(self, row, res: dict, method: str, if_match: int | None) -> Written:
        rt, rid = res["resourceType"], res["id"]
        if if_match is not None and row.version_id != if_match:
            raise PreconditionFailed(f"{rt}/{rid} is at version {row.version_id}, not {if_match} (If-Match)")
        if not row.deleted and _content(orjson.loads(row.body)) == _content(res):
            return Written(Stored(rt, rid, row.version_id, row.last_updated, False, row.body), "unchanged")
        vid, when = row.version_id + 1, max(now(), row.last_updated)
        body = self._stamp(res, vid, when)
        done = self.conn.execute(update(resource).where(resource.c.rid == row.rid,
                                                        resource.c.version_id == row.version_id)
                                 .values(version_id=vid, last_updated=when, deleted=False, body=body))
        if done.rowcount != 1:
            raise PreconditionFailed(f"{rt}/{rid} changed while this update ran; read it again and retry")
        self.conn.execute(insert(resource_version).values(rid=row.rid, version_id=vid, type=rt, id=rid,
                                                          last_updated=when, method=method, deleted=False, body=body))
        self._index(row.rid, res, replace=True)
        return Written(Stored(rt, rid, vid, when, False, body, method), "created" if row.deleted else "updated")

    def create(self, res: dict, if_none_exist: str | None = None, rid: str | None = None) -> Written:
        """POST: a new resource with a server id (or ``rid``), unless ``if_none_exist`` matches one."""
        self._validate(res)
        rt = res["resourceType"]
        if if_none_exist:
            found = self.match(rt, if_none_exist)
            if len(found) > 1:
                raise PreconditionFailed(f"If-None-Exist {if_none_exist!r} matches more than one {rt}")
            if found:
                return Written(found[0], "exists")
        res = {**res, "id": rid or str(uuid.uuid4())}
        return self._insert(res, "POST")

    def update(self, rt: str, rid: str, res: dict, if_match: int | None = None, validate: bool = True) -> Written:
        """PUT: update, or create with the client's id (``validate=False``: already structure-checked)."""
        check_type(rt)
        check_id(rid)
        self._validate(res, rt, validate)
        if res.get("id") is None:
            raise Invalid(f"the {rt} has no id; PUT needs the id of the URL in the body", status=400)
        if res["id"] != rid:
            raise Invalid(f"the body's id {res['id']!r} is not the URL's {rid!r}", status=400)
        row = self._current(rt, rid, lock=True)
        if self.visible(resource) is not None and (row is None or not self._sees(row)):
            raise self._hidden_put(rt, rid)
        if row is None:
            if if_match is not None:
                raise PreconditionFailed(f"{rt}/{rid} does not exist (If-Match {if_match})")
            return self._insert(res, "PUT")
        return self._replace(row, res, "PUT", if_match)

    @staticmethod
    def _hidden_put(rt: str, rid: str) -> Invalid:
        """A gated client (an outside recipient) PUTs to an id it cannot see: missing or withheld, the
        same answer (the spec's 405 for a server that does not take client-defined ids), so a write
        tells it nothing about Part 2 data it may not see."""
        return Invalid(f"{rt}/{rid} is not known, and a client acting for an outside recipient cannot create "
                       "a resource with an id of its choosing (POST it instead)", status=405)

    def conditional_update(self, rt: str, query: str, res: dict, if_match: int | None = None) -> Written:
        """PUT Type?criteria: update the one match, create if none, 412 if several."""
        check_type(rt)
        self._validate(res, rt)
        found = self.match(rt, query)
        if len(found) > 1:
            raise PreconditionFailed(f"{rt}?{query} matches more than one resource")
        if found:
            rid = found[0].id
            if res.get("id") not in (None, rid):
                raise Invalid(f"the body's id {res['id']!r} is not that of the match ({rid})", status=400)
            return self.update(rt, rid, {**res, "id": rid}, if_match)
        rid = res.get("id") or str(uuid.uuid4())
        check_id(rid)
        if res.get("id") and self.visible(resource) is not None and \
                ((row := self._current(rt, rid)) is None or not self._sees(row)):
            raise self._hidden_put(rt, rid)
        if self._current(rt, rid) is not None:
            raise Conflict(f"{rt}/{rid} exists but does not match {query!r}")
        return self._insert({**res, "id": rid}, "PUT")

    def delete(self, rt: str, rid: str, if_match: int | None = None) -> Written | None:
        """DELETE: a deletion version; None if it was deleted already."""
        check_type(rt)
        self._writable()
        row = self._current(rt, rid, lock=True)
        if row is None or not self._sees(row):
            raise NotFound(f"{rt}/{rid} is not known")
        if if_match is not None and row.version_id != if_match:
            raise PreconditionFailed(f"{rt}/{rid} is at version {row.version_id}, not {if_match} (If-Match)")
        if row.deleted:
            return None
        vid, when = row.version_id + 1, max(now(), row.last_updated)
        self.conn.execute(update(resource).where(resource.c.rid == row.rid)
                          .values(version_id=vid, last_updated=when, deleted=True, body=None))
        self.conn.execute(insert(resource_version).values(rid=row.rid, version_id=vid, type=rt, id=rid,
                                                          last_updated=when, method="DELETE", deleted=True, body=None))
        self._index(row.rid, None, replace=True, key=(rt, rid))
        return Written(Stored(rt, rid, vid, when, True, None, "DELETE"), "deleted")

    def put_many(self, resources, validate: bool = True) -> dict[str, int]:
        """PUT each resource (idempotent: unchanged ones keep their version); counts per outcome."""
        counts: dict[str, int] = {}
        for res in resources:
            w = self.update(res["resourceType"], res["id"], res, validate=validate)
            counts[w.outcome] = counts.get(w.outcome, 0) + 1
        return counts
