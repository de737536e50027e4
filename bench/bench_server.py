"""FHIR facade benchmarks, in one run, on SQLite and (when reachable) PostgreSQL:

1. read requests/s: ``GET /Patient/<id>`` on the facade against a bare Flask route returning the
   same bytes (target: ratio >= 0.7), in-process through WSGI (the app's own cost, no network) and
   over HTTP on loopback (gunicorn with one sync worker each, one client), with the CPU time per read
   of the server's worker, the client and the audit shipper (Linux /proc): the ratio depends on how
   the machine's cost of an HTTP exchange compares with the facade's own work, and these say which;
2. search latency p50/p95 with N stored resources (``--resources``, default 100000; the issue's
   target is < 25 ms p95 at 1000000): ``Observation?patient=…``, ``Encounter?patient=…&date=ge…``,
   ``Observation?code=…&_count=20`` and ``Patient?identifier=…``.

Resources are generated (patients, encounters, observations), indexed by the store's real
indexer and written in bulk through SQLAlchemy Core, bypassing only the per-request HTTP path.

    python bench/bench_server.py [--resources N] [--reads N] [--backends sqlite,postgresql] [--shipper external|thread]
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flask import Flask  # noqa: E402
from sqlalchemy import create_engine, insert, text  # noqa: E402

from fhir_iop.store import Store  # noqa: E402
from fhir_iop.store.models import INDEX_TABLES, resource, resource_version  # noqa: E402
from fhir_iop.store.params import index_rows  # noqa: E402
from fhir_iop.store.repository import instant, now  # noqa: E402

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SYS = "urn:oid:2.16.840.1.113883.4.642.99"
CODES = ["3426-4", "3349-9", "19295-5", "3879-2", "14267-0", "16226-3"]


def gen(n: int, seed: int = 7):
    """Patients, each with 4 encounters and 5 observations (10 resources per patient)."""
    rnd = random.Random(seed)
    for p in range(max(1, n // 10)):
        pid = f"p{p}"
        yield {"resourceType": "Patient", "id": pid, "identifier": [{"system": SYS, "value": f"M{p:07d}"}],
               "name": [{"family": f"Family{p % 997}", "given": ["Pat"]}], "gender": rnd.choice(["male", "female"]),
               "birthDate": f"{1950 + p % 50}-0{1 + p % 9}-1{p % 10}"}
        for e in range(4):
            day = f"2024-{1 + (p + e) % 12:02d}-{1 + (p * 7 + e) % 28:02d}"
            yield {"resourceType": "Encounter", "id": f"e{p}-{e}", "status": "finished",
                   "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                   "subject": {"reference": f"Patient/{pid}"}, "period": {"start": f"{day}T10:00:00Z",
                                                                          "end": f"{day}T11:00:00Z"}}
        for o in range(5):
            yield {"resourceType": "Observation", "id": f"o{p}-{o}", "status": "final",
                   "code": {"coding": [{"system": "http://loinc.org", "code": rnd.choice(CODES)}]},
                   "subject": {"reference": f"Patient/{pid}"}, "encounter": {"reference": f"Encounter/e{p}-{o % 4}"},
                   "effectiveDateTime": f"2024-{1 + (p + o) % 12:02d}-15", "valueCodeableConcept": {"text": "negative"}}


def bulk_load(store: Store, n: int, batch: int = 5000) -> float:
    started = time.perf_counter()
    when = now()
    pending, rid = [], 0
    reg = store.registry

    def flush():
        if not pending:
            return
        with store.transaction() as tx:
            c = tx.conn
            rows = [{"rid": r[0], "type": r[1]["resourceType"], "id": r[1]["id"], "version_id": 1,
                     "last_updated": when, "deleted": False, "body": r[2]} for r in pending]
            c.execute(insert(resource), rows)
            c.execute(insert(resource_version), [{**row, "method": "PUT"} for row in rows])
            per_kind: dict[str, list] = {}
            for pk, res, _ in pending:
                for kind, irows in index_rows(res, reg.for_type(res["resourceType"])).items():
                    per_kind.setdefault(kind, []).extend({"rid": pk, "type": res["resourceType"], **x}
                                                         for x in irows)
            for kind, irows in per_kind.items():
                if irows:
                    c.execute(insert(INDEX_TABLES[kind]), irows)
        pending.clear()

    for res in gen(n):
        rid += 1
        res["meta"] = {"versionId": "1", "lastUpdated": instant(when)}
        pending.append((rid, res, orjson.dumps(res).decode()))
        if len(pending) >= batch:
            flush()
            print(f"\r  loaded {rid} resources", end="", file=sys.stderr, flush=True)
    flush()
    print(file=sys.stderr)
    if store.engine.dialect.name == "postgresql":
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            # the rows above carry their own rid: move the sequence past them, as the store's own inserts need
            c.execute(text("SELECT setval(pg_get_serial_sequence('resource', 'rid'), (SELECT max(rid) FROM resource))"))
            c.execute(text("ANALYZE"))
    else:
        with store.engine.connect() as c:
            c.exec_driver_sql("ANALYZE")
    return time.perf_counter() - started


BARE_APP = """from pathlib import Path
from flask import Flask
app = Flask("bare")
BODY = (Path(__file__).parent / "body.json").read_bytes()


@app.get("/Patient/<rid>")
def same(rid):
    return app.response_class(BODY, content_type="application/fhir+json; charset=utf-8")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: the Authorization header of a read-all client (set by ``authorize``): the facade's figures include
#: checking its token and scopes on every request, as in production
AUTH: dict = {}
#: an administrator's header (AuditEvent search: the end of a timed round, see ``read_ratio``)
ADMIN: dict = {}


def authorize(app) -> None:
    """Register a ``system/*.read`` client in the app's store and send its token with every request."""
    from flask.testing import FlaskClient

    from fhir_iop.security import clients, keys
    cid = f"bench-{uuid.uuid4().hex[:8]}"
    clients.register(app.extensions["fhir_iop"].store, cid, scopes="system/*.read",
                     jwks=keys.jwks_of(keys.generate("ES384")))
    AUTH["Authorization"] = "Bearer " + app.extensions["fhir_iop_auth"].issue(cid, "system/*.read", lifetime=3600)
    clients.register(app.extensions["fhir_iop"].store, cid + "-admin", scopes="system/AuditEvent.rs", admin=True,
                     jwks=keys.jwks_of(keys.generate("ES384")))
    ADMIN["Authorization"] = "Bearer " + app.extensions["fhir_iop_auth"].issue(cid + "-admin", "system/AuditEvent.rs",
                                                                                lifetime=3600)

    class Client(FlaskClient):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.environ_base["HTTP_AUTHORIZATION"] = AUTH["Authorization"]

    app.test_client_class = Client


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return sorted(out)


def process_cpu(pid: int | None = None) -> float | None:
    """CPU seconds (user + system) process ``pid`` has used (Linux /proc); None where it cannot say."""
    import os
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Gunicorn:
    """A gunicorn (one sync worker, as documented) serving ``app_spec`` on a free loopback port."""

    def __init__(self, app_spec: str, cwd: str, env: dict, probe: str):
        import os
        import subprocess

        import requests
        self.port = free_port()
        exe = str(Path(sys.executable).parent / "gunicorn")
        self.proc = subprocess.Popen([exe, "-w", "1", "-b", f"127.0.0.1:{self.port}", app_spec], cwd=cwd,
                                     env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(self.url(probe), timeout=5, headers=AUTH).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gunicorn {app_spec} did not answer")
            time.sleep(0.2)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def worker_cpu(self) -> float | None:
        """CPU seconds (user + system) the worker has used so far; None where /proc cannot say."""
        return process_cpu(*_children(self.proc.pid)[:1])

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def read_ratio(app, pid: str, n: int, rounds: int = 5, shipper: str = "external") -> dict:
    """Reads per second, facade vs a bare Flask route returning the same bytes: in-process (WSGI
    test client) and over HTTP (two gunicorns, one ``requests`` session each, ``rounds`` alternating
    rounds of ``n // rounds`` reads, medians). A facade round ends with an administrator's AuditEvent
    search, which answers only once every AuditEvent of the round is in the store (the facade drains
    its audit spool first): storing the audit trail counts against the facade. ``shipper``: the
    facade's ``AUDIT_SPOOL_SHIPPER``; ``external`` runs ``fhir-iop audit ship --loop`` beside it, as
    docs/security.md has it for production."""
    import requests
    body = app.test_client().get(f"/Patient/{pid}").data
    bare = Flask("bare")

    @bare.get("/Patient/<rid>")
    def _same(rid):
        return bare.response_class(body, content_type="application/fhir+json; charset=utf-8")

    def rate(a):
        c = a.test_client()
        for _ in range(50):
            c.get(f"/Patient/{pid}")
        t = time.perf_counter()
        for _ in range(n):
            r = c.get(f"/Patient/{pid}")
            assert r.status_code == 200, (r.status_code, r.data[:400])
        return n / (time.perf_counter() - t)

    from server.audit_hook import drain
    with app.app_context():
        drain()
    facade, plain = rate(app), rate(bare)
    per_round = max(50, n // rounds)
    path = f"/Patient/{pid}"
    with tempfile.TemporaryDirectory(prefix="fhir-iop-bare-") as tmp:
        (Path(tmp) / "body.json").write_bytes(body)
        (Path(tmp) / "bare_app.py").write_text(BARE_APP, encoding="utf-8")
        import os
        import subprocess
        env = {"FHIR_IOP_DATABASE_URL": app.extensions["fhir_iop"].store.url,
               "FHIR_IOP_AUDIT_SPOOL": str(Path(tmp) / "audit-spool"), "FHIR_IOP_AUDIT_SPOOL_SHIPPER": shipper}
        ship = None
        if shipper == "external":
            ship = subprocess.Popen([str(Path(sys.executable).parent / "fhir-iop"), "audit", "ship", "--loop"],
                                    env={**os.environ, **env}, stderr=subprocess.DEVNULL)
        servers = {"bare": Gunicorn("bare_app:app", tmp, {}, path),
                   "facade": Gunicorn("server:create_app()", str(Path(__file__).resolve().parents[1]), env, path)}
        rates: dict[str, list[float]] = {"bare": [], "facade": []}
        #: CPU µs per read: the server's worker, the client (this process), the audit shipper
        cpu: dict[str, dict[str, list[float]]] = {k: {"worker": [], "client": [], "shipper": []} for k in rates}
        audited = 0
        try:
            sessions = {k: requests.Session() for k in servers}
            for k, s in sessions.items():
                s.headers.update(AUTH)
                for _ in range(50):
                    assert s.get(servers[k].url(path)).status_code == 200
            for _ in range(rounds):
                for k in ("bare", "facade"):
                    url, s = servers[k].url(path), sessions[k]
                    before = (servers[k].worker_cpu(), time.process_time(), process_cpu(ship.pid if ship else None))
                    started = time.perf_counter()
                    for _ in range(per_round):
                        assert s.get(url).status_code == 200
                    if k == "facade":  # the round's AuditEvents, all in the store
                        r = requests.get(servers[k].url("/AuditEvent?_summary=count&_total=accurate"), headers=ADMIN)
                        assert r.status_code == 200, r.text[:300]
                        audited = r.json()["total"]
                    rates[k].append(per_round / (time.perf_counter() - started))
                    after = (servers[k].worker_cpu(), time.process_time(), process_cpu(ship.pid if ship else None))
                    for name, b0, b1 in zip(("worker", "client", "shipper"), before, after, strict=True):
                        if b0 is not None and b1 is not None:
                            cpu[k][name].append((b1 - b0) / per_round * 1e6)
        finally:
            for server in servers.values():
                server.stop()
            if ship is not None:
                ship.terminate()
                ship.wait(timeout=30)
        assert audited >= rounds * per_round, (audited, rounds * per_round)
    hb, hf = statistics.median(rates["bare"]), statistics.median(rates["facade"])
    return {"facade_rps": facade, "bare_rps": plain, "ratio": facade / plain,
            "http_facade_rps": hf, "http_bare_rps": hb, "http_ratio": hf / hb,
            "http_rounds": rates, "http_shipper": shipper,
            "http_cpu_us_per_read": {k: {n: statistics.median(v) for n, v in d.items() if v} for k, d in cpu.items()}}


def search_latency(app, n_patients: int, n: int = 200) -> dict:
    c = app.test_client()
    rnd = random.Random(3)
    queries = {
        "Observation?patient": lambda: f"/Observation?patient=Patient/p{rnd.randrange(n_patients)}",
        "Encounter?patient&date": lambda: f"/Encounter?patient=p{rnd.randrange(n_patients)}&date=ge2024-06-01",
        "Observation?code&_count=20": lambda: f"/Observation?code=http://loinc.org|{rnd.choice(CODES)}&_count=20",
        "Patient?identifier": lambda: f"/Patient?identifier={SYS}|M{rnd.randrange(n_patients):07d}",
    }
    out = {}
    for name, make in queries.items():
        times = []
        for _ in range(n):
            url = make()
            t = time.perf_counter()
            r = c.get(url)
            times.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200, r.data[:300]
        times.sort()
        out[name] = {"p50_ms": statistics.median(times), "p95_ms": times[int(len(times) * 0.95) - 1]}
    return out


def pg_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


def run_backend(name: str, n: int, reads: int, shipper: str = "external") -> dict:
    from server import create_app
    schema = None
    tmp = tempfile.TemporaryDirectory(prefix="fhir-iop-bench-")
    if name == "sqlite":
        url = f"sqlite:///{tmp.name}/bench.sqlite"
    else:
        schema = f"fhir_iop_bench_{uuid.uuid4().hex[:10]}"
        admin = create_engine(PG, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = f"{PG}?options=-csearch_path%3D{schema}"
    try:
        app = create_app({"DATABASE_URL": url})
        authorize(app)
        store = app.extensions["fhir_iop"].store
        secs = bulk_load(store, n)
        result = {"load_s": secs, "resources": store_count(store)}
        result["read"] = read_ratio(app, "p0", reads, shipper=shipper)
        result["search"] = search_latency(app, max(1, n // 10))
        store.dispose()
        return result
    finally:
        if schema:
            with admin.connect() as c:
                c.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            admin.dispose()
        tmp.cleanup()


def store_count(store: Store) -> int:
    with store.reading() as tx:
        return tx.count()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resources", type=int, default=100_000)
    ap.add_argument("--reads", type=int, default=10000)
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--shipper", default="external", choices=("external", "thread"),
                    help="the facade's AUDIT_SPOOL_SHIPPER (external: fhir-iop audit ship beside gunicorn)")
    args = ap.parse_args()
    report = {}
    for backend in args.backends.split(","):
        if backend == "postgresql" and not pg_reachable():
            print("postgresql: skipped (127.0.0.1:5432 unreachable)", file=sys.stderr)
            continue
        print(f"{backend}: loading {args.resources} resources …", file=sys.stderr)
        r = report[backend] = run_backend(backend, args.resources, args.reads, args.shipper)
        rd = r["read"]
        print(f"{backend}: {r['resources']} resources loaded in {r['load_s']:.0f}s")
        print(f"{backend}:   read in-process {rd['facade_rps']:.0f} req/s vs bare Flask {rd['bare_rps']:.0f} req/s "
              f"= {rd['ratio']:.2f}; over HTTP {rd['http_facade_rps']:.0f} vs {rd['http_bare_rps']:.0f} req/s "
              f"= {rd['http_ratio']:.2f} (target >= 0.7; audit shipper: {rd['http_shipper']})")
        for k, c in rd["http_cpu_us_per_read"].items():
            print(f"{backend}:   over HTTP, CPU µs per read ({k}): " + ", ".join(f"{n} {v:.0f}" for n, v in c.items()))
        for q, s in r["search"].items():
            print(f"{backend}:   {q:28s} p50 {s['p50_ms']:6.1f} ms   p95 {s['p95_ms']:6.1f} ms (target < 25)")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "bench_server.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
