"""`fhir-iop sync push|status|replay|pull` on the command line (in-process, EHR behind `responses`)."""

from __future__ import annotations

import json

import pytest
import responses
from click.testing import CliRunner
from sync_push_kit import FakeEhr, configure, load, load_clinic_base, of_type, patient_ids

from fhir_iop.cli import main
from fhir_iop.disclosure import patient_of
from fhir_iop.store import Store


def run(*args, env=None):
    result = CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def setup(tmp_path):
    cfg = tmp_path / "ehr.json"
    cfg.write_text(json.dumps({"connections": {"riverside": {
        "base_url": "http://ehr.test/fhir", "recipient": "RIVERSIDE-PC", "purpose": "TREAT",
        "resources": {"Encounter": "push", "Patient": "pull"}, "retries": {"max_attempts": 1},
        "push": {"max_attempts": 1}}}}))
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    store = Store(url)
    run("sync", "status", "--config", cfg, "--database", url)  # configures the outbox for this process
    load_clinic_base(store)
    yes, no = patient_ids({"M100001"}), patient_ids({"M100006"})
    consented = [e for e in of_type("Encounter") if patient_of(e) in yes][:2]
    unconsented = [e for e in of_type("Encounter") if patient_of(e) in no][:1]
    load(store, consented + unconsented)
    yield cfg, url
    configure(None)  # back to $FHIR_IOP_SYNC_CONFIG (unset in tests)
    store.dispose()


def test_push_then_status_then_replay(setup):
    cfg, url = setup
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        ehr = FakeEhr(rsps)
        ehr.faults = [(400, {"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "invalid", "diagnostics": "Encounter.subject: patient not found"}]})]
        code, _, err = run("sync", "push", "--config", cfg, "--database", url, "--once")
        assert code == 1, err  # a dead letter
        assert "sync push riverside: 1 dead, 1 sent, 1 withheld" in err
        code, out, err = run("sync", "status", "--config", cfg, "--database", url)
        assert code == 0
        assert "riverside: pending 0, in flight 0, sent 1, dead 1, withheld 1" in out
        assert "patient not found" in out and "last push:" in out
        code, out, _ = run("sync", "status", "--database", url, "--json")
        st = json.loads(out)["riverside"]
        assert st["configured"] is False and st["messages"]["dead"] == 1  # known from the store alone
        dead_id = st["dead_letters"][0]["id"]
        code, _, err = run("sync", "replay", "--database", url, "--id", dead_id)
        assert code == 0 and "1 message(s) back to pending" in err
        code, _, err = run("sync", "push", "--config", cfg, "--database", url)
        assert code == 0 and "1 sent" in err
        assert len(ehr.records) == 2


def test_configuration_errors_exit_2_with_a_message(setup, tmp_path, monkeypatch):
    cfg, url = setup
    monkeypatch.delenv("FHIR_IOP_SYNC_CONFIG", raising=False)
    code, _, err = run("sync", "push", "--database", url)
    assert code == 2 and "--config" in err
    code, _, err = run("sync", "push", "--config", cfg, "--database", url, "--connection", "nowhere")
    assert code == 2 and "'nowhere'" in err and "riverside" in err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"connections": {"x": {"base_url": "ftp://nope"}}}))
    code, _, err = run("sync", "pull", "--config", bad, "--database", url)
    assert code == 2 and "base_url" in err
    code, _, err = run("sync", "replay", "--database", url, "--id", 999999)
    assert code == 2 and "0 message(s)" in err


def test_pull_is_wired_and_what_it_pulls_is_not_pushed_back(tmp_path):
    cfg = tmp_path / "ehr.json"
    cfg.write_text(json.dumps({"connections": {"riverside": {
        "base_url": "http://ehr.test/fhir", "recipient": "RIVERSIDE-PC", "resources": {"Patient": "both"},
        "retries": {"max_attempts": 1}, "strict": False}}}))
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    patient = {k: v for k, v in of_type("Patient")[0].items() if k not in ("id", "meta")}
    patient.update(id="ehr-7", meta={"versionId": "3", "lastUpdated": "2026-11-20T10:00:00Z"})
    try:
        with responses.RequestsMock() as rsps:
            rsps.add("GET", "http://ehr.test/fhir/Patient", json={
                "resourceType": "Bundle", "type": "searchset", "entry": [
                    {"resource": patient, "search": {"mode": "match"}}]})
            code, _, err = run("sync", "pull", "--config", cfg, "--database", url)
        assert code == 0, err
        assert "sync pull riverside: 1 created" in err
        code, out, _ = run("sync", "status", "--config", cfg, "--database", url, "--json")
        st = json.loads(out)["riverside"]
        assert st["cursors"]["Patient"]["cursor"] == "2026-11-20T10:00:00Z"
        assert st["messages"]["pending"] == 0  # pulled (origin sync:riverside): not echoed back
        assert st["runs"]["pull"]["ended"] is not None
    finally:
        configure(None)  # back to $FHIR_IOP_SYNC_CONFIG (unset in tests)


def test_enqueue_backfills_what_was_stored_before_the_connection(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    store = Store(url)
    try:
        configure({})  # no connection yet: nothing queued
        encs = of_type("Encounter")[:5]
        load(store, encs)
        cfg = tmp_path / "ehr.json"
        cfg.write_text(json.dumps({"connections": {"riverside": {
            "base_url": "http://ehr.test/fhir", "recipient": "RIVERSIDE-PC", "resources": {"Encounter": "push"}}}}))
        code, _, err = run("sync", "enqueue", "--config", cfg, "--database", url, "--connection", "riverside")
        assert code == 0 and "5 message(s) queued" in err
        code, _, err = run("sync", "enqueue", "--config", cfg, "--database", url, "--connection", "riverside")
        assert "5 message(s) queued" in err  # coalesced into the same five
        code, out, _ = run("sync", "status", "--database", url, "--json")
        assert json.loads(out)["riverside"]["messages"]["pending"] == 5
    finally:
        configure(None)  # back to $FHIR_IOP_SYNC_CONFIG (unset in tests)
        store.dispose()
