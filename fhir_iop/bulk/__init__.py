"""FHIR Bulk Data export: jobs, the NDJSON export runner, payer Groups, and the Part 2 / audit adapters.

* :mod:`fhir_iop.bulk.jobs` — the ``bulk_export_job`` rows (migration 0006).
* :mod:`fhir_iop.bulk.groups` — one Group per payer, members = the clients holding a Coverage with it.
* :mod:`fhir_iop.bulk.runner` — runs one job: streams the store, filters by Part 2, writes NDJSON.
* :mod:`fhir_iop.bulk.part2` — the thin adapter to ``fhir_iop.disclosure`` (Gate, mark) and
  ``fhir_iop.audit`` (record).

The HTTP side is ``server/routes/export.py``.
"""
