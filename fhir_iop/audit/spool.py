"""The audit spool: a request's AuditEvents are appended to a local file before its response leaves,
and shipped into the store off the request path. A request appends each event's facts
(``fhir_iop.audit.facts``, id and time fixed); the shipper builds the AuditEvent from them
(``from_facts``). A line that is a built AuditEvent is stored as it is.

Why: writing an AuditEvent into the database before every response costs a database transaction
per read (2.4 ms on SQLite, 3.8 ms on PostgreSQL in ``bench/bench_audit.py``) — more than the read.
Appending a line to a file costs microseconds. The guarantee is kept: nothing leaves unaudited —
if the append fails, the facade answers 500 and discloses nothing.

How it stays exactly-once:

* A process appends to its current *segment*, ``<dir>/<time>-<pid>-<random>.ndjson`` (mode 0600, the
  directory 0700), holding an exclusive ``flock`` on it. One ``write(2)`` per request; a failed
  write is cut back off the file. Every ``interval`` seconds (``AUDIT_SPOOL_INTERVAL``, default 0.1)
  the process's spool thread closes a segment that has lines, which releases its lock; the next
  append starts a new one.
* A segment whose lock can be taken is closed (or its process died): a shipper takes the lock,
  writes its lines to the store in batches, one database transaction per batch, skipping ids
  already stored (a commit whose answer was lost, a segment shipped again after a crash), then
  deletes it. The last line of a segment killed mid-write is incomplete and skipped: its response
  was never sent.
* The shipper is the spool thread itself (``AUDIT_SPOOL_SHIPPER=thread``, the default), or a
  separate process (``external``: ``fhir-iop audit ship``), which keeps the indexing and the
  database writes off the processes that answer requests. Several shippers may run: the lock
  decides who ships a segment.
* The store unreachable (``OperationalError``/``InterfaceError``): nothing moves, the shipper tries
  again with backoff. An event the store refuses for another reason goes to
  ``rejected-<pid>.jsonl`` in the directory, with an error in the log, instead of blocking the rest.
* Before AuditEvents are searched or read, the facade closes its segment and ships what is closed
  (``drain``), so an administrator sees every request the process answered; other worker processes
  close theirs within ``interval`` seconds.

Durability: lines reach the operating system before the response (``write(2)``), as SQLite's
``synchronous=NORMAL`` commits do; they survive the process dying but not a power loss within the
moment before the OS writes them out, unless ``fsync=True`` (``AUDIT_SPOOL_FSYNC``), which costs a
disk flush per request (about 0.3 ms here).
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import hashlib
import logging
import os
import threading
import time
import uuid
import weakref
from pathlib import Path

import orjson
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError

log = logging.getLogger("fhir_iop.audit")

#: AuditEvents per database transaction when shipping
BATCH = 1000
SUFFIX = ".ndjson"
SHIPPERS = ("thread", "external")


class Spool:
    """The spool of one store in one directory (one per application; ``ship_segments`` alone for
    an external shipper)."""

    def __init__(self, store, directory: str | os.PathLike, *, interval: float = 0.1, fsync: bool = False,
                 shipper: str = "thread", idle_exit: float = 5.0):
        if shipper not in SHIPPERS:
            raise ValueError(f"AUDIT_SPOOL_SHIPPER is one of {', '.join(SHIPPERS)}, not {shipper!r}")
        self.store, self.dir = store, Path(directory)
        self.interval, self.fsync, self.idle_exit = float(interval), bool(fsync), float(idle_exit)
        self.ships = shipper == "thread"
        self._lock = threading.Lock()  # the current segment and the thread handle
        self._fd: int | None = None
        self._path: Path | None = None
        self._pid: int | None = None
        self._bytes = 0  # in the current segment
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._closed = False
        # a spool that cannot be written is a configuration error: say so at start, not on each request
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.access(self.dir, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, f"the audit spool directory {self.dir} is not writable")
        if self.dir.stat().st_mode & 0o077:
            log.warning("audit spool: %s is readable by others than its owner (the spool holds audit records: "
                        "chmod 700 it)", self.dir)
        _OPEN.add(self)

    # -- appending (the request path) ------------------------------------------------------------

    def append(self, events: list[dict]) -> None:
        """Append built AuditEvents; returns once the OS has them (and the disk, with ``fsync``).
        Raises ``OSError`` when they cannot be written: the caller must not disclose."""
        if not events:
            return
        data = b"".join(orjson.dumps(ev) + b"\n" for ev in events)
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "the audit spool is closed")
            fd = self._segment()
            try:
                view, done = memoryview(data), 0
                while done < len(data):
                    done += os.write(fd, view[done:])
                if self.fsync:
                    os.fsync(fd)
            except OSError:
                self._cut_back(fd)
                raise
            self._bytes += len(data)
            self._ensure_thread()

    def _segment(self) -> int:  # under self._lock
        pid = os.getpid()
        if self._fd is not None and self._pid == pid:
            return self._fd
        if self._fd is not None:  # a forked child: the segment is the parent's; drop our copy of it
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._thread = None
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.dir / f"{time.time_ns():020d}-{pid}-{uuid.uuid4().hex[:8]}{SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._fd, self._path, self._pid, self._bytes = fd, path, pid, 0
        return fd

    def _cut_back(self, fd: int) -> None:
        """After a failed append: remove the part that was written, or give the segment up."""
        try:
            os.ftruncate(fd, self._bytes)
        except OSError:
            log.error("audit spool: a failed append could not be cut back; the segment is closed as it is "
                      "(shipping skips its torn line)")
            self._close_segment()

    def _close_segment(self) -> None:  # under self._lock
        """Close the current segment (releasing its lock, so it can be shipped); an empty one is removed."""
        if self._fd is None or self._pid != os.getpid():
            return
        fd, self._fd = self._fd, None
        if self._bytes == 0 and self._path is not None:
            self._path.unlink(missing_ok=True)
        os.close(fd)
        self._bytes = 0

    # -- shipping ---------------------------------------------------------------------------------

    def drain(self) -> int:
        """Close the current segment and ship every closed one now; the number of AuditEvents stored.
        Raises when the store cannot take them."""
        with self._lock:
            self._close_segment()
        return ship_segments(self.store, self.dir, self._reject)

    def _reject(self, lines: list[bytes], why: str) -> None:
        reject(self.dir, lines, why)

    # -- the background thread -------------------------------------------------------------------

    def _ensure_thread(self) -> None:  # under self._lock
        t = self._thread
        if t is not None and t.is_alive():
            return
        self._thread = threading.Thread(target=self._run, name="fhir-iop-audit-spool", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        idle, failures = 0.0, 0
        me = threading.current_thread()
        while not self._closed:
            self._wake.wait(self.interval * (2 ** min(failures, 6)))
            self._wake.clear()
            if self._closed:
                return
            with self._lock:
                had = self._bytes > 0
                self._close_segment()
            if self.ships:
                try:
                    ship_segments(self.store, self.dir, self._reject)
                    failures = 0
                except Exception as e:  # the store is down: the segments stay, try again with backoff
                    failures += 1
                    if failures in (1, 10) or failures % 100 == 0:
                        log.warning("audit spool: shipping to the store failed (%s), %d time(s) in a row; "
                                    "the events stay in the spool", type(e).__name__, failures)
                    continue
            with self._lock:
                idle = 0.0 if had or self._fd is not None else idle + self.interval
                if idle >= self.idle_exit and self._thread is me:
                    self._thread = None  # the next append starts a new one
                    return

    def close(self) -> None:
        """Stop the thread, close the segment and ship what is pending (best effort)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            t = self._thread
            self._close_segment()
        self._wake.set()
        if t is not None and t is not threading.current_thread():
            t.join(timeout=10)
        if self.ships:
            try:
                ship_segments(self.store, self.dir, self._reject)
            except Exception as e:
                log.warning("audit spool: AuditEvents left in the spool at close (%s); the next shipper ships "
                            "them", type(e).__name__)
        _OPEN.discard(self)


# -- shipping (the spool thread, or ``fhir-iop audit ship``) ---------------------------------------

def ship_segments(store, directory: Path, on_reject=None) -> int:
    """Ship every segment in ``directory`` whose lock can be taken (closed, or of a dead process)
    into ``store`` and delete it; the number of AuditEvents stored. Raises ``OperationalError`` /
    ``InterfaceError`` when the store cannot take them (the segment stays)."""
    directory = Path(directory)
    on_reject = on_reject or (lambda lines, why: reject(directory, lines, why))
    if not directory.is_dir():
        return 0
    stored = 0
    for path in sorted(directory.glob("*" + SUFFIX)):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # being written, or being shipped by another shipper
            if not path.exists():
                continue  # shipped and removed by another shipper meanwhile
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
            lines = data.split(b"\n")
            if lines[-1]:
                log.warning("audit spool: %s ends in an incomplete line (its process died writing it; that "
                            "response was never sent): skipped", path.name)
            lines = lines[:-1]
            for i in range(0, len(lines), BATCH):
                stored += _store(store, lines[i:i + BATCH], on_reject)
            path.unlink()
        finally:
            os.close(fd)
    return stored


def _store(store, lines: list[bytes], on_reject) -> int:
    """One batch into the store, in one transaction; ids already stored are skipped."""
    from fhir_iop.audit import AUDIT_TYPE, FACTS, from_facts, write_many
    from fhir_iop.store.models import resource
    events, bad = [], []
    for line in lines:
        try:
            ev = orjson.loads(line)
            if isinstance(ev, dict) and ev.get(FACTS) == 1:  # what a request spooled: built here
                ev = from_facts(ev)
            if not isinstance(ev, dict) or not isinstance(ev.get("id"), str):
                raise ValueError("not an AuditEvent with an id")
            events.append(ev)
        except (ValueError, KeyError, TypeError, IndexError):
            bad.append(line)
    if bad:
        on_reject(bad, "unreadable line")
    if not events:
        return 0

    def put(tx, batch) -> int:
        ids = [e["id"] for e in batch]
        have = set(tx.conn.execute(select(resource.c.id).where(resource.c.type == AUDIT_TYPE,
                                                               resource.c.id.in_(ids))).scalars())
        new = []
        for ev in batch:
            if ev["id"] not in have:
                new.append(ev)
                have.add(ev["id"])
        write_many(tx.conn, new)
        return len(new)

    try:
        with store.transaction() as tx:
            return put(tx, events)
    except (OperationalError, InterfaceError):
        raise  # the store is unreachable or busy: nothing moves, try again later
    except Exception:  # one of them is refused: store the others one by one
        stored = 0
        for ev in events:
            try:
                with store.transaction() as tx:
                    stored += put(tx, [ev])
            except (OperationalError, InterfaceError):
                raise
            except Exception as e:
                on_reject([orjson.dumps(ev)], type(e).__name__)
        return stored


def reject(directory: Path, lines: list[bytes], why: str) -> None:
    path = Path(directory) / f"rejected-{os.getpid()}.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"".join(x + b"\n" for x in lines))
    finally:
        os.close(fd)
    log.error("audit spool: %d AuditEvent line(s) refused by the store (%s), kept in %s", len(lines), why, path.name)


def run_shipper(store, directory: Path, interval: float = 0.1, stop: threading.Event | None = None,
                once: bool = False) -> int:
    """``fhir-iop audit ship``: ship closed segments every ``interval`` seconds until ``stop`` is set
    (or once); the number of AuditEvents stored."""
    stop = stop or threading.Event()
    total, failures = 0, 0
    while True:
        try:
            total += ship_segments(store, directory)
            failures = 0
        except (OperationalError, InterfaceError) as e:
            failures += 1
            if failures in (1, 10) or failures % 100 == 0:
                log.warning("audit ship: the store refused the connection (%s), %d time(s) in a row",
                            type(e).__name__, failures)
        if once or stop.wait(interval * (2 ** min(failures, 6))):
            return total


def spool_dir(setting, database_url: str) -> Path | None:
    """Where the request AuditEvents are spooled (``AUDIT_SPOOL``): ``auto`` (the default) beside a
    SQLite database file (``<file>.audit-spool/``) or, for PostgreSQL, ``var/audit-spool/<hash of the
    URL>/`` under the working directory; ``off`` to write each into the store before the response
    (also what an in-memory SQLite store gets); anything else is the directory."""
    value = str(setting if setting is not None else "off").strip()
    if value.lower() in ("off", "false", "0", "no", ""):
        return None
    if value.lower() not in ("auto", "on", "true", "1", "yes"):
        return Path(value)
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            return None
        db = Path(url.database)
        return db.with_name(db.name + ".audit-spool")
    key = hashlib.sha256(url.render_as_string(hide_password=True).encode()).hexdigest()[:16]
    return Path("var") / "audit-spool" / key


_OPEN: weakref.WeakSet[Spool] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for spool in list(_OPEN):
        spool.close()
