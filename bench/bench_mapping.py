"""Mapping benchmark: fhir-iop's path against the naive fhir.resources path, in one run.

    python bench/bench_mapping.py [--clients 15000 --weeks 12] [--data DIR] [--reverse]

Generates a scaled example clinic (CSV) unless --data is given, then maps it to a FHIR
transaction Bundle on disk three ways, each in a fresh subprocess so peak memory is its own:

- ``fhir-iop``: records validated on entry, resources built as dicts, serialized with orjson;
- ``fhir-iop --strict``: the same, plus every resource re-validated with fhir.resources R4B;
- ``naive``: the same records and mapping, but each resource goes through fhir.resources
  ``model_validate`` + ``model_dump_json`` (what a straightforward implementation does).

Prints resources/s, peak RSS and the speed ratio. ``--reverse`` also times FHIR → IOP records.
Ratios taken in one run on one machine are the figure to quote; absolute rates vary by machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def run_mode(mode: str, data: Path, out: Path) -> dict:
    """Runs in the child process."""
    from fhir_iop import pipeline
    from fhir_iop.fhir import r4
    from fhir_iop.fhir.io import BundleWriter

    started = time.perf_counter()
    n = problems = 0
    if mode == "reverse":
        # FHIR NDJSON (the streaming form; a Bundle is read whole) written untimed, then read back timed
        from fhir_iop.fhir.io import NdjsonWriter
        nd = NdjsonWriter(out)
        for item in pipeline.to_fhir([data]):
            if isinstance(item, dict):
                nd.write(item)
        nd.close()
        started = time.perf_counter()
        for item in pipeline.from_fhir(sorted(out.glob("*.ndjson"))):
            if hasattr(item, "message"):
                problems += 1
            else:
                n += 1
    else:
        with open(out, "wb") as f:
            if mode == "naive":
                f.write(b'{"resourceType":"Bundle","type":"transaction","entry":[')
            else:
                writer = BundleWriter(f, "transaction")
            for item in pipeline.to_fhir([data], strict=(mode == "strict")):
                if isinstance(item, dict):
                    if mode == "naive":
                        body = r4.dump_json(item)
                        f.write((b"," if n else b"") + b'{"fullUrl":"urn:uuid:' + item["id"].encode()
                                + b'","resource":' + body + b',"request":{"method":"PUT","url":"'
                                + f"{item['resourceType']}/{item['id']}".encode() + b'"}}')
                    else:
                        writer.write(item)
                    n += 1
                else:
                    problems += 1
            if mode == "naive":
                f.write(b"]}\n")
            else:
                writer.close()
    secs = time.perf_counter() - started
    return {"mode": mode, "items": n, "problems": problems, "seconds": secs,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(mode: str, data: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, "--data", str(data), "--out", str(out)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=15000)
    ap.add_argument("--weeks", type=int, default=12)
    ap.add_argument("--data", type=Path, help="existing IOP record directory (skips generation)")
    ap.add_argument("--reverse", action="store_true", help="also time FHIR → IOP records")
    ap.add_argument("--skip-naive", action="store_true", help="leave out the (slow) naive path")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_mode(args.child, args.data, args.out)))
        return

    with tempfile.TemporaryDirectory(prefix="fhir-iop-bench-") as tmp:
        tmp = Path(tmp)
        data = args.data
        if data is None:
            from generate_clinic import generate
            data = tmp / "records"
            t0 = time.perf_counter()
            counts = generate(data, clients=args.clients, weeks=args.weeks)
            print(f"generated {sum(counts.values()):,} records ({args.clients} clients, {args.weeks} weeks) "
                  f"in {time.perf_counter() - t0:.0f}s", flush=True)
        modes = ["fhir-iop", "strict"] + ([] if args.skip_naive else ["naive"])
        results = {}
        for mode in modes:
            results[mode] = r = child(mode if mode != "fhir-iop" else "fast", data, tmp / f"{mode}.json")
            print(f"{mode:>10}: {r['items']:>10,} resources in {r['seconds']:8.1f}s = "
                  f"{r['items'] / r['seconds']:>9,.0f} resources/s, peak RSS {r['peak_rss_mb']:.0f} MB"
                  + (f", {r['problems']} problems" if r["problems"] else ""), flush=True)
        fast = results["fhir-iop"]
        for mode in modes[1:]:
            other = results[mode]
            print(f"fhir-iop vs {mode}: {other['seconds'] / fast['seconds']:.1f}x faster")
        if fast["items"] < 1_000_000:
            print(f"note: {fast['items']:,} resources; the published figure uses at least 1,000,000")
        if args.reverse:
            r = child("reverse", data, tmp / "ndjson")
            print(f"   reverse: {r['items']:>10,} records   in {r['seconds']:8.1f}s = "
                  f"{r['items'] / r['seconds']:>9,.0f} records/s, peak RSS {r['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
