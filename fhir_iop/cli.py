"""The ``fhir-iop`` command. The only place that prints, exits, or turns errors into exit codes.

Exit codes: 0 everything mapped; 1 some records were rejected or not mapped (the rest were
written); 2 bad usage, configuration or unreadable input (nothing was written).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import click
import orjson
from tqdm import tqdm

from fhir_iop import __version__
from fhir_iop.cli_common import EXIT_ERROR, EXIT_OK, EXIT_REJECTED
from fhir_iop.cli_common import guard as _guard
from fhir_iop.cli_common import mapping_context as _context
from fhir_iop.errors import FhirIopError, Problem, operation_outcome





def _progress(items, quiet: bool, unit: str):
    return tqdm(items, unit=unit, disable=quiet or not sys.stderr.isatty(), file=sys.stderr,
                mininterval=0.5, leave=False)


class _Report:
    """Collects problems: each printed at once to stderr, all written as one OperationOutcome."""

    def __init__(self, path: Path | None, quiet: bool):
        self.path, self.quiet = path, quiet
        self.problems: list[Problem] = []
        self.errors = self.warnings = self.notes = 0

    def add(self, p: Problem) -> None:
        self.problems.append(p)
        if p.severity == "error":
            self.errors += 1
        elif p.severity == "information":  # e.g. an EHR's Patient read as the client it is linked to
            self.notes += 1
        else:
            self.warnings += 1
        if not self.quiet:
            click.echo(str(p), err=True)

    def finish(self, counts: Counter, what: str, started: float) -> int:
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_bytes(orjson.dumps(operation_outcome(self.problems), option=orjson.OPT_INDENT_2))
        total = sum(counts.values())
        secs = time.perf_counter() - started
        parts = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        click.echo(f"{total} {what} written ({parts or 'none'}) in {secs:.1f}s; "
                   f"{self.errors} rejected, {self.warnings} not mapped"
                   + (f", {self.notes} note(s)" if self.notes else "")
                   + (f"; details in {self.path}" if self.path and self.problems else ""), err=True)
        return EXIT_REJECTED if self.errors or self.warnings else EXIT_OK




@click.group()
@click.version_option(__version__, prog_name="fhir-iop")
def main():
    """IOP records ⇄ HL7 FHIR R4."""
    from fhir_iop.audit.logs import install
    install()  # PHI-free logs (query strings and exception messages withheld)


@main.group("map")
def map_group():
    """Map IOP record files to FHIR and back."""


_mappings_opt = click.option("--mappings", type=click.Path(exists=True, file_okay=False),
                             envvar="FHIR_IOP_MAPPINGS",
                             help="Site directory of ConceptMaps/CodeSystems/site.json overriding the shipped ones.")
_problems_opt = click.option("--problems", type=click.Path(dir_okay=False, path_type=Path),
                             help="Where to write the OperationOutcome of rejected records "
                                  "[default: beside --out, *.outcome.json].")
_quiet_opt = click.option("--quiet", "-q", is_flag=True, help="No progress bar, no per-record messages.")


def _problems_path(out: Path, given: Path | None) -> Path:
    if given:
        return given
    return out / "outcome.json" if out.suffix == "" else out.with_name(out.name.split(".")[0] + ".outcome.json")


@map_group.command("to-fhir")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="Bundle file (transaction/collection) or directory (ndjson).")
@click.option("--format", "fmt", type=click.Choice(["transaction", "collection", "ndjson"]),
              default="transaction", show_default=True)
@click.option("--encoding", type=click.Choice(["json", "xml"]), default="json", show_default=True,
              help="Bundle encoding (ndjson is always JSON).")
@click.option("--strict", is_flag=True, help="Re-validate every emitted resource with fhir.resources R4B.")
@_mappings_opt
@_problems_opt
@_quiet_opt
@_guard
def to_fhir_cmd(inputs, out, fmt, encoding, strict, mappings, problems, quiet):
    """IOP record files or directories (CSV or NDJSON, one file per record type) → FHIR R4."""
    if fmt == "ndjson" and encoding == "xml":
        raise click.UsageError("NDJSON is JSON only; use --format transaction or collection for XML")
    sys.exit(run_to_fhir(inputs, out, fmt, encoding, strict, mappings, problems, quiet))


def run_to_fhir(inputs, out, fmt="transaction", encoding="json", strict=False, mappings=None,
                problems=None, quiet=False) -> int:
    from fhir_iop import pipeline
    from fhir_iop.fhir.io import BundleWriter, NdjsonWriter
    started = time.perf_counter()
    ctx = _context(mappings)
    report = _Report(_problems_path(out, problems), quiet)
    counts: Counter = Counter()
    items = pipeline.to_fhir(list(inputs), ctx, strict=strict)
    tmp = out.with_name(out.name + ".partial") if fmt != "ndjson" else None
    with ExitStack() as stack:
        if fmt == "ndjson":
            writer = NdjsonWriter(out)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            writer = BundleWriter(stack.enter_context(open(tmp, "wb")), fmt, encoding)
        for item in _progress(items, quiet, "res"):
            if isinstance(item, Problem):
                report.add(item)
            else:
                writer.write(item)
                counts[item["resourceType"]] += 1
        writer.close()
    if tmp:
        tmp.replace(out)  # a Bundle appears whole or not at all
    return report.finish(counts, "resources", started)


@map_group.command("from-fhir")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the IOP record files.")
@click.option("--format", "fmt", type=click.Choice(["csv", "ndjson"]), default="csv", show_default=True)
@_mappings_opt
@_problems_opt
@_quiet_opt
@_guard
def from_fhir_cmd(inputs, out, fmt, mappings, problems, quiet):
    """FHIR R4 (Bundle, resource or NDJSON; JSON or XML) → IOP record files."""
    sys.exit(run_from_fhir(inputs, out, fmt, mappings, problems, quiet))


def run_from_fhir(inputs, out, fmt="csv", mappings=None, problems=None, quiet=False) -> int:
    from fhir_iop import pipeline
    from fhir_iop.records.io import CsvRecordWriter, NdjsonRecordWriter
    started = time.perf_counter()
    ctx = _context(mappings)
    report = _Report(_problems_path(out, problems), quiet)
    counts: Counter = Counter()
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        writers = {}
        for item in _progress(pipeline.from_fhir(list(inputs), ctx), quiet, "rec"):
            if isinstance(item, Problem):
                report.add(item)
                continue
            model = type(item)
            w = writers.get(model)
            if w is None:
                if fmt == "csv":
                    f = stack.enter_context(open(out / f"{model.file_stem}.csv", "w", newline="", encoding="utf-8"))
                    w = writers[model] = CsvRecordWriter(f, model)
                else:
                    f = stack.enter_context(open(out / f"{model.file_stem}.ndjson", "wb"))
                    w = writers[model] = NdjsonRecordWriter(f, model)
            w.write(item)
            counts[model.file_stem] += 1
    return report.finish(counts, "records", started)


@main.command()
@click.option("--out", "-o", default="out", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@_guard
def demo(out: Path):
    """The main job on the example clinic: records → FHIR transaction Bundle → records again."""
    from fhir_iop.terminology import PROJECT_ROOT
    clinic = PROJECT_ROOT / "examples" / "clinic"
    bundle = out / "clinic-bundle.json"
    code = run_to_fhir([clinic], bundle, strict=True, quiet=True)
    click.echo(f"FHIR transaction Bundle: {bundle}", err=True)
    back = out / "clinic-records"
    code2 = run_from_fhir([bundle], back, quiet=True)
    click.echo(f"IOP records read back: {back}", err=True)
    sys.exit(max(code, code2))

# -- the store and the FHIR server ----------------------------------------------------------------

_database_opt = click.option("--database", "database", envvar="FHIR_IOP_DATABASE_URL", show_envvar=True,
                             default="sqlite:///var/fhir-iop.sqlite", show_default=True,
                             help="SQLAlchemy URL of the store: sqlite:///FILE or postgresql+psycopg://USER@HOST/DB.")


def _store(database: str, migrate: bool = True):
    from fhir_iop.store import Store
    from fhir_iop.sync import outbox  # noqa: F401  (writes queue for the EHRs of $FHIR_IOP_SYNC_CONFIG)
    return Store(database, migrate=migrate)


def _safe_url(database: str) -> str:
    from sqlalchemy.engine import make_url
    return make_url(database).render_as_string(hide_password=True)


@main.group("db")
def db_group():
    """The FHIR store's database."""


@db_group.command("upgrade")
@_database_opt
@_guard
def db_upgrade(database):
    """Apply the schema migrations (the server also does this when it starts)."""
    from fhir_iop.store.engine import current_revision, make_engine, upgrade
    engine = make_engine(database)
    try:
        before = current_revision(engine)
        upgrade(engine)
        after = current_revision(engine)
    finally:
        engine.dispose()
    click.echo(f"{_safe_url(database)}: schema {before or 'empty'} -> {after}", err=True)


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@_database_opt
@click.option("--batch-size", default=1000, show_default=True, help="Resources per store transaction.")
@_mappings_opt
@_problems_opt
@_quiet_opt
@_guard
def load(inputs, database, batch_size, mappings, problems, quiet):
    """IOP record files or directories → FHIR → the store (PUT by id: loading twice changes nothing)."""
    sys.exit(run_load(inputs, database, batch_size, mappings, problems, quiet))


def run_load(inputs, database, batch_size=1000, mappings=None, problems=None, quiet=False) -> int:
    from fhir_iop.store.iop import load as load_records
    started = time.perf_counter()
    report = _Report(problems, quiet)
    store = _store(database)
    try:
        result = load_records(store, list(inputs), _context(mappings), report.add, batch_size)
    finally:
        store.dispose()
    changes = ", ".join(f"{n} {k}" for k, n in sorted(result.outcomes.items())) or "no changes"
    click.echo(f"store {_safe_url(database)}: {changes}", err=True)
    return report.finish(result.types, "resources", started)


@main.command()
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the IOP record files.")
@click.option("--format", "fmt", type=click.Choice(["csv", "ndjson"]), default="csv", show_default=True)
@_database_opt
@_mappings_opt
@_problems_opt
@_quiet_opt
@_guard
def export(out, fmt, database, mappings, problems, quiet):
    """The store's FHIR resources → IOP record files (what an EHR wrote included)."""
    import tempfile

    from fhir_iop.store.iop import dump_ndjson
    store = _store(database)
    try:
        with tempfile.TemporaryDirectory(prefix="fhir-iop-export-") as tmp:
            files = dump_ndjson(store, Path(tmp))
            if not files:
                click.echo(f"store {_safe_url(database)} holds no resources; nothing to export", err=True)
                sys.exit(EXIT_OK)
            code = run_from_fhir(files, out, fmt, mappings, problems or out / "outcome.json", quiet)
    finally:
        store.dispose()
    sys.exit(code)


def _first_patient(app):
    from fhir_iop.store import search
    return search.parse(app.extensions["fhir_iop"].store.registry, "Patient", [("_count", "1")])


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@_database_opt
@click.option("--demo", is_flag=True, help="Load the example clinic into the store first.")
@_guard
def serve(host, port, database, demo):
    """The FHIR R4 server (development server; production: gunicorn 'server:create_app()')."""
    from server import create_app
    if demo:
        from fhir_iop.terminology import PROJECT_ROOT
        clinic = PROJECT_ROOT / "examples" / "clinic"
        click.echo(f"loading the example clinic ({clinic}) into {_safe_url(database)} …", err=True)
        code = run_load([clinic], database, quiet=True)
        if code == EXIT_ERROR:
            sys.exit(code)
    app = create_app({"DATABASE_URL": database})
    base = f"http://{host}:{port}"
    with app.extensions["fhir_iop"].store.reading() as tx:
        patients = tx.search(_first_patient(app)).matches
    pid = patients[0][1] if patients else "<id>"
    auth = ""
    if demo and not app.config.get("INSECURE_NO_AUTH"):  # a demo client and how to get its token
        from fhir_iop.security.cli import DEMO_CLIENT, demo_client
        key = demo_client(database)
        exe = sys.argv[0] if Path(sys.argv[0]).name == "fhir-iop" else "fhir-iop"
        click.echo(f"registered client '{DEMO_CLIENT}' (internal, admin, system/*.read); its key is {key}", err=True)
        click.echo(f"  export TOKEN=$({exe} clients token {DEMO_CLIENT} --key {key} --server {base})"
                   "   # valid 5 minutes", err=True)
        auth = "-H \"Authorization: Bearer $TOKEN\" "
    click.echo(f"FHIR R4 server at {base}/ (store {_safe_url(database)}); for example:\n"
               f"  curl {base}/metadata\n"
               f"  curl {auth}'{base}/Patient?_count=5'\n"
               f"  curl {auth}'{base}/Encounter?patient=Patient/{pid}&date=ge2024-01-01&_sort=-date'\n"
               f"  curl {auth}-H 'Accept: application/fhir+xml' '{base}/EpisodeOfCare?_include=EpisodeOfCare:patient'\n"
               "Ctrl-C stops it.", err=True)
    app.run(host=host, port=port, threaded=True, use_reloader=False)


# -- validation -------------------------------------------------------------------------------------

@main.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--profile", "profiles", multiple=True, metavar="URL",
              help="Also validate against this profile (canonical URL); repeatable. meta.profile is always used.")
@click.option("--outcome", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the OperationOutcome of all files here.")
@click.option("--verbose", "-v", is_flag=True, help="Also print information issues (not-checked bindings, must-support).")
@_mappings_opt
@_guard
def validate_cmd(files, profiles, outcome, verbose, mappings):
    """FHIR R4 resources (JSON, NDJSON or XML; a Bundle entry by entry) against R4 and the profiles fhir-iop knows.

    Prints `file: severity location: message` per issue. Exit code 0 = no errors, 1 = errors,
    2 = a file could not be read or a profile is not known.
    """
    sys.exit(run_validate(files, profiles, outcome, verbose, mappings))


def run_validate(files, profiles=(), outcome=None, verbose=False, mappings=None) -> int:
    from fhir_iop.validation import Validator, operation_outcome
    from fhir_iop.validation.definitions import load_definitions
    from fhir_iop.validation.files import read_resources
    validator = Validator(load_definitions(mappings))
    issues, where, code, counts = [], [], EXIT_OK, Counter()
    for path in files:
        try:
            items = read_resources(path, validator.defs)
        except FhirIopError as e:
            click.echo(f"fhir-iop: {e}", err=True)
            code = EXIT_ERROR
            continue
        for label, resource, found in items:
            found = found + validator.validate(resource, list(profiles))
            for i in found:
                counts[i.severity] += 1
                if verbose or i.severity != "information":
                    click.echo(f"{label}: {i.severity} {i.expression}: {i.message}")
            issues += found
            where += [label] * len(found)
            if code == EXIT_OK and any(i.severity in ("error", "fatal") for i in found):
                code = EXIT_REJECTED
    if outcome:
        oo = operation_outcome(issues)
        for issue, label in zip(oo["issue"], where):
            issue["diagnostics"] = f"{label}: {issue['diagnostics']}"
        outcome.parent.mkdir(parents=True, exist_ok=True)
        outcome.write_bytes(orjson.dumps(oo, option=orjson.OPT_INDENT_2))
    click.echo(f"{len(files)} file(s): {counts['fatal'] + counts['error']} error(s), {counts['warning']} warning(s), "
               f"{counts['information']} information" + (f"; OperationOutcome in {outcome}" if outcome else ""),
               err=True)
    return code


@main.command("agreement")
@click.option("--fixtures", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The HL7 validator test cases [default: ../shared/fixtures/fhir-test-cases-validator-r4].")
@click.option("--quiet", "-q", is_flag=True, help="Only the figures, not the disagreements.")
@_guard
def agreement_cmd(fixtures, quiet):
    """Agreement with the HL7 Java validator on its R4 test cases (verdict and error locations)."""
    from fhir_iop.validation.agreement import run_agreement
    for line in run_agreement(fixtures).lines(verbose=not quiet):
        click.echo(line)


from fhir_iop.payer.cli import payer_group  # noqa: E402  (its module needs nothing from this one)
main.add_command(payer_group)
from fhir_iop.security.cli import clients_group  # noqa: E402
main.add_command(clients_group)
from fhir_iop.sync.cli import sync_group  # noqa: E402
main.add_command(sync_group)
from fhir_iop.audit.cli import audit_group  # noqa: E402
main.add_command(audit_group)

if __name__ == "__main__":
    main()
