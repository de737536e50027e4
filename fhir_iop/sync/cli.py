"""``fhir-iop sync pull|push|status|replay``: EHR sync from the command line.

    fhir-iop sync push --config ehr.yaml [--connection NAME] [--database URL] [--once|--loop]
    fhir-iop sync pull --config ehr.yaml [--connection NAME] [--bulk] [--once|--loop]
    fhir-iop sync status [--config ehr.yaml] [--connection NAME] [--json]
    fhir-iop sync replay [--connection NAME] [--id N ...] [--withheld]
    fhir-iop sync enqueue --config ehr.yaml --connection NAME [--type T ...]   (a backfill)

``--config`` defaults to ``$FHIR_IOP_SYNC_CONFIG``; ``--database`` to ``$FHIR_IOP_DATABASE_URL``.
Exit codes (fhir_iop.cli_common): 0 done; 1 some messages went to the dead letters or a pull had
errors (the rest was done); 2 bad usage or configuration. ``--loop`` runs until SIGTERM or Ctrl-C,
finishing the message in hand. Output: counts per connection on stderr; ``status --json`` on stdout.
"""

from __future__ import annotations

import signal
import sys
import threading

import click
import orjson

from fhir_iop.cli_common import EXIT_ERROR, EXIT_OK, EXIT_REJECTED, guard

_config_opt = click.option("--config", "config", envvar="FHIR_IOP_SYNC_CONFIG", show_envvar=True,
                           type=click.Path(dir_okay=False), help="The EHR connections file (YAML or JSON).")
_connection_opt = click.option("--connection", "connection", default=None, help="Only this connection.")
_database_opt = click.option("--database", "database", envvar="FHIR_IOP_DATABASE_URL", show_envvar=True,
                             default="sqlite:///var/fhir-iop.sqlite", show_default=True,
                             help="SQLAlchemy URL of the store.")
_loop_opt = click.option("--once/--loop", "once", default=True, show_default=True,
                         help="One pass, or passes until SIGTERM/Ctrl-C.")


def _connections(config: str | None, required: bool = True) -> dict:
    from fhir_iop.errors import ConfigError
    from fhir_iop.sync import outbox
    from fhir_iop.sync.config import load
    if not config:
        if required:
            raise ConfigError("no EHR connections file: give --config FILE or set FHIR_IOP_SYNC_CONFIG")
        return {}
    conns = load(config)
    outbox.configure(conns)  # writes made by this process queue for these connections
    return conns


def _store(database: str):
    from fhir_iop.store import Store
    return Store(database)


def _stop_event() -> threading.Event:
    stop = threading.Event()

    def handler(signum, frame):
        click.echo(f"fhir-iop sync: signal {signum}: stopping after the current message", err=True)
        stop.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    return stop


def _report(direction: str, result) -> int:
    for name, c in sorted(result.counts.items()):
        parts = ", ".join(f"{n} {k}" for k, n in sorted(c.items())) or "nothing to do"
        click.echo(f"sync {direction} {name}: {parts}", err=True)
    for name, message in sorted(result.errors.items()):
        click.echo(f"sync {direction} {name}: error: {message}", err=True)
    return EXIT_OK if result.ok else EXIT_REJECTED


@click.group("sync")
def sync_group():
    """Pull from and push to the EHRs of the connections file."""


@sync_group.command("push")
@_config_opt
@_connection_opt
@_database_opt
@_loop_opt
@click.option("--poll", default=5.0, show_default=True, help="Seconds between idle passes with --loop.")
@guard
def push_cmd(config, connection, database, once, poll):
    """Send the outbox's due messages (Part 2 consent checked, retried, dead-lettered)."""
    from fhir_iop.sync.worker import run, select
    conns = select(_connections(config), "push", connection)
    store = _store(database)
    try:
        result = run(store, conns, "push", once=once, poll=poll, stop=None if once else _stop_event())
    finally:
        store.dispose()
    sys.exit(_report("push", result))


@sync_group.command("pull")
@_config_opt
@_connection_opt
@_database_opt
@_loop_opt
@click.option("--bulk", is_flag=True, help="FHIR Bulk Data $export instead of paged searches (resumable).")
@guard
def pull_cmd(config, connection, database, once, bulk):
    """Fetch what changed at the EHRs since the stored cursors."""
    from fhir_iop.sync.worker import run, select
    conns = select(_connections(config), "pull", connection)
    store = _store(database)
    try:
        result = run(store, conns, "pull", once=once, bulk=bulk, stop=None if once else _stop_event())
    finally:
        store.dispose()
    sys.exit(_report("pull", result))


@sync_group.command("status")
@_config_opt
@_connection_opt
@_database_opt
@click.option("--json", "as_json", is_flag=True, help="The whole status as JSON on stdout.")
@guard
def status_cmd(config, connection, database, as_json):
    """Messages per state, cursors, last runs and dead letters per connection."""
    from fhir_iop.sync.push import status
    store = _store(database)
    try:
        st = status(store, _connections(config, required=False), connection)
    finally:
        store.dispose()
    if as_json:
        click.echo(orjson.dumps(st, option=orjson.OPT_INDENT_2).decode())
        sys.exit(EXIT_OK)
    if not st:
        click.echo("no EHR connections configured and nothing synced yet", err=True)
    for name, s in st.items():
        m = s["messages"]
        click.echo(f"{name}: pending {m['pending']}, in flight {m['inflight']}, sent {m['sent']}, "
                   f"dead {m['dead']}, withheld {m['withheld']}" + ("" if s["configured"] else " (not configured)"))
        for rt, c in s["cursors"].items():
            click.echo(f"  pull {rt}: cursor {c['cursor'] or '-'}" + (f", bulk {c['bulk']}" if c["bulk"] else ""))
        for direction, r in s["runs"].items():
            click.echo(f"  last {direction}: {r['started']} -> {r['ended'] or 'running'}"
                       + (f"; last error: {r['last_error']}" if r["last_error"] else ""))
        for d in s["dead_letters"]:
            click.echo(f"  dead #{d['id']} {d['operation']} {d['resource']} v{d['version']} "
                       f"after {d['attempts']} attempt(s): {d['error']}")
    sys.exit(EXIT_OK)


@sync_group.command("enqueue")
@_config_opt
@click.option("--connection", "connection", required=True, help="The connection to queue for.")
@_database_opt
@click.option("--type", "types", multiple=True, help="Only this resource type (repeatable).")
@guard
def enqueue_cmd(config, connection, database, types):
    """Queue the stored resources the connection pushes that it was not sent yet (a backfill)."""
    from fhir_iop.sync.outbox import backfill
    from fhir_iop.sync.worker import select
    conn = select(_connections(config), "push", connection)[connection]
    store = _store(database)
    try:
        n = backfill(store, conn, types or None)
    finally:
        store.dispose()
    click.echo(f"sync enqueue {connection}: {n} message(s) queued; `fhir-iop sync push` sends them", err=True)
    sys.exit(EXIT_OK)


@sync_group.command("replay")
@_connection_opt
@_database_opt
@click.option("--id", "ids", multiple=True, type=int, help="Only this message (repeatable).")
@click.option("--withheld", is_flag=True, help="Also put withheld messages back (after a consent was fixed).")
@guard
def replay_cmd(connection, database, ids, withheld):
    """Dead letters (all, by --id or --connection) back to pending; the next push sends them."""
    from fhir_iop.sync.outbox import DEAD, WITHHELD
    from fhir_iop.sync.push import replay
    store = _store(database)
    try:
        n = replay(store, connection, ids, (DEAD, WITHHELD) if withheld else (DEAD,))
    finally:
        store.dispose()
    click.echo(f"sync replay: {n} message(s) back to pending", err=True)
    sys.exit(EXIT_OK if n or not ids else EXIT_ERROR)
