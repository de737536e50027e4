"""Several `fhir-iop sync push` processes at once on PostgreSQL: each message is sent exactly once.

The EHR here is a counting HTTP server on loopback that answers every conditional update with 201
and remembers how many PUTs each identifier got: unlike a real FHIR server (where a second PUT of
the same identifier is a harmless update), it shows a message sent twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from server_kit import _pg_schema_url, postgres_reachable
from sync_push_kit import configure, load, load_clinic_base, of_type

from fhir_iop.disclosure import labelled
from fhir_iop.store import Store
from fhir_iop.sync.config import load as load_config
from fhir_iop.sync.push import counts

FHIR_IOP = os.path.join(os.path.dirname(sys.executable), "fhir-iop")


@pytest.fixture
def pg_url():
    if not postgres_reachable():
        pytest.skip("PostgreSQL is not reachable")
    yield from _pg_schema_url()


class CountingEhr:
    def __init__(self):
        self.puts: Counter = Counter()
        self.lock = threading.Lock()
        ehr = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_PUT(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                u = urlsplit(self.path)
                key = (u.path.rsplit("/", 1)[1], parse_qs(u.query).get("identifier", [""])[0])
                with ehr.lock:
                    ehr.puts[key] += 1
                self.send_response(201)
                self.send_header("Location", f"{u.path}/x/_history/1")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_port}/fhir"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def test_three_worker_processes_send_each_message_once(tmp_path, pg_url):
    with CountingEhr() as ehr:
        cfg = tmp_path / "ehr.json"
        cfg.write_text(json.dumps({"connections": {"riverside": {
            "base_url": ehr.base_url, "purpose": "TREAT",  # no recipient: only data that is not Part 2 data goes
            "resources": {"Encounter": "push"}, "retries": {"max_attempts": 1}, "push": {"batch": 5}}}}))
        configure(load_config(cfg))
        store = Store(pg_url)
        try:
            load_clinic_base(store)
            encs = of_type("Encounter")
            part2 = [e for e in encs if labelled(e)][:20]
            encs = [e for e in encs if not labelled(e)][:150]  # group sessions: about no one client
            load(store, encs + part2)
            assert counts(store)["riverside"]["pending"] == len(encs) + len(part2)
            env = {**os.environ, "FHIR_IOP_SYNC_CONFIG": str(cfg), "FHIR_IOP_DATABASE_URL": pg_url}
            procs = [subprocess.Popen([FHIR_IOP, "sync", "push", "--once"], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE) for _ in range(3)]
            errs = [p.communicate(timeout=300)[1].decode() for p in procs]
            assert [p.returncode for p in procs] == [0, 0, 0], errs
            assert counts(store)["riverside"]["sent"] == len(encs)
            assert counts(store)["riverside"]["withheld"] == len(part2)
        finally:
            store.dispose()
            configure(None)  # back to $FHIR_IOP_SYNC_CONFIG (unset in tests)
    assert len(ehr.puts) == len(encs)
    assert set(ehr.puts.values()) == {1}, "a message was sent twice"
    assert not {k for k in ehr.puts if any(k[1].endswith(i["value"]) for e in part2 for i in e["identifier"])}
    assert sum(1 for e in errs if " sent" in e) >= 2, errs  # the processes shared the work
