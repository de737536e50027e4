"""Sync workers: run push (or pull) over the configured connections, once or in a loop.

    run(store, connections, "push", once=True)      # every due message of every pushing connection
    run(store, connections, "push", once=False)     # until stop is set (SIGTERM / Ctrl-C in the CLI)

Any number of workers may run at once, in threads or processes, on one or several machines,
against one PostgreSQL store: each claims its own messages (``FOR UPDATE SKIP LOCKED``) under its
own worker id, and a worker that dies leaves leases that run out, after which another worker
sends those messages again, which the EHR sees as an update of the same record (conditional
update on the identifier). On SQLite, workers of one machine take turns claiming (``BEGIN
IMMEDIATE``). A loop sleeps ``poll`` seconds between passes that found nothing to do (push), or the
connection's ``schedule.interval`` between pulls.

Summaries (:class:`Pass`) carry counts and errors, never resource contents.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from fhir_iop.sync import push as push_mod

log = logging.getLogger(__name__)


@dataclass
class Pass:
    """What one pass did per connection: counts per outcome, and the errors that stopped a connection."""
    counts: dict[str, Counter] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors and not any(c.get("dead") for c in self.counts.values())

    def as_json(self) -> dict:
        return {"counts": {k: dict(v) for k, v in self.counts.items()}, "errors": dict(self.errors)}


def select(connections: dict, direction: str, name: str | None = None) -> dict:
    """The connections that ``direction`` concerns (all that have types that way, or the one named)."""
    from fhir_iop.errors import ConfigError
    if name is not None:
        if name not in connections:
            raise ConfigError(f"no EHR connection named {name!r} (configured: {', '.join(sorted(connections)) or 'none'})")
        return {name: connections[name]}
    return {n: c for n, c in connections.items() if c.types(direction)}


def push_pass(store, connections: dict, worker: str | None = None, clients: dict | None = None) -> Pass:
    out = Pass()
    for name, conn in connections.items():
        try:
            out.counts[name] = push_mod.push(store, conn, client=(clients or {}).get(name), worker=worker)
        except Exception as e:  # one EHR's trouble (config, auth) does not stop the others
            from fhir_iop.sync.client import EhrError
            if not isinstance(e, (EhrError,)) and not _library_error(e):
                raise
            out.errors[name] = getattr(e, "message", None) or str(e)
            log.warning("sync %s: push stopped: %s", name,  # no EHR text in the log (it may quote PHI back)
                        e.loggable if isinstance(e, EhrError) else type(e).__name__)
    return out


def pull_pass(store, connections: dict, bulk: bool = False, clients: dict | None = None) -> Pass:
    from fhir_iop.sync.client import EhrError
    out = Pass()
    for name, conn in connections.items():
        try:
            if bulk:
                from fhir_iop.sync.bulk import bulk_pull
                result = bulk_pull(store, conn, client=(clients or {}).get(name))
            else:
                from fhir_iop.sync.pull import pull
                result = pull(store, conn, client=(clients or {}).get(name))
        except EhrError as e:
            out.errors[name] = e.message
            continue
        except Exception as e:
            if not _library_error(e):
                raise
            out.errors[name] = str(e)
            continue
        out.counts[name] = Counter(result.by_outcome())
        if result.errors:
            out.errors[name] = "; ".join(f"{t}: {m}" for t, m in result.errors.items())
    return out


def _library_error(e: Exception) -> bool:
    from fhir_iop.errors import FhirIopError
    return isinstance(e, FhirIopError)


def run(store, connections: dict, direction: str = "push", once: bool = True, poll: float = 5.0,
        stop: threading.Event | None = None, worker: str | None = None, bulk: bool = False) -> Pass:
    """One pass (``once``), or passes until ``stop`` is set; the summary of all passes (counts
    added up, the last error of each connection)."""
    stop = stop or threading.Event()
    worker = worker or push_mod.worker_id()
    last_pull: dict[str, float] = {}
    total = Pass()
    while True:
        if direction == "push":
            result = push_pass(store, connections, worker)
            idle = not any(sum(c.values()) for c in result.counts.values())
            wait = poll if idle else 0.0
        else:
            due = {n: c for n, c in connections.items()
                   if once or time.monotonic() - last_pull.get(n, -1e18) >= c.interval}
            result = pull_pass(store, due, bulk=bulk)
            for n in due:
                last_pull[n] = time.monotonic()
            wait = min([poll, *(c.interval for c in connections.values())])
        for name, c in result.counts.items():
            total.counts.setdefault(name, Counter()).update(c)
        total.errors.update(result.errors)
        if once or stop.wait(wait):
            return total
