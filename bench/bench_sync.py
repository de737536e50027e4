"""EHR pull benchmarks: throughput (resources/s) and memory.

1. paged search from a local sekmet-fhir (``sekmet serve`` on loopback, seeded with ``--paged``
   resources, default 3000 — sekmet writes a few thousand resources a second, so larger sets take
   long to seed): the EHR answering alone (``EhrClient.search`` over keyset pages, nothing stored)
   and the whole incremental pull (validated and stored in a SQLite store, one transaction a page);
2. bulk NDJSON from the same sekmet's ``$export`` (kick-off, poll, stream, store in batches);
3. memory on large bulk pulls from a local fake Bulk Data server in this script that generates the
   NDJSON file as it sends it (sekmet would need the set seeded first, at a few thousand a second):
   the streamed download alone (``--download``, default 1000000 Patients, about 260 MB of NDJSON)
   and a bulk pull that stores everything (``--large``, default 20000: storing runs at a few hundred
   resources a second, see below). The process's resident memory (``/proc/self/statm``) is sampled
   every tenth of the file and the peak (``ru_maxrss``) printed: it stays flat because the file is
   read line by line and stored a batch at a time.

Storing dominates a pull: each resource is structure-validated and its search index rows computed
with fhirpathpy (about 5 ms a Patient, the store's own write path); the HTTP side runs at thousands
of resources a second.

    python bench/bench_sync.py [--paged N] [--download N] [--large N] [--page-size 100] [--batch 500]

Results are printed; nothing is asserted (no timed tests).
"""

from __future__ import annotations

import argparse
import os
import resource as rusage
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fhir_iop.store import Store  # noqa: E402
from fhir_iop.sync.bulk import bulk_pull  # noqa: E402
from fhir_iop.sync.client import EhrClient  # noqa: E402
from fhir_iop.sync.config import parse  # noqa: E402
from fhir_iop.sync.pull import pull  # noqa: E402

SYSTEM = "urn:oid:2.16.840.1.113883.3.9999.1"  # bench data only


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return rusage.getrusage(rusage.RUSAGE_SELF).ru_maxrss / 1024


def patient(i: int) -> dict:
    return {"resourceType": "Patient", "id": f"b{i}", "meta": {"versionId": "1", "lastUpdated": "2026-11-01T00:00:00Z"},
            "identifier": [{"system": SYSTEM, "value": f"M{i:08d}"}], "active": True,
            "name": [{"family": f"Family{i % 997}", "given": ["Bench"]}], "gender": ("male", "female")[i % 2],
            "birthDate": f"{1950 + i % 50}-0{1 + i % 9}-1{i % 10}"}


def connection(base: str, page_size: int, batch: int, types=("Patient",)):
    return parse({"connections": {"bench": {"base_url": base, "resources": {t: "pull" for t in types},
                                            "page_size": page_size, "bulk": {"batch": batch},
                                            "timeouts": {"read": 120}}}})["bench"]


# -- 1 and 2: sekmet ----------------------------------------------------------------------------------

def bench_sekmet(n: int, page_size: int, batch: int, work: Path) -> None:
    from ehr_kit import Sekmet
    with Sekmet(work / "sekmet") as ehr:
        t = time.perf_counter()
        for start in range(0, n, 500):
            ehr.transaction([patient(i) | {"id": f"b{i}"} for i in range(start, min(n, start + 500))], method="PUT")
        print(f"seeded sekmet with {n} Patients in {time.perf_counter() - t:.1f}s")
        conn = connection(ehr.base_url, page_size, batch)

        client = EhrClient(conn)
        t, got = time.perf_counter(), 0
        for page in client.search("Patient", {"_sort": "_lastUpdated"}):  # the EHR's own (offset) paging
            got += len(page.resources)
        secs = time.perf_counter() - t
        print(f"paged search, EHR only:      {got:>7} resources in {secs:6.2f}s = {got / secs:8.0f} resources/s")

        store = Store(f"sqlite:///{work / 'paged.sqlite'}")
        t = time.perf_counter()
        r = pull(store, conn)
        secs = time.perf_counter() - t
        print(f"paged pull, stored (SQLite): {r.total():>7} resources in {secs:6.2f}s = {r.total() / secs:8.0f} "
              f"resources/s ({r.pages} pages of {page_size})")
        store.dispose()

        store = Store(f"sqlite:///{work / 'bulk.sqlite'}")
        t = time.perf_counter()
        r = bulk_pull(store, conn)
        secs = time.perf_counter() - t
        print(f"bulk NDJSON, stored (SQLite): {r.total():>6} resources in {secs:6.2f}s = {r.total() / secs:8.0f} "
              f"resources/s (kick-off, polling and sekmet's export included; batches of {batch})")
        store.dispose()


# -- 3: a fake Bulk Data server streaming a generated file -------------------------------------------------

class FakeBulk:
    def __init__(self, n: int):
        self.n = n
        bulk = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                base = f"http://127.0.0.1:{self.server.server_port}/fhir"
                if self.path.startswith("/fhir/$export"):
                    self.send_response(202)
                    self.send_header("Content-Location", f"{base}/status/1")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/fhir/status/1":
                    body = orjson.dumps({"transactionTime": "2026-11-23T00:00:00Z", "requiresAccessToken": True,
                                         "output": [{"type": "Patient", "url": f"{base}/files/Patient.ndjson"}],
                                         "error": []})
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif self.path == "/fhir/files/Patient.ndjson":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/fhir+ndjson")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    chunk = []
                    for i in range(bulk.n):
                        chunk.append(orjson.dumps(patient(i)) + b"\n")
                        if len(chunk) == 200 or i == bulk.n - 1:
                            data = b"".join(chunk)
                            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                            chunk = []
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def do_DELETE(self):
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.base = f"http://127.0.0.1:{self.server.server_port}/fhir"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class SampledClient(EhrClient):
    """Records the resident memory every tenth of the file while the pull reads it."""

    def __init__(self, *a, total: int, **kw):
        super().__init__(*a, **kw)
        self.total, self.samples = total, []

    def download_lines(self, *a, **kw):
        step = max(1, self.total // 10)
        for number, line in super().download_lines(*a, **kw):
            if number % step == 0:
                self.samples.append((number, rss_mb()))
            yield number, line


def bench_large(n: int, batch: int, work: Path) -> None:
    fake = FakeBulk(n)
    try:
        conn = connection(fake.base, 100, batch)
        store = Store(f"sqlite:///{work / 'large.sqlite'}")
        client = SampledClient(conn, total=n)
        before = rss_mb()
        t = time.perf_counter()
        r = bulk_pull(store, conn, client=client)
        secs = time.perf_counter() - t
        print(f"large bulk pull (fake server): {r.total():>7} resources in {secs:6.1f}s = "
              f"{r.total() / secs:8.0f} resources/s stored")
        print(f"  resident memory: {before:.0f} MB before; " + ", ".join(
            f"{100 * k // n}%: {mb:.0f} MB" for k, mb in client.samples) + f"; peak (ru_maxrss) {peak_mb():.0f} MB")
        if client.samples:
            first, last = client.samples[0][1], client.samples[-1][1]
            print(f"  growth from 10% to 100% of the file: {last - first:+.1f} MB "
                  f"(the file is {n * len(orjson.dumps(patient(0))) / 2**20:.0f} MB of NDJSON)")
        store.dispose()
    finally:
        fake.close()


def bench_download(n: int, work: Path) -> None:
    """The streaming download alone (no store), for a file far larger than memory would like."""
    fake = FakeBulk(n)
    try:
        client = SampledClient(connection(fake.base, 100, 500), total=n)
        url = client.export_kickoff(types=["Patient"])
        manifest = client.export_wait(url)
        before = rss_mb()
        t, got = time.perf_counter(), 0
        for res in client.download(manifest["output"][0]["url"]):
            got += res["resourceType"] == "Patient"
        secs = time.perf_counter() - t
        size = n * len(orjson.dumps(patient(0))) / 2**20
        print(f"bulk NDJSON download only:   {got:>7} resources ({size:.0f} MB) in {secs:6.1f}s = "
              f"{got / secs:8.0f} resources/s parsed")
        print(f"  resident memory: {before:.0f} MB before; " + ", ".join(
            f"{100 * k // n}%: {mb:.0f} MB" for k, mb in client.samples) + f"; peak (ru_maxrss) {peak_mb():.0f} MB")
    finally:
        fake.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paged", type=int, default=3000, help="resources seeded into sekmet (0: skip)")
    ap.add_argument("--large", type=int, default=20_000, help="resources of the large bulk pull, stored (0: skip)")
    ap.add_argument("--download", type=int, default=1_000_000, help="resources of the download-only run (0: skip)")
    ap.add_argument("--page-size", type=int, default=100)
    ap.add_argument("--batch", type=int, default=500)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        if args.paged:
            bench_sekmet(args.paged, args.page_size, args.batch, work)
        if args.download:
            bench_download(args.download, work)
        if args.large:
            bench_large(args.large, args.batch, work)


if __name__ == "__main__":
    main()
