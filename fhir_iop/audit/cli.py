"""``fhir-iop audit ship|status``: the facade's audit spool (``fhir_iop.audit.spool``) from the command line.

    fhir-iop audit ship [--database URL] [--spool DIR] [--interval S] [--once|--loop]
    fhir-iop audit status [--database URL] [--spool DIR]

``ship`` moves closed spool segments into the store: the external shipper of a facade started with
``FHIR_IOP_AUDIT_SPOOL_SHIPPER=external`` (run one beside the gunicorn workers; more than one is safe).
``--spool`` defaults to ``$FHIR_IOP_AUDIT_SPOOL``, else the directory the facade derives from the
database URL (``auto``). Exit codes: 0 done; 1 (status) the store refused some lines, kept in
``rejected-*.jsonl``; 2 bad usage or configuration. ``--loop`` runs until
SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import click

from fhir_iop.cli_common import EXIT_OK, EXIT_REJECTED, guard

_database_opt = click.option("--database", "database", envvar="FHIR_IOP_DATABASE_URL", show_envvar=True,
                             default="sqlite:///var/fhir-iop.sqlite", show_default=True,
                             help="SQLAlchemy URL of the store.")
_spool_opt = click.option("--spool", "spool", envvar="FHIR_IOP_AUDIT_SPOOL", show_envvar=True, default="auto",
                          show_default=True, help="The spool directory (auto: derived from --database, as the "
                                                  "facade does).")


def _directory(spool: str, database: str) -> Path:
    from fhir_iop.audit.spool import spool_dir
    directory = spool_dir(spool, database)
    if directory is None:
        raise click.UsageError("this store has no audit spool (AUDIT_SPOOL=off, or an in-memory database)")
    return directory


@click.group("audit")
def audit_group():
    """The audit trail's spool: AuditEvents on their way into the store."""


@audit_group.command("ship")
@_database_opt
@_spool_opt
@click.option("--interval", type=float, default=0.1, show_default=True, help="Seconds between passes (--loop).")
@click.option("--once/--loop", "once", default=True, show_default=True,
              help="One pass, or passes until SIGTERM/Ctrl-C.")
@guard
def ship(database, spool, interval, once):
    """Ship the closed spool segments into the store (exactly once: ids already stored are skipped)."""
    from fhir_iop.audit.spool import run_shipper
    from fhir_iop.store import Store
    directory = _directory(spool, database)
    store = Store(database, migrate=False)
    stop = threading.Event()
    if not once:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    try:
        total = run_shipper(store, directory, interval=interval, stop=stop, once=once)
    finally:
        store.dispose()
    click.echo(f"audit ship: {total} AuditEvent(s) stored from {directory}", err=True)


@audit_group.command("status")
@_database_opt
@_spool_opt
@guard
def status(database, spool):
    """Segments and bytes waiting in the spool, and lines the store refused."""
    from fhir_iop.audit.spool import SUFFIX
    directory = _directory(spool, database)
    segments = sorted(directory.glob("*" + SUFFIX)) if directory.is_dir() else []
    rejected = sorted(directory.glob("rejected-*.jsonl")) if directory.is_dir() else []
    waiting = sum(p.stat().st_size for p in segments)
    refused = sum(sum(1 for _ in p.open("rb")) for p in rejected)
    click.echo(f"{directory}: {len(segments)} segment(s), {waiting} byte(s) waiting; {refused} refused line(s)")
    sys.exit(EXIT_REJECTED if refused else EXIT_OK)
