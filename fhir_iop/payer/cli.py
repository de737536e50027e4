"""``fhir-iop payer …``: payer encounter data from IOP record files (registered in ``fhir_iop.cli``).

Exit codes as in ``fhir_iop.cli``: 0 written, 1 written but some records were rejected, 2 bad usage,
configuration or input (nothing written). Short days are a report, not an error.
"""

from __future__ import annotations

import sys
import time
from datetime import date
from pathlib import Path

import click

from fhir_iop.cli_common import EXIT_OK, EXIT_REJECTED
from fhir_iop.cli_common import guard as _guard
from fhir_iop.cli_common import mapping_context as _context

# fhir_iop.cli imports this module to register the group, so nothing is imported back from it.
_mappings_opt = click.option("--mappings", type=click.Path(exists=True, file_okay=False), envvar="FHIR_IOP_MAPPINGS",
                             help="Site directory (site.json, ConceptMaps, payer-rules.json) overriding the shipped ones.")
_quiet_opt = click.option("--quiet", "-q", is_flag=True, help="No per-record or per-day messages.")






@click.group("payer")
def payer_group():
    """Per-diem IOP claims and encounter data for payers."""


def _date(ctx, param, value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date (YYYY-MM-DD)") from None


@payer_group.command("export")
@click.argument("inputs", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--database", help="Read the FHIR store at this database URL (e.g. sqlite:///var/fhir-iop.sqlite) "
                                 "instead of record files; each disclosure is then audited in that store.")
@click.option("--payer", "payer_id", required=True, help="The payer id (coverages.payer_id).")
@click.option("--from", "start", required=True, callback=_date, help="First service day (YYYY-MM-DD).")
@click.option("--to", "end", required=True, callback=_date, help="Last service day (YYYY-MM-DD).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="Bundle file (bundle) or directory (ndjson).")
@click.option("--format", "fmt", type=click.Choice(["bundle", "ndjson"]), default="bundle", show_default=True)
@_mappings_opt
@_quiet_opt
@_guard
def export_cmd(inputs, database, payer_id, start, end, out, fmt, mappings, quiet):
    """IOP record files (or the FHIR store: --database) → the payer's Claims (one per client, program and coverage) with the Encounters,
    Patients, Coverages and programs they reference: a collection Bundle, or NDJSON per resource type.

    Only clients whose 42 CFR Part 2 consent covers this payer (purpose HPAYMT, encounters and coverage)
    on a service day are disclosed; the others appear nowhere, not even in the counts. Short days are
    printed with their reason. What leaves is marked with the redisclosure prohibition (42 CFR 2.32).
    Read from the store, each disclosed client is audited (an AuditEvent in that store, action disclose,
    with the Consents that allowed it).
    """
    if end < start:
        raise click.UsageError("--to is before --from")
    if bool(inputs) == bool(database):
        raise click.UsageError("give either IOP record files/directories or --database, not both or neither")
    sys.exit(run_export(inputs, payer_id, start, end, out, fmt, mappings, quiet, database))


#: who the command line acts as when it audits a payer disclosure
CLI_CLIENT = "fhir-iop payer export (command line)"


def run_export(inputs, payer_id, start, end, out: Path, fmt="bundle", mappings=None, quiet=False,
               database: str | None = None) -> int:
    from fhir_iop.fhir.io import BundleWriter, NdjsonWriter
    from fhir_iop.payer.export import export, read_iop_records
    from fhir_iop.payer.rollup import load_rules
    started = time.perf_counter()
    ctx = _context(mappings)
    rules = load_rules(mappings).for_payer(payer_id)
    store = None
    if database:
        from fhir_iop.payer.store import read_store_records
        from fhir_iop.store import Store
        store = Store(database)
        records, problems = read_store_records(store, ctx)
    else:
        records, problems = read_iop_records(inputs, ctx)
    result = export(records, payer_id, start, end, rules, ctx)
    problems += result.problems
    if store is not None:  # audited before anything is written: no disclosure without its record
        audit_disclosure(store, result, records, ctx)
        store.dispose()
    from fhir_iop.bulk.part2 import labelled, mark
    for p in problems if not quiet else ():
        click.echo(str(p), err=True)
    if fmt == "ndjson":
        writer = NdjsonWriter(out)
        for res in result.all():
            writer.write(mark(res) if labelled(res) else res)
        writer.close()
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial")
        with open(tmp, "wb") as f:
            writer = BundleWriter(f, "collection")
            for res in result.all():
                writer.write(mark(res) if labelled(res) else res)
            writer.close()
        tmp.replace(out)
    if not quiet:
        for s in result.rollup.short:
            click.echo(f"short day: {s}", err=True)
    counts = result.counts()
    click.echo(f"payer {payer_id} {start}..{end}: {counts['claims']} claims, {counts['billable days']} billable days, "
               f"{counts['short days']} short days, {counts['clients']} clients; {len(result.all())} resources "
               f"written to {out} in {time.perf_counter() - started:.1f}s"
               + (f"; {len(problems)} records rejected" if problems else "")
               + ("" if store is not None else "; not audited (record files: no store; use --database)"), err=True)
    return EXIT_REJECTED if problems else EXIT_OK


def audit_disclosure(store, result, records, ctx) -> int:
    """One AuditEvent per disclosed client: its Claims, its Patient, the Consents that allowed it."""
    from fhir_iop.bulk.part2 import record
    from fhir_iop.payer.export import PURPOSE, consents_used
    from fhir_iop.security.access import Access
    access = Access(client_id=CLI_CLIENT, recipient=result.rollup.payer_id, purpose=PURPOSE)
    claims_of: dict[str, list[str]] = {}
    for c in result.claims:
        claims_of.setdefault(c["patient"]["reference"], []).append(f"Claim/{c['id']}")
    used = {mrn: ids for mrn, ids in consents_used(result.rollup, records).items()
            if f"Patient/{ctx.rid('client', mrn)}" in claims_of}  # what the payer receives: the Claims' clients
    for mrn, consent_ids in used.items():
        patient = f"Patient/{ctx.rid('client', mrn)}"
        record(store, access, "disclose", 0, entities=claims_of.get(patient, []), patients=[patient],
               consents=[f"Consent/{ctx.rid('consent', c)}" for c in consent_ids],
               description=f"payer export {result.rollup.payer_id} {result.rollup.start}..{result.rollup.end}")
    return len(used)


@payer_group.command("groups")
@click.option("--database", required=True, envvar="FHIR_IOP_DATABASE_URL", show_envvar=True,
              help="The FHIR store's database URL.")
@_mappings_opt
@_guard
def groups_cmd(database, mappings):
    """Rebuild one Group per payer (members: the clients holding an active Coverage with it; identifier: the
    payer id in the site's payer system) from the Coverages in the store. $export kick-off does it too."""
    from fhir_iop.bulk.groups import refresh
    from fhir_iop.store import Store
    store = Store(database)
    try:
        done = refresh(store, _context(mappings))
    finally:
        store.dispose()
    click.echo(f"{len(done)} payer Group(s): " + ", ".join(f"{p} Group/{g}" for p, g in sorted(done.items())),
               err=True)
    sys.exit(EXIT_OK)
