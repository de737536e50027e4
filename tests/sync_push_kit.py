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
    return [copy.deepcopy(r) for r in _clinic() if r["resourceType"] == rt]


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


def mrn_of(patient: dict) -> str:
    return patient["identifier"][0]["value"] if isinstance(patient.get("identifier"), list) else None


def patient_ids(mrns) -> set[str]:
    return {p["id"] for p in _clinic() if p["resourceType"] == "Patient" and any(i.get("value") in mrns for i in p.get("identifier", []))}


def about(res: dict, pids: set[str]) -> bool:
    from fhir_iop.disclosure import patient_of
    return patient_of(res) in pids


def load(store, resources, origin: str | None = None) -> None:
    with store.transaction(origin=origin) as tx:
        tx.put_many(resources, validate=False)


def load_clinic_base(store) -> None:
    """Patients, programs, counselors and the Part 2 consents (nothing that the tests push)."""
    load(store, [r for r in clinic() if r["resourceType"] in ("Patient", "Organization", "Practitioner", "Consent")])


class FakeEhr:
    """A FHIR server behind ``responses``: conditional update / delete by identifier (and update /
    delete by id, keyed ``id:<id>``), counted.

    ``faults``: what the next requests get instead of a normal answer, in order: an int status
    (with ``Retry-After`` from ``retry_after``), ``"timeout"``, or ``(status, OperationOutcome)``."""

    def __init__(self, rsps, base: str = "http://ehr.test/fhir"):
        import re
        import threading
        self.base, self.lock = base, threading.Lock()
        self.records: dict[tuple[str, str], dict] = {}  # (type, system|value) -> resource
        self.writes: dict[tuple[str, str], int] = {}  # (type, system|value) -> PUTs received
        self.requests: list[tuple[str, str, str]] = []  # (method, type, identifier)
        self.faults: list = []
        self.retry_after = "120"
        pattern = re.compile(re.escape(base) + r"/(\w+)(/[A-Za-z0-9.-]+)?(\?.*)?$")
        rsps.add_callback("PUT", pattern, callback=self._put)
        rsps.add_callback("DELETE", pattern, callback=self._delete)

    def _parse(self, request):
        from urllib.parse import parse_qs, urlsplit
        u = urlsplit(request.url)
        parts = u.path[len(urlsplit(self.base).path):].strip("/").split("/")
        if len(parts) == 2:  # [type]/[id]: the EHR's own record
            return parts[0], f"id:{parts[1]}"
        return parts[0], parse_qs(u.query).get("identifier", [""])[0]

    def _fault(self):
        import orjson
        import requests
        if not self.faults:
            return None
        f = self.faults.pop(0)
        if f == "timeout":
            raise requests.exceptions.ReadTimeout("read timed out (injected)")
        if isinstance(f, tuple):
            return f[0], {}, orjson.dumps(f[1])
        return f, {"Retry-After": self.retry_after}, b""

    def _put(self, request):
        import orjson
        rt, ident = self._parse(request)
        with self.lock:
            self.requests.append(("PUT", rt, ident))
            fault = self._fault()
            if fault:
                return fault
            key = (rt, ident)
            created = key not in self.records
            self.records[key] = orjson.loads(request.body)
            self.writes[key] = self.writes.get(key, 0) + 1
            n = len(self.records)
        return (201 if created else 200), {"Location": f"{self.base}/{rt}/r{n}/_history/{self.writes[key]}",
                                           "ETag": f'W/"{self.writes[key]}"'}, b""

    def _delete(self, request):
        rt, ident = self._parse(request)
        with self.lock:
            self.requests.append(("DELETE", rt, ident))
            fault = self._fault()
            if fault:
                return fault
            gone = self.records.pop((rt, ident), None)
        return (204 if gone else 404), {}, b""
