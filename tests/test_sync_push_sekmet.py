"""Push against an EHR nobody here wrote: sekmet-fhir on loopback, behind the fault proxy.

The example clinic goes into our store (PostgreSQL); its encounters, enrollments, MAT doses, care
plans and goals are pushed to "Riverside Primary Care" through 429s with Retry-After, 500/503s,
timeouts and answers lost after the EHR did the work, by a `fhir-iop sync push` process that is
SIGKILLed mid-run, then by two workers at once. Then we count on sekmet, by identifier: every
resource the client consented to (or that is not Part 2 data) is there exactly once, nothing else
is. The oracle reads examples/clinic/consents.csv and the data-class ConceptMap itself.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import date

import pytest
from ehr_kit import Fault, FaultProxy, Sekmet  # noqa: F401
from server_kit import _pg_schema_url, postgres_reachable
from sync_push_kit import CLINIC, RIVERSIDE, ROOT, clinic, configure

from fhir_iop.cli_common import EXIT_OK, EXIT_REJECTED
from fhir_iop.disclosure import labelled, patient_of, today
from fhir_iop.store import Store
from fhir_iop.store.iop import load
from fhir_iop.sync.config import load as load_config
from fhir_iop.sync.push import counts, identifier_of

PUSHED = ("Encounter", "EpisodeOfCare", "MedicationAdministration", "CarePlan", "Goal")
FHIR_IOP = os.path.join(os.path.dirname(sys.executable), "fhir-iop")


@pytest.fixture
def pg_url():
    if not postgres_reachable():
        pytest.skip("PostgreSQL is not reachable")
    yield from _pg_schema_url()


def consented() -> dict[str, set[str]]:
    """Patient id -> resource types Riverside may receive for TREAT today (from the record files)."""
    cm = json.loads((ROOT / "mappings" / "ConceptMap-consent-data-class-to-resource-type.json").read_text())
    types = {e["code"]: {t["code"] for t in e.get("target", [])} for g in cm["group"] for e in g["element"]}
    on = today()
    by_mrn: dict[str, set[str]] = {}
    with open(CLINIC / "consents.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["recipient_id"] != RIVERSIDE or "TREAT" not in row["purposes"].split("|"):
                continue
            if not date.fromisoformat(row["start"]) <= on <= date.fromisoformat(row["end"] or "9999-12-31"):
                continue
            if row["revoked_on"] and on >= date.fromisoformat(row["revoked_on"]):
                continue
            for dc in row["data_classes"].split("|"):
                by_mrn.setdefault(row["client_mrn"], set()).update(types[dc])
    ids = {p["identifier"][0]["value"]: p["id"] for p in clinic() if p["resourceType"] == "Patient"}
    return {ids[mrn]: t for mrn, t in by_mrn.items()}


def _key(ident: dict) -> str:
    return f"{ident['system']}|{ident['value']}"


def _status(store) -> dict:
    return counts(store, "riverside").get("riverside", {})


def _push_process(cfg, url, *more) -> subprocess.Popen:
    env = {**os.environ, "FHIR_IOP_SYNC_CONFIG": str(cfg), "FHIR_IOP_DATABASE_URL": url}
    return subprocess.Popen([FHIR_IOP, "sync", "push", *more], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def test_push_through_faults_and_a_killed_worker_sends_each_consented_resource_once(tmp_path, pg_url):
    allowed = consented()
    assert allowed, "the example clinic has Riverside consents in force"
    expected, withheld = {}, {}
    for r in clinic():
        if r["resourceType"] not in PUSHED:
            continue
        ok = not labelled(r) or r["resourceType"] in allowed.get(patient_of(r), ())
        (expected if ok else withheld).setdefault(r["resourceType"], set()).add(_key(identifier_of(r)))
    assert withheld["Encounter"] and expected["Encounter"]

    with Sekmet(tmp_path / "sekmet") as ehr, FaultProxy(ehr.base_url) as proxy:
        cfg = tmp_path / "ehr.json"
        cfg.write_text(json.dumps({"connections": {"riverside": {
            "base_url": proxy.base_url, "recipient": RIVERSIDE, "purpose": "TREAT",
            "resources": {**dict.fromkeys(PUSHED, "push"), "Patient": "pull"},
            "timeouts": {"connect": 2, "read": 1},
            "retries": {"max_attempts": 2, "backoff": 0.05, "backoff_max": 0.2, "max_retry_after": 0.5},
            "push": {"batch": 20, "lease": 3, "backoff": 0.1, "backoff_max": 0.5, "max_attempts": 20}}}}))
        configure(load_config(cfg))
        store = Store(pg_url)
        try:
            load(store, [CLINIC])  # the outbox hook queues the pushed types as they are stored
            queued = _status(store)["pending"]
            assert queued == sum(len(v) for v in expected.values()) + sum(len(v) for v in withheld.values())

            proxy.plan(Fault("status", status=429, retry_after=1), Fault("status", status=500),
                       Fault("hang", seconds=3), Fault("hang", seconds=3), Fault("lose"), Fault("status", status=503),
                       Fault("lose"), match=lambda m, p: m == "PUT" and p.startswith("/fhir/Encounter"))
            worker = _push_process(cfg, pg_url, "--loop", "--poll", "0.2")
            deadline = time.monotonic() + 120
            while sum(1 for m, p, *_ in proxy.log if m == "PUT") < 60 and worker.poll() is None:
                assert time.monotonic() < deadline, "the worker did not get going"
                time.sleep(0.05)
            worker.send_signal(signal.SIGKILL)  # mid-run: claimed messages keep their lease until it runs out
            worker.wait(30)
            mid = _status(store)
            assert mid["pending"] + mid["inflight"] > 0, "killed before the end"

            proxy.plan(Fault("status", status=429, retry_after=1), Fault("lose"), Fault("status", status=502),
                       match=lambda m, p: m == "PUT")
            workers = [_push_process(cfg, pg_url, "--loop", "--poll", "0.2") for _ in range(2)]
            deadline = time.monotonic() + 300
            while True:
                s = _status(store)
                if s["pending"] == 0 and s["inflight"] == 0:
                    break
                assert all(w.poll() is None for w in workers), [w.stderr.read()[-2000:] for w in workers]
                assert time.monotonic() < deadline, s
                time.sleep(0.5)
            for w in workers:
                w.send_signal(signal.SIGTERM)
            for w in workers:
                assert w.wait(60) in (EXIT_OK, EXIT_REJECTED)  # 1: it saw dead letters (the Goals, below)
            final = _status(store)
        finally:
            store.dispose()
            configure(None)  # back to $FHIR_IOP_SYNC_CONFIG (unset in tests)
        assert (proxy.fired("status"), proxy.fired("lose"), proxy.fired("hang")) == (5, 3, 2)  # all planned faults

        # sekmet cannot update a Goal by identifier: a permanent refusal, dead letters with its reason
        n_goals = len(expected.get("Goal", ()))
        assert final["dead"] == n_goals
        assert final["withheld"] == sum(len(v) for v in withheld.values())
        assert final["sent"] == sum(len(v) for k, v in expected.items() if k != "Goal")

        for rt in PUSHED:
            there = Counter()
            for res in ehr.search_all(rt):
                for ident in res.get("identifier") or []:
                    if isinstance(ident, dict) and "system" in ident and "value" in ident:
                        there[_key(ident)] += 1
            want = set() if rt == "Goal" else expected.get(rt, set())
            ours = {k: n for k, n in there.items() if k in want | withheld.get(rt, set())}
            assert {k: n for k, n in ours.items() if n != 1} == {}, f"{rt}: duplicated on the EHR"
            assert set(ours) == want, f"{rt}: lost {len(want - set(ours))}, leaked {len(set(ours) - want)}"
            assert not (set(there) & withheld.get(rt, set())), f"{rt}: withheld data reached the EHR"
