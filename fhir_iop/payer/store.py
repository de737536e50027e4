"""The payer export's input from the FHIR store instead of record files.

The store holds FHIR; the rollup reads IOP records. The existing reverse mapping does the
translation: the current resources of the types the export needs are written as NDJSON per type
(one read transaction, a server-side cursor: memory flat) and :func:`fhir_iop.pipeline.from_fhir`
maps them back to IOP records, exactly as ``fhir-iop map from-fhir`` would. The record ids come
back from the identifiers the mapping wrote, so Claims built from them reference the stored
Encounters, Patients and Coverages by the same deterministic ids (``MappingContext.rid``).

Resources written by an EHR under other ids still map (by identifier); the Claims then reference
the ids fhir-iop's own mapping would give them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from fhir_iop import pipeline
from fhir_iop.errors import Problem
from fhir_iop.fhir.io import NdjsonWriter
from fhir_iop.mapping.common import MappingContext
from fhir_iop.payer.rollup import IopRecords

#: what the rollup, the Claims and the Part 2 consent check read (Condition and CareTeam: parts of
#: an enrollment; Organization: programs; Practitioner: counselors)
TYPES = ("Organization", "Practitioner", "Patient", "Coverage", "EpisodeOfCare", "Condition", "CareTeam",
         "Encounter", "Consent")


def read_store_records(store, ctx: MappingContext, tmp_dir: Path | None = None) -> tuple[IopRecords, list[Problem]]:
    """IopRecords from the store's current resources (and the reverse mapping's problems)."""
    from fhir_iop.records.model import default_context
    records, problems = IopRecords(), []
    with tempfile.TemporaryDirectory(prefix="fhir-iop-payer-", dir=tmp_dir) as tmp:
        writer = NdjsonWriter(Path(tmp))
        with store.reading(snapshot=True) as tx:
            for stored in tx.iter_current(TYPES):
                writer.write(stored.resource)
        writer.close()
        paths = [Path(tmp) / f"{t}.ndjson" for t in TYPES if (Path(tmp) / f"{t}.ndjson").is_file()]
        record_context = default_context(ctx.settings.timezone, ctx.terminology)
        for item in pipeline.from_fhir(paths, ctx, record_context, checked=True):  # the store checked each write
            if isinstance(item, Problem):
                if item.severity != "warning":
                    problems.append(item)
            else:
                records.add(item)
    return records, problems
