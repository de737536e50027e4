"""The sync endpoints: $push / $pull / $sync, status, dead-letter replay; administrators only."""

from __future__ import annotations

import orjson
import pytest
import responses
from server_kit import db_url, token_for  # noqa: F401  (fixture)
from sync_push_kit import FakeEhr, configure, connections, load_clinic_base, of_type, patient_ids

from fhir_iop.disclosure import patient_of

CONSENTED = patient_ids({"M100001"})


def _app(db_url, **config):  # noqa: F811
    from server import create_app
    conns = connections(resources={"Encounter": "push"}, push={"max_attempts": 2})
    return create_app({"DATABASE_URL": db_url, "TESTING": True, "SYNC_CONNECTIONS": conns, **config})


@pytest.fixture
def app(db_url):  # noqa: F811
    app = _app(db_url, INSECURE_NO_AUTH=True)
    load_clinic_base(app.extensions["fhir_iop"].store)
    yield app
    configure(None)  # back to $FHIR_IOP_SYNC_CONFIG (unset in tests)
    app.extensions["fhir_iop"].store.dispose()


@pytest.fixture
def ehr():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield FakeEhr(rsps)


def _params(body: dict) -> dict:
    return {p["name"]: p.get("valueInteger", p.get("valueString")) for p in body["parameter"]}


def test_push_status_dead_letter_and_replay_over_http(app, ehr):
    c = app.test_client()
    encs = [e for e in of_type("Encounter") if patient_of(e) in CONSENTED][:2]
    for e in encs:  # written through the API: the outbox hook queues them in the same transaction
        assert c.put(f"/Encounter/{e['id']}", json=e).status_code == 201
    st = c.get("/sync/status").get_json()
    assert st["riverside"]["messages"]["pending"] == 2
    ehr.faults = [(422, {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "processing", "diagnostics": "Encounter.period: end before start"}]})]
    r = c.post("/sync/riverside/$push")
    assert r.status_code == 200
    assert _params(r.get_json()) == {"connection": "riverside", "dead": 1, "sent": 1}
    st = c.get("/sync/status").get_json()["riverside"]
    assert st["messages"]["sent"] == 1 and st["messages"]["dead"] == 1
    (dead,) = st["dead_letters"]
    assert "end before start" in dead["error"] and dead["resource"].startswith("Encounter/")
    assert st["runs"]["push"]["counts"] == {"sent": 1, "dead": 1} and "end before start" in st["runs"]["push"]["last_error"]
    r = c.post("/sync/dead-letters/$replay", json={"resourceType": "Parameters", "parameter": [
        {"name": "connection", "valueString": "riverside"}, {"name": "id", "valueInteger": dead["id"]}]})
    assert _params(r.get_json()) == {"replayed": 1}
    r = c.post("/$sync")
    (result,) = r.get_json()["parameter"]
    push_part = next(p for p in result["part"] if p["name"] == "push")["part"]
    assert push_part == [{"name": "sent", "valueInteger": 1}]
    assert len(ehr.records) == 2


def test_errors_are_operation_outcomes(app):
    c = app.test_client()
    r = c.post("/sync/nowhere/$push")
    assert r.status_code == 404 and r.get_json()["resourceType"] == "OperationOutcome"
    assert "nowhere" in r.get_json()["issue"][0]["diagnostics"]
    r = c.post("/sync/dead-letters/$replay", json={"resourceType": "Parameters",
                                                    "parameter": [{"name": "everything", "valueBoolean": True}]})
    assert r.status_code == 400 and r.get_json()["resourceType"] == "OperationOutcome"
    r = c.post("/sync/riverside/$push?_count=lots")
    assert r.status_code == 400


def test_only_administrators_may_sync(db_url):  # noqa: F811
    app = _app(db_url)
    try:
        c = app.test_client()
        assert c.get("/sync/status").status_code == 401
        reader = token_for(app, scopes="system/*.read")
        r = c.get("/sync/status", headers={"Authorization": reader})
        assert r.status_code == 403 and r.get_json()["resourceType"] == "OperationOutcome"
        assert c.post("/sync/riverside/$push", headers={"Authorization": reader}).status_code == 403
        admin = token_for(app, scopes="system/*.read", admin=True)
        r = c.get("/sync/status", headers={"Authorization": admin})
        assert r.status_code == 200 and r.get_json()["riverside"]["configured"] is True
        assert "/sync" not in orjson.dumps(c.get("/metadata").get_json()).decode()
    finally:
        configure(None)  # back to $FHIR_IOP_SYNC_CONFIG (unset in tests)
        app.extensions["fhir_iop"].store.dispose()
