"""What auditing costs per request: the same reads and searches with the audit hook on and off.

    .venv/bin/python bench/bench_audit.py [--n 300] [--postgres URL]

Each request runs through Flask's test client (no network) against a fresh store holding the
example clinic; "unaudited" removes the after-request hook (nothing else changes). Two ways to record:
``spool`` (the default: appended to the audit spool before the response; the shipping into the
store, timed separately, happens off the request path and is shown per request as "+ ship") and
``inline`` (``AUDIT_SPOOL=off``: written into the store before the response). Prints the mean
milliseconds per request and the difference, for SQLite and, when reachable, PostgreSQL.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def timed(client, paths: list[str], n: int) -> float:
    out = []
    for i in range(n):
        t = time.perf_counter()
        r = client.get(paths[i % len(paths)])
        out.append(time.perf_counter() - t)
        assert r.status_code == 200, r.status_code
    return statistics.mean(out) * 1000


def run(url: str, n: int) -> None:
    for mode in ("spool", "inline"):
        run_mode(url, n, mode)


def run_mode(url: str, n: int, mode: str) -> None:
    from server import audit_hook, create_app
    from fhir_iop.store.iop import load
    app = create_app({"DATABASE_URL": url, "TESTING": True, "INSECURE_NO_AUTH": True,
                      "AUDIT_SPOOL": "off" if mode == "inline" else "auto", "AUDIT_SPOOL_INTERVAL": 3600})
    spool = app.extensions.get("fhir_iop_audit_spool")
    store = app.extensions["fhir_iop"].store
    load(store, [ROOT / "examples" / "clinic"])
    c = app.test_client()
    ids = [e["resource"]["id"] for e in c.get("/Encounter?_count=100").json["entry"]]
    cases = {"read": [f"/Encounter/{i}" for i in ids], "search (20 per page)": ["/Encounter?_count=20"]}
    hooks = app.after_request_funcs[None]
    for name, paths in cases.items():
        timed(c, paths, 20)  # warm up
        if spool is not None:
            spool.drain()
        on = timed(c, paths, n)
        ship = ""
        if spool is not None:
            t = time.perf_counter()
            spool.drain()
            ship = f"  + ship {(time.perf_counter() - t) * 1000 / n:5.2f} ms/request off the request path"
        hooks.remove(audit_hook.audit_response)
        off = timed(c, paths, n)
        hooks.append(audit_hook.audit_response)
        print(f"{store.engine.dialect.name:10} {mode:6} {name:22} audited {on:6.2f} ms  unaudited {off:6.2f} ms  "
              f"audit +{on - off:5.2f} ms/request ({(on - off) / off:+.0%}){ship}")
    store.dispose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--postgres", default=PG)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        run(f"sqlite:///{d}/bench.sqlite", a.n)
    from sqlalchemy import create_engine, text
    schema = f"bench_audit_{uuid.uuid4().hex[:8]}"
    admin = create_engine(a.postgres, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as e:
        print(f"PostgreSQL not measured: {type(e).__name__}")
        return
    try:
        run(f"{a.postgres}?options=-csearch_path%3D{schema}", a.n)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


if __name__ == "__main__":
    main()
