"""Validation benchmark: fhir-iop's validator against fhir.resources ``model_validate`` alone, one run.

    python bench/bench_validation.py [--data DIR] [--rounds 3]

Maps the example clinic (or ``--data``) to FHIR once, then times, over the same resources:

- ``fhir.resources``: ``model_validate`` of the R4B model (structure and types only);
- ``fhir-iop base``: fhir_iop.validation against R4 core (structure, cardinality, bindings,
  invariants, extensions, references);
- ``fhir-iop profiles``: the same plus every profile in meta.profile that is known (fhir-iop's own,
  whose snapshots carry their US Core parents' rules).

Each round uses a fresh Validator (no results remembered from the round before; the definitions
are loaded once per process, timed apart). Prints the median round in resources/s and the ratios;
ratios taken in one run on one machine are the figure to quote.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "examples" / "clinic", help="IOP record directory")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from fhir_iop import pipeline
    from fhir_iop.fhir import r4
    from fhir_iop.validation import Options, Validator
    from fhir_iop.validation.definitions import load_definitions

    resources = [r for r in pipeline.to_fhir([args.data]) if isinstance(r, dict)]
    n = len(resources)
    print(f"{n:,} resources from {args.data} ({', '.join(f'{c} {t}' for t, c in Counter(r['resourceType'] for r in resources).most_common())})")

    t0 = time.perf_counter()
    defs = load_definitions()
    print(f"definitions loaded in {time.perf_counter() - t0:.2f}s (once per process)")

    def fhir_resources() -> None:
        for r in resources:
            r4.model_class(r["resourceType"]).model_validate(r)

    counts: dict[str, Counter] = {}

    def ours(meta_profiles: bool):
        def run() -> None:
            v = Validator(defs, Options(meta_profiles=meta_profiles))
            c = counts.setdefault(f"{meta_profiles}", Counter())
            c.clear()
            for r in resources:
                for i in v.validate(r):
                    c[i.severity] += 1
        return run

    modes = {"fhir.resources": fhir_resources, "fhir-iop base": ours(False), "fhir-iop profiles": ours(True)}
    rates = {}
    for name, fn in modes.items():
        times = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        rates[name] = n / statistics.median(times)
        print(f"{name:>18}: {rates[name]:>9,.0f} resources/s (median of {args.rounds} rounds, "
              f"{statistics.median(times):.2f}s per round)")
    for key, label in (("False", "fhir-iop base"), ("True", "fhir-iop profiles")):
        c = counts[key]
        print(f"{label:>18}: {c['error'] + c['fatal']} errors, {c['warning']} warnings, {c['information']} information")
    base = rates["fhir.resources"]
    for name in ("fhir-iop base", "fhir-iop profiles"):
        print(f"{name} takes {base / rates[name]:.1f}x the time of fhir.resources alone")


if __name__ == "__main__":
    main()
