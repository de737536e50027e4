"""Fixtures for the Part 2 tests: the example clinic loaded once per database (SQLite and PostgreSQL),
an app serving it in which a request acts as the Access named by its ``X-Test-Access`` header
(set after the authorization layer, which runs with its development flag here), and Consents
written through the mapping (``fhir_iop.mapping.consent.to_fhir``) as the clinic's own are.
"""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import orjson
import pytest
from server_kit import _pg_schema_url, postgres_reachable

from fhir_iop.disclosure import today
from fhir_iop.mapping.common import MappingContext
from fhir_iop.mapping.consent import to_fhir
from fhir_iop.records.model import Consent
from fhir_iop.security.access import Access
from fhir_iop.store import Store
from fhir_iop.store.iop import load

CLINIC = Path(__file__).resolve().parents[1] / "examples" / "clinic"
ALL_CLASSES = ["demographics", "enrollment", "encounters", "drug-screens", "medications", "care-plans", "coverage"]

#: who a request acts for (the X-Test-Access header names one)
ACCESS = {
    "internal": Access("program-staff"),
    "ehr": Access("riverside-ehr", recipient="RIVERSIDE-PC", purpose="TREAT"),
    "payer": Access("aetna-claims", recipient="AETNA", purpose="HPAYMT"),
    "unknown": Access("stranger", recipient="NOBODY-ORG", purpose="TREAT"),
    "bayshore": Access("bayshore-ehr", recipient="BAYSHORE-FHC", purpose="TREAT"),
    "emergency": Access("er-client", recipient="NOBODY-ORG", purpose="ETREAT", emergency=True),
}
#: the recipient a consent names for each accessing party (an unknown org never has one: its rows
#: get consents for someone else, so "covering" must still disclose nothing to it)
CONSENT_FOR = {"ehr": ("RIVERSIDE-PC", "Riverside Primary Care", "ehr", ["TREAT"]),
               "payer": ("AETNA", "Aetna", "payer", ["HPAYMT"]),
               "unknown": ("RIVERSIDE-PC", "Riverside Primary Care", "ehr", ["TREAT"])}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def clinic_url(request, tmp_path_factory):
    """A database holding the example clinic, mapped by the pipeline (shared by a module's tests)."""
    pg = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('part2') / 'clinic.sqlite'}"
    else:
        if not postgres_reachable():
            pytest.skip("PostgreSQL is not reachable")
        pg = _pg_schema_url()
        url = next(pg)
    store = Store(url)
    result = load(store, [CLINIC])
    assert result.types["Patient"] == 25
    store.dispose()
    yield url
    if pg is not None:
        pg.close()


def make_app(url: str):
    """An app whose requests act as ``ACCESS[X-Test-Access header]`` (default: internal)."""
    from flask import g, request

    from server import create_app
    app = create_app({"DATABASE_URL": url, "TESTING": True, "INSECURE_NO_AUTH": True})

    @app.before_request
    def act_as():  # runs after the authorization layer (registered first)
        g.access = ACCESS[request.headers.get("X-Test-Access", "internal")]

    return app


@pytest.fixture(scope="module")
def part2_app(clinic_url):
    app = make_app(clinic_url)
    yield app
    app.extensions["fhir_iop"].store.dispose()


def store_of(app) -> Store:
    return app.extensions["fhir_iop"].store


class Api:
    """The test client acting as one party; every response body is kept for leak scans."""

    def __init__(self, app, who: str):
        self.client, self.who, self.bodies = app.test_client(), who, []

    def _keep(self, r):
        self.bodies.append(r.get_data())
        return r

    def get(self, url, **kw):
        return self._keep(self.client.get(url, headers={"X-Test-Access": self.who, **kw.pop("headers", {})}, **kw))

    def post(self, url, body, **kw):
        headers = {"X-Test-Access": self.who, "Content-Type": "application/fhir+json", **kw.pop("headers", {})}
        return self._keep(self.client.post(url, data=orjson.dumps(body), headers=headers, **kw))

    def put(self, url, body, **kw):
        headers = {"X-Test-Access": self.who, "Content-Type": "application/fhir+json", **kw.pop("headers", {})}
        return self._keep(self.client.put(url, data=orjson.dumps(body), headers=headers, **kw))


def consent_resource(consent_id: str, mrn: str, recipient: tuple, *, purposes=None, classes=None,
                     start: date | None = None, end: date | None = None, revoked_on: date | None = None) -> dict:
    rid, name, kind, default_purposes = recipient
    day = today()
    start = start or day - timedelta(days=30)
    rec = Consent(consent_id=consent_id, client_mrn=mrn, program_id="SUD-IOP", recipient_id=rid, recipient_name=name,
                  recipient_kind=kind, purposes=purposes or default_purposes, data_classes=classes or ALL_CLASSES,
                  signed_on=min(start, day - timedelta(days=60)), start=start,
                  end=end if end is not None else day + timedelta(days=30), revoked_on=revoked_on)
    [res] = to_fhir(rec, MappingContext(), [])
    return res


SCENARIOS = ("none", "covering", "wrong purpose", "wrong data class", "expired", "not yet started", "revoked")


def scenario_consent(scenario: str, consent_id: str, mrn: str, recipient: tuple) -> dict | None:
    """The Consent of one row of the matrix (None: no consent)."""
    day = today()
    if scenario == "none":
        return None
    kw = {"covering": {},
          "wrong purpose": {"purposes": ["HOPERAT"]},
          "wrong data class": {"classes": ["care-plans"]},
          "expired": {"start": day - timedelta(days=90), "end": day - timedelta(days=1)},
          "not yet started": {"start": day + timedelta(days=1), "end": day + timedelta(days=90)},
          "revoked": {"revoked_on": day}}[scenario]
    return consent_resource(consent_id, mrn, recipient, **kw)
