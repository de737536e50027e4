"""Helpers of the sync push tests (tests/test_sync_push*.py, tests/test_sync_outbox.py)."""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

from sqlalchemy import select

from fhir_iop.store.models import sync_outbox
from fhir_iop.sync import outbox
from fhir_iop.sync.config import parse

ROOT = Path(__file__).resolve().parents[1]
CLINIC = ROOT / "examples" / "clinic"
#: recipient ids of the example clinic's consents (examples/clinic/consents.csv)
RIVERSIDE, BAYSHORE = "RIVERSIDE-PC", "BAYSHORE-FHC"


@lru_cache(maxsize=1)
def _clinic() -> tuple:
    from fhir_iop import pipeline
    return tuple(r for r in pipeline.to_fhir(sorted(CLINIC.glob("*.csv")), None, strict=True) if isinstance(r, dict))


def clinic() -> list[dict]:
    """The example clinic mapped to FHIR (deep copies: tests may change them)."""
    return copy.deepcopy(list(_clinic()))


def of_type(rt: str) -> list[dict]:
    return [r for r in clinic() if r["resourceType"] == rt]


def connections(base_url: str = "http://ehr.test/fhir", recipient: str | None = RIVERSIDE, name: str = "riverside",
                resources: dict | None = None, push: dict | None = None, retries: dict | None = None, **more) -> dict:
    raw = {"base_url": base_url, "recipient": recipient, "purpose": "TREAT",
           "resources": resources or {"Encounter": "push", "Patient": "pull"},
           "push": push or {}, "retries": retries or {"max_attempts": 1}, **more}
    return parse({"connections": {name: raw}})


def configure(conns: dict | None) -> dict | None:
    outbox.configure(conns)
    return conns


def rows(conn_or_store, **where) -> list:
    stmt = select(sync_outbox).order_by(sync_outbox.c.id)
    for k, v in where.items():
        stmt = stmt.where(sync_outbox.c[k] == v)
    if hasattr(conn_or_store, "execute"):
        return list(conn_or_store.execute(stmt))
    with conn_or_store.reading() as tx:
        return list(tx.conn.execute(stmt))
