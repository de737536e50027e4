"""FHIR Bulk Data export throughput: MB/s of NDJSON written for a large clinic.

A clinic is generated with ``examples/generate_clinic.py`` (``--clients``, ``--weeks``; default 500
clients over 12 weeks), mapped and loaded into a store (SQLite file, or ``--database URL``), and then
exported by the bulk export runner (``fhir_iop.bulk.runner.run_job``, the code a ``$export`` kick-off
runs in its worker thread; no HTTP in the timing):

1. system ``$export`` as the program itself (every stored type, stored bodies written as they are);
2. a payer's ``Group/[id]/$export`` as that payer (HPAYMT): Part 2 gate per resource, redisclosure
   mark on every line, and the Claims (reverse mapping of the store + rollup + Claims).

Printed per run: resources, MB of NDJSON, seconds, MB/s, resources/s, and the peak RSS of the process
(``ru_maxrss``) after each step, to show the streaming keeps memory flat.

    python bench/bench_export.py [--clients N] [--weeks N] [--database URL] [--payer ID]
"""

from __future__ import annotations

import argparse
import resource as rusage
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fhir_iop.bulk import groups, jobs, runner  # noqa: E402
from fhir_iop.mapping.common import MappingContext  # noqa: E402
from fhir_iop.security.access import Access  # noqa: E402
from fhir_iop.store import Store  # noqa: E402
from fhir_iop.store.iop import load  # noqa: E402


def rss_mb() -> float:
    return rusage.getrusage(rusage.RUSAGE_SELF).ru_maxrss / 1024


def run(store: Store, out: Path, access: Access, params: dict, label: str) -> None:
    job = jobs.create(store, access.client_id, {"client_id": access.client_id}, f"bench {label}", params)
    started = time.perf_counter()
    runner.run_job(store, job.id, access, out, ttl=3600)
    seconds = time.perf_counter() - started
    done = jobs.get(store, job.id)
    if done.state != "completed":
        raise SystemExit(f"{label}: the export {done.state}: {done.error}")
    size = sum(f.stat().st_size for f in (out / job.id).glob("*.ndjson"))
    count = sum(f["count"] for f in done.files)
    print(f"{label:<34} {count:>9} resources {size / 1e6:>9.1f} MB {seconds:>7.1f} s {size / 1e6 / seconds:>7.1f} MB/s "
          f"{count / seconds:>9.0f} res/s   peak RSS {rss_mb():.0f} MB", flush=True)
    jobs.cancel(store, job.id, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--weeks", type=int, default=12)
    ap.add_argument("--database", help="store URL (default: a SQLite file in a temporary directory)")
    ap.add_argument("--payer", default="AETNA", help="payer of the Group export")
    args = ap.parse_args()
    ctx = MappingContext()
    with tempfile.TemporaryDirectory(prefix="fhir-iop-bench-export-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "examples" / "generate_clinic.py"), "--clients", str(args.clients),
                        "--weeks", str(args.weeks), str(tmp / "clinic")], check=True, stdout=subprocess.DEVNULL)
        store = Store(args.database or f"sqlite:///{tmp / 'fhir.sqlite'}")
        loaded = load(store, [tmp / "clinic"], ctx)
        print(f"clinic: {args.clients} clients, {args.weeks} weeks: {sum(loaded.types.values())} resources stored in "
              f"{time.perf_counter() - started:.0f} s ({store.engine.dialect.name}); peak RSS {rss_mb():.0f} MB",
              flush=True)
        program = Access(client_id="bench (program)")
        run(store, tmp / "exports", program, {"kind": "system", "types": list(runner.SYSTEM_TYPES)},
            "system $export (program)")
        by_payer = groups.refresh(store, ctx)
        if args.payer not in by_payer:
            raise SystemExit(f"no payer {args.payer!r} in the generated clinic (payers: {', '.join(sorted(by_payer))})")
        payer = Access(client_id="bench (payer)", recipient=args.payer, purpose="HPAYMT")
        run(store, tmp / "exports", payer, {"kind": "group", "group": by_payer[args.payer],
                                            "types": list(runner.GROUP_TYPES)}, f"Group/$export ({args.payer})")
        store.dispose()


if __name__ == "__main__":
    main()
