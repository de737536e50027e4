"""The read cache: current resource rows kept in the process, for PostgreSQL.

On PostgreSQL a read by id costs a round trip to the server (about 0.15 ms on loopback, more across
a network), the largest part of a facade read. The cache keeps the current row of resources read
recently (``READ_CACHE_MB`` of bodies per process, least recently used out first) and answers the
next read of the same resource from memory, as long as it can know of every change:

* **every change is announced by the database.** A trigger on the ``resource`` table (migration
  0008) sends ``NOTIFY fhir_iop_resource`` with the schema, type and id of each row written,
  whoever writes it (this program, another host, ``psql``), when the writing transaction commits;
  ``TRUNCATE`` announces "everything". AuditEvents are left out (they are never read through here).
* **a listener in each process** (a thread with a connection of its own, ``LISTEN``) drops what is
  announced. It checks its connection every second; if it has not been able to for
  ``STALE_AFTER`` seconds, or its connection fails, the cache is emptied and reads go to the
  database until the listener is listening again (then it starts empty: what happened meanwhile
  is unknown).
* **a write in this process** drops what it wrote as soon as it commits, so a client reading
  through the same process reads its own write.
* **no stale fill.** A read that raced a change does not put the row it read in the cache: every
  drop bumps a generation number, and a row read under an older generation is not kept.

What this gives: a read through another process may return the previous version for as long as
the announcement takes to arrive (the time of one notification from the database, normally well
under a millisecond; at most ``STALE_AFTER`` seconds when the listener stops hearing anything,
after which the cache is not used). Writes never use the cache (they lock the row in the database:
``If-Match`` and version numbers stay exact), nor do reads under a Part 2 restriction (those go to the
database with their visibility condition). A client that must see a write made through another
process at once sends ``Cache-Control: no-cache`` (the facade then reads from the database).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict

log = logging.getLogger("fhir_iop.store.cache")

CHANNEL = "fhir_iop_resource"
#: seconds without a word from the listener's connection after which the cache is not used
STALE_AFTER = 3.0
#: how often the listener checks its connection (seconds)
CHECK_EVERY = 1.0


def _size(row) -> int:
    """What a cached row counts against ``READ_CACHE_MB``: its body and about 200 bytes of the rest."""
    return len(row.body or "") + 200


class ReadCache:
    """Current rows by (type, id), for one store (one database and schema) in one process."""

    def __init__(self, engine, max_bytes: int):
        self.engine, self.max_bytes = engine, int(max_bytes)
        self._rows: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._generation = 0
        self._fresh_until = 0.0  # monotonic time up to which the listener vouches for the cache
        self._pid: int | None = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._conn = None
        self.hits = self.misses = 0
        #: the server process of the listening connection (None while not listening)
        self.listener_pid: int | None = None

    # -- the read path -----------------------------------------------------------------------------

    def usable(self) -> bool:
        """Whether the listener vouches for the cache now (starts it in a new process)."""
        if self._pid != os.getpid():
            self._start()
            return False
        return time.monotonic() < self._fresh_until and not self._closed.is_set()

    def get(self, rt: str, rid: str):
        """(row or None, generation): the cached row, and the generation to hand to :meth:`put`
        with a row read from the database."""
        with self._lock:
            row = self._rows.get((rt, rid))
            if row is not None:
                self._rows.move_to_end((rt, rid))
                self.hits += 1
            else:
                self.misses += 1
            return row, self._generation

    def put(self, rt: str, rid: str, row, generation: int) -> None:
        """Keep ``row`` (read from the database under ``generation``) unless something was dropped
        since: the row may predate that change."""
        size = _size(row)
        if size > self.max_bytes // 8:
            return  # one large resource does not push out everything else
        with self._lock:
            if generation != self._generation or time.monotonic() >= self._fresh_until:
                return
            old = self._rows.pop((rt, rid), None)
            if old is not None:
                self._bytes -= _size(old)
            self._rows[(rt, rid)] = row
            self._bytes += size
            while self._bytes > self.max_bytes and self._rows:
                _, out = self._rows.popitem(last=False)
                self._bytes -= _size(out)

    # -- dropping ----------------------------------------------------------------------------------

    def drop(self, keys) -> None:
        with self._lock:
            self._generation += 1
            for key in keys:
                old = self._rows.pop(key, None)
                if old is not None:
                    self._bytes -= _size(old)

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._rows.clear()
            self._bytes = 0

    # -- the listener ------------------------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._pid == os.getpid() or self._closed.is_set():
                return
            self._pid = os.getpid()  # (a forked child: the parent's thread and connection are not ours)
            self._rows.clear()
            self._bytes = 0
            self._fresh_until = 0.0
            self._conn = None
            self._thread = threading.Thread(target=self._listen, name="fhir-iop-read-cache", daemon=True)
            self._thread.start()

    def _connect(self):
        import psycopg
        args, kwargs = self.engine.dialect.create_connect_args(self.engine.url)
        kwargs = {**kwargs, "autocommit": True, "connect_timeout": 5}
        conn = psycopg.connect(*args, **kwargs)
        schema = conn.execute("SELECT current_schema()").fetchone()[0]
        conn.execute(f"LISTEN {CHANNEL}")
        return conn, schema

    def _listen(self) -> None:
        failures = 0
        while not self._closed.is_set():
            try:
                conn, schema = self._connect()
            except Exception as e:
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.warning("read cache: cannot listen for changes (%s); reads go to the database",
                                type(e).__name__)
                self._closed.wait(min(30.0, 0.5 * 2 ** min(failures, 6)))
                continue
            self._conn, self.listener_pid = conn, conn.info.backend_pid
            self.clear()  # what changed before LISTEN took effect is unknown: start empty
            if not self._closed.is_set():
                self._fresh_until = time.monotonic() + STALE_AFTER
            failures = 0
            try:
                while not self._closed.is_set():
                    for n in conn.notifies(timeout=CHECK_EVERY):
                        self._announced(n.payload, schema)
                    conn.execute("SELECT 1")  # the connection still answers: nothing was missed
                    if not self._closed.is_set():
                        self._fresh_until = time.monotonic() + STALE_AFTER
            except Exception as e:
                if not self._closed.is_set():
                    log.warning("read cache: the listening connection failed (%s); reads go to the database "
                                "until it listens again", type(e).__name__)
            finally:
                self._fresh_until = 0.0
                self.clear()
                self._conn = self.listener_pid = None
                try:
                    conn.close()
                except Exception:
                    pass

    def _announced(self, payload: str, schema: str) -> None:
        where, _, what = payload.partition("|")
        if where != schema:
            return  # another schema of the same database
        if what == "*":
            self.clear()
            return
        rt, _, rid = what.partition("|")
        self.drop([(rt, rid)])

    def close(self) -> None:
        """Stop using the cache; the listener ends within ``CHECK_EVERY`` seconds and closes its
        connection (it is not waited for)."""
        self._closed.set()
        self._fresh_until = 0.0
        self.clear()
