"""Reader connections kept open per thread, so that a read costs its statement and not a pool
checkout with its reset on return (about a third of the facade's own cost of a read by id).

``Store.reading()`` (autocommit reads: no transaction is ever open on these connections between
statements) takes the calling thread's held connection; the first read of a thread checks one out of
the reader pool and keeps it until the thread ends (then it goes back to the pool), the connection
fails (a ``DBAPIError`` in a read: it is closed and the next read checks out a fresh one), the
process forks (the child never touches its parent's connection) or the store is disposed.

At most ``limit`` threads hold one at a time, so that held connections never take the whole pool
(SQLite's readers share it with the writers): a thread beyond the limit checks a connection out for
each read, as before.
"""

from __future__ import annotations

import os
import threading
import weakref

from sqlalchemy.engine import Connection, Engine


class _Held:
    """One thread's reader connection; closed (back to the pool) when the thread ends."""

    __slots__ = ("conn", "pid", "__weakref__")

    def __init__(self, conn: Connection):
        self.conn, self.pid = conn, os.getpid()

    def usable(self) -> bool:
        c = self.conn
        return c is not None and self.pid == os.getpid() and not c.closed and not c.invalidated

    def close(self) -> None:
        c, self.conn = self.conn, None
        if c is not None and self.pid == os.getpid():  # (a forked child leaves its parent's connection alone)
            try:
                c.close()  # (one SQLAlchemy found disconnected is invalidated already: the pool drops it)
            except Exception:  # pragma: no cover - a broken connection: the pool discards it
                pass

    def __del__(self):
        self.close()


class HeldReaders:
    def __init__(self, engine: Engine, limit: int = 4):
        self._engine, self._limit = engine, limit
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: weakref.WeakSet[_Held] = weakref.WeakSet()
        self._closed = False

    def connection(self) -> tuple[Connection, bool]:
        """This thread's reader connection and True, or, past the limit, a checked-out one and False
        (the caller closes that one)."""
        h = getattr(self._local, "held", None)
        if h is not None:
            if h.usable():
                return h.conn, True
            self.drop()
        with self._lock:
            if self._closed or len(self._all) >= self._limit:
                return self._engine.connect(), False
            h = _Held(self._engine.connect())
            self._all.add(h)
        self._local.held = h
        return h.conn, True

    def drop(self) -> None:
        """Give up this thread's held connection (after a database error its state is unknown)."""
        h = getattr(self._local, "held", None)
        self._local.held = None
        if h is not None:
            with self._lock:
                self._all.discard(h)
            h.close()

    def close(self) -> None:
        """Close every held connection (``Store.dispose``); reads after this check out per read."""
        with self._lock:
            self._closed = True
            held = list(self._all)
            self._all.clear()
        for h in held:
            h.close()
