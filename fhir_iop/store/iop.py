"""IOP records into the store and back out: the mapping core on one side, the store on the other.

``load`` maps IOP record files with :func:`fhir_iop.pipeline.to_fhir` and PUTs the resources
(their ids are deterministic, so loading twice changes nothing), one store transaction per batch.
``dump_ndjson`` writes the current resources as NDJSON per type, which
:func:`fhir_iop.pipeline.from_fhir` maps back to IOP records.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fhir_iop import pipeline
from fhir_iop.errors import Problem
from fhir_iop.fhir.io import NdjsonWriter
from fhir_iop.store.repository import Store


@dataclass
class LoadResult:
    types: Counter = field(default_factory=Counter)  # resources per type
    outcomes: Counter = field(default_factory=Counter)  # created / updated / unchanged


def load(store: Store, inputs: Iterable[Path], ctx=None, on_problem: Callable[[Problem], None] = lambda p: None,
         batch_size: int = 1000) -> LoadResult:
    """Map and store; each problem goes to ``on_problem``, the resources that mapped are stored."""
    result = LoadResult()
    batch: list[dict] = []

    def flush():
        if batch:
            with store.transaction() as tx:
                result.outcomes.update(tx.put_many(batch, validate=False))
            result.types.update(r["resourceType"] for r in batch)
            batch.clear()

    for item in pipeline.to_fhir(list(inputs), ctx, strict=True):  # strict: structure-checked here
        if isinstance(item, Problem):
            on_problem(item)
            continue
        batch.append(item)
        if len(batch) >= batch_size:
            flush()
    flush()
    return result


def dump_ndjson(store: Store, directory: Path) -> list[Path]:
    """The current resources as ``<Type>.ndjson`` files in ``directory``."""
    writer = NdjsonWriter(directory)
    with store.reading(snapshot=True) as tx:
        for stored in tx.iter_current():
            writer.write(stored.resource)
    writer.close()
    return sorted(directory.glob("*.ndjson"))
