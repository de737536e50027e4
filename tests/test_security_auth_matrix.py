"""The scopes × endpoints matrix: every interaction of the facade under every kind of token.

For each interaction (read, vread, search, _include/_revinclude, type/instance/system history,
create, conditional create, update, update-as-create, conditional update, delete, batch and
transaction entries, $validate, $load-iop, AuditEvent) and each token (none, malformed, expired,
no scopes, v1 read, v1 write, v2 rs, v2 cud, another type, wildcard, wildcard admin) the status is
exactly the expected one: success only where the scopes allow it, 401 without a valid token, 403
with a scope that does not allow it; every 401/403 body is an OperationOutcome carrying no
resource; a refused request writes nothing (the store's version count does not move). The summary
line ("N cases: … 0 unauthorized reads or writes") is printed. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import jwt
import orjson
import pytest
from server_kit import db_url, secured_app, token_for  # noqa: F401  (fixtures)
from sqlalchemy import func, select

from fhir_iop.store.models import resource_version

CLINIC = Path(__file__).resolve().parents[1] / "examples" / "clinic"
SYS = "urn:oid:2.16.840.1.113883.4.642.99"

#: token profiles: (allowed scopes, admin)
PROFILES = {
    "no scopes": ("", False),
    "v1 read": ("system/Encounter.read", False),
    "v1 write": ("system/Encounter.write", False),
    "v2 rs": ("system/Encounter.rs", False),
    "v2 cud": ("system/Encounter.cud", False),
    "other type": ("system/Patient.cruds", False),
    "wildcard": ("system/*.*", False),
    "wildcard admin": ("system/*.*", True),
}
READ = {"v1 read", "v2 rs", "wildcard", "wildcard admin"}
WRITE = {"v1 write", "v2 cud", "wildcard", "wildcard admin"}
ALL_TYPES = {"wildcard", "wildcard admin"}
VALIDATE = READ | WRITE


def encounter(pid: str, **extra) -> dict:
    return {"resourceType": "Encounter", "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": f"Patient/{pid}"}, **extra}


def fhir_json(data) -> dict:
    return {"data": orjson.dumps(data), "content_type": "application/fhir+json"}


class World:
    """What the requests act on, written straight into the store (no token needed)."""

    def __init__(self, app):
        self.store = app.extensions["fhir_iop"].store
        with self.store.transaction() as tx:
            self.pid = tx.create({"resourceType": "Patient", "gender": "female"}).stored.id
            self.eid = tx.create(encounter(self.pid)).stored.id
            tx.update("Encounter", self.eid, {**encounter(self.pid, status="in-progress"), "id": self.eid})

    def prepare(self) -> None:
        """A fresh Encounter for the next case to delete (written before the version count is taken)."""
        with self.store.transaction() as tx:
            self.fresh = tx.create(encounter(self.pid)).stored.id

    def versions(self) -> int:
        with self.store.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(resource_version)).scalar_one()


def bundle(kind: str, *entries) -> dict:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def entry_status(resp):
    """A batch answers 200; the entry's own status and outcome tell."""
    if resp.status_code != 200:
        return resp.status_code, resp.json
    e = resp.json["entry"][0]["response"]
    return int(e["status"].split()[0]), e.get("outcome")


# (name, allowed profiles, writes?, request) — request(c, headers, world) → response or (status, body)
INTERACTIONS = [
    ("read", READ, False, lambda c, h, w: c.get(f"/Encounter/{w.eid}", headers=h)),
    ("vread", READ, False, lambda c, h, w: c.get(f"/Encounter/{w.eid}/_history/1", headers=h)),
    ("read other type", {"other type"} | ALL_TYPES, False, lambda c, h, w: c.get(f"/Patient/{w.pid}", headers=h)),
    ("search", READ, False, lambda c, h, w: c.get(f"/Encounter?subject=Patient/{w.pid}", headers=h)),
    ("search POST", READ, False, lambda c, h, w: c.post("/Encounter/_search", data={"status": "finished"},
                                                        headers=h)),
    ("search _include", ALL_TYPES, False,
     lambda c, h, w: c.get("/Encounter?_include=Encounter:subject", headers=h)),
    ("search _revinclude", ALL_TYPES, False,
     lambda c, h, w: c.get("/Patient?_revinclude=Encounter:subject", headers=h)),
    ("history type", READ, False, lambda c, h, w: c.get("/Encounter/_history", headers=h)),
    ("history instance", READ, False, lambda c, h, w: c.get(f"/Encounter/{w.eid}/_history", headers=h)),
    ("history system", ALL_TYPES, False, lambda c, h, w: c.get("/_history", headers=h)),
    ("create", WRITE, True, lambda c, h, w: c.post("/Encounter", headers=h, **fhir_json(encounter(w.pid)))),
    ("conditional create", ALL_TYPES, True, lambda c, h, w: c.post(
        "/Encounter", headers={**h, "If-None-Exist": f"identifier={SYS}|{uuid.uuid4().hex}"},
        **fhir_json(encounter(w.pid)))),
    ("update", WRITE, True, lambda c, h, w: c.put(
        f"/Encounter/{w.eid}", headers=h,
        **fhir_json({**encounter(w.pid, status="cancelled", id=w.eid), "language": f"x-{uuid.uuid4().hex[:6]}"}))),
    ("update as create", WRITE, True, lambda c, h, w: c.put(
        f"/Encounter/{(i := uuid.uuid4().hex)}", headers=h, **fhir_json(encounter(w.pid, id=i)))),
    ("conditional update", ALL_TYPES, True, lambda c, h, w: c.put(
        f"/Encounter?identifier={SYS}|{(v := uuid.uuid4().hex)}", headers=h,
        **fhir_json(encounter(w.pid, identifier=[{"system": SYS, "value": v}])))),
    ("delete", WRITE, True, lambda c, h, w: c.delete(f"/Encounter/{w.fresh}", headers=h)),
    ("transaction create", WRITE, True, lambda c, h, w: c.post("/", headers=h, **fhir_json(bundle(
        "transaction", {"request": {"method": "POST", "url": "Encounter"}, "resource": encounter(w.pid)})))),
    ("transaction create + read other type", ALL_TYPES, True, lambda c, h, w: c.post("/", headers=h, **fhir_json(
        bundle("transaction", {"request": {"method": "POST", "url": "Encounter"}, "resource": encounter(w.pid)},
               {"request": {"method": "GET", "url": f"Patient/{w.pid}"}})))),
    ("transaction delete", WRITE, True, lambda c, h, w: c.post("/", headers=h, **fhir_json(bundle(
        "transaction", {"request": {"method": "DELETE", "url": f"Encounter/{w.fresh}"}})))),
    ("batch read entry", READ, False, lambda c, h, w: entry_status(c.post("/", headers=h, **fhir_json(bundle(
        "batch", {"request": {"method": "GET", "url": f"Encounter/{w.eid}"}}))))),
    ("batch search entry with _include", ALL_TYPES, False, lambda c, h, w: entry_status(c.post(
        "/", headers=h, **fhir_json(bundle("batch", {"request": {
            "method": "GET", "url": "Encounter?_include=Encounter:subject"}}))))),
    ("batch create entry", WRITE, True, lambda c, h, w: entry_status(c.post("/", headers=h, **fhir_json(bundle(
        "batch", {"request": {"method": "POST", "url": "Encounter"}, "resource": encounter(w.pid)}))))),
    ("batch update entry", WRITE, True, lambda c, h, w: entry_status(c.post("/", headers=h, **fhir_json(bundle(
        "batch", {"request": {"method": "PUT", "url": f"Encounter/{w.eid}"},
                  "resource": {**encounter(w.pid, id=w.eid), "language": f"x-{uuid.uuid4().hex[:6]}"}}))))),
    ("$validate", VALIDATE, False, lambda c, h, w: c.post("/Encounter/$validate", headers=h,
                                                          **fhir_json(encounter(w.pid)))),
    ("$load-iop", ALL_TYPES, True, lambda c, h, w: c.post(
        "/$load-iop", headers=h, content_type="multipart/form-data",
        data={"counselors": [(open(CLINIC / "counselors.csv", "rb"), "counselors.csv")]})),
    ("AuditEvent search (admins)", {"wildcard admin"}, False, lambda c, h, w: c.get("/AuditEvent", headers=h)),
]


def _status_body(resp):
    if isinstance(resp, tuple):
        return resp
    return resp.status_code, resp.json


def _is_refusal(status: int, body) -> bool:
    return status in (401, 403)


def test_scopes_by_endpoints_matrix(secured_app):
    world = World(secured_app)
    c = secured_app.test_client()
    wildcard_client = jwt.decode(token_for(secured_app, "system/*.*").split()[1],
                                 options={"verify_signature": False})["client_id"]
    expired = "Bearer " + secured_app.extensions["fhir_iop_auth"].issue(wildcard_client, "system/*.*", lifetime=-300)
    tokens = {"no token": None, "malformed token": "Bearer abc.def.ghi", "expired token": expired}
    tokens.update({name: token_for(secured_app, scopes, admin=admin) for name, (scopes, admin) in PROFILES.items()})
    counts = {"allowed": 0, 401: 0, 403: 0}
    unauthorized, wrongly_refused, problems = [], [], []
    for name, allowed, writes, call in INTERACTIONS:
        for profile, header in tokens.items():
            world.prepare()
            before = world.versions()
            status, body = _status_body(call(c, {"Authorization": header} if header else {}, world))
            after = world.versions()
            expected_ok = profile in allowed
            case = f"{name} × {profile}: {status}"
            if expected_ok:
                if status >= 400:
                    wrongly_refused.append(f"{case} {body}")
                    continue
                counts["allowed"] += 1
                if writes and after == before and name != "$load-iop":
                    problems.append(f"{case}: allowed write wrote nothing")
                continue
            expected = 401 if header is None or profile in ("malformed token", "expired token") else 403
            if not _is_refusal(status, body):
                unauthorized.append(f"{case} (expected {expected})")
                continue
            counts[status] += 1
            if status != expected:
                problems.append(f"{case}, expected {expected}")
            code = "login" if status == 401 else "forbidden"
            if not (isinstance(body, dict) and body.get("resourceType") == "OperationOutcome"
                    and "entry" not in body and body["issue"][0]["code"] == code):
                problems.append(f"{case}: the refusal is not a bare OperationOutcome: {body}")
            if after != before:
                unauthorized.append(f"{case}: refused but the store changed ({before} -> {after} versions)")
    total = len(INTERACTIONS) * len(tokens)
    summary = (f"scopes × endpoints matrix: {total} cases ({len(INTERACTIONS)} interactions × {len(tokens)} tokens): "
               f"{counts['allowed']} allowed, {counts[401]} refused 401, {counts[403]} refused 403; "
               f"{len(unauthorized)} unauthorized reads or writes")
    print(summary)
    assert not unauthorized, "\n".join(unauthorized)
    assert not wrongly_refused, "\n".join(wrongly_refused)
    assert not problems, "\n".join(problems)
    assert counts["allowed"] + counts[401] + counts[403] == total


def test_unauthenticated_requests_get_401_on_every_route(secured_app):
    """Every route of the app (except the public discovery ones) refuses a request without a token."""
    c = secured_app.test_client()
    public = {"/metadata", "/.well-known/smart-configuration", "/auth/token", "/auth/jwks"}
    seen = 0
    for rule in secured_app.url_map.iter_rules():
        if rule.rule in public or rule.endpoint == "static":
            continue
        path = rule.rule
        for arg in rule.arguments:
            path = path.replace(f"<{arg}>", "Encounter" if arg == "rtype" else "x").replace(f"<path:{arg}>", "x")
        for method in sorted(rule.methods - {"OPTIONS", "HEAD"}):
            r = c.open(path, method=method)
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.json["resourceType"] == "OperationOutcome" and r.headers["WWW-Authenticate"].startswith("Bearer")
            seen += 1
    assert seen > 20
    for path in public - {"/auth/token"}:
        assert c.get(path).status_code == 200


@pytest.mark.parametrize("scopes, ok", [("system/Encounter.read", True), ("system/Encounter.rs", True),
                                        ("system/Encounter.s", True), ("system/Encounter.r", False),
                                        ("system/Patient.read", False)])
def test_bulk_export_kick_off_needs_search_on_every_exported_type(secured_app, scopes, ok):
    c = secured_app.test_client()
    h = {"Authorization": token_for(secured_app, scopes), "Prefer": "respond-async",
         "Accept": "application/fhir+json"}
    r = c.get("/$export?_type=Encounter", headers=h)
    assert (r.status_code not in (401, 403)) is ok, r.get_data(as_text=True)
    if not ok:
        assert r.status_code == 403 and r.json["resourceType"] == "OperationOutcome"
    else:  # let the export job finish before the store goes away
        import time
        deadline = time.monotonic() + 60
        while c.get(r.headers["Content-Location"], headers=h).status_code == 202 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert c.get("/$export", headers=h).status_code == 403  # every type without _type
