"""FHIR Bulk Data export (https://hl7.org/fhir/uv/bulkdata/ — v2.0.0, the "Bulk Data Access IG").

Kick-off — ``GET|POST [base]/Group/[id]/$export``, ``[base]/Patient/$export``, ``[base]/$export``:

* ``Prefer: respond-async`` is required (else 400);
* ``_outputFormat``: ``application/fhir+ndjson`` (also ``application/ndjson``, ``ndjson``; the default);
* ``_since``: a FHIR instant; ``_type``: comma-separated and/or repeated resource types (a Group export
  takes Patient, Coverage, EpisodeOfCare, Condition, Encounter, Claim — the default — and Group);
* POST takes the same as a ``Parameters`` body (``valueString`` / ``valueInstant``);
* ``patient`` (Patient and Group exports; repeated, comma-separated, or ``valueReference`` in a POSTed
  Parameters): only those clients' compartments; a reference the client may not see, or to no member
  of the Group, is refused (400) with the same message as one to no Patient;
* ``_typeFilter``, ``_elements``, ``includeAssociatedData`` are not supported: 400.
* → ``202 Accepted``, ``Content-Location: [base]/bulk-export/[job]`` (the status URL).

A Group export of a payer's Group (``fhir_iop.bulk.groups``) rebuilds the payer Groups from the
stored Coverages first. A client acting for a payer (``Access.recipient``) may export only that
payer's Group (else 403).

Status — ``GET [base]/bulk-export/[job]``: ``202`` with ``X-Progress`` and ``Retry-After`` while
queued or running; ``200`` with the manifest (``transactionTime``, ``request``,
``requiresAccessToken: true``, ``output: [{type, url, count}]``, ``error``, and with ``_since`` the
``deleted`` files: transaction Bundles deleting what was deleted since) and ``Expires`` once complete;
``500`` with an OperationOutcome when the export failed (e.g. interrupted by a restart).
``DELETE`` on it cancels the job or deletes a finished one and its files: ``202``. Files —
``GET [base]/bulk-export/[job]/[Type].ndjson``: ``application/fhir+ndjson``.

Only the client that kicked a job off (``Access.client_id``) sees its status, manifest and files;
to any other client the job does not exist (404).

The work runs in a daemon thread of the serving process (one per job). A restart loses the
thread: the job's heartbeat goes stale and the next status request reports it failed
("interrupted … kick it off again"); jobs are not resumed. Files live under ``EXPORT_DIR``
(``var/exports/[job]/``) and are deleted on cancel and once a job expires.

Configuration (``FHIR_IOP_`` environment variables or ``create_app`` config): ``EXPORT_DIR``
(default ``var/exports``), ``EXPORT_TTL`` seconds a finished job and its files are kept (3600),
``EXPORT_STALE_SECONDS`` heartbeat age after which a running job counts as interrupted (60),
``EXPORT_RETRY_AFTER`` seconds suggested between polls (2).
"""

from __future__ import annotations

import threading
from pathlib import Path

from flask import Blueprint, current_app, request, send_file

from fhir_iop.bulk import groups, jobs, runner
from fhir_iop.store import NotFound
from fhir_iop.store.errors import StoreError
from fhir_iop.store.params import date_range
from fhir_iop.store.repository import check_id, instant
from server.access import current_access
from server.app import base_url, state
from server.errors import FhirHttpError, outcome
from server.formats import http_date, prefer, read_body, respond

bp = Blueprint("export", __name__)

NDJSON = "application/fhir+ndjson"
OUTPUT_FORMATS = {NDJSON, "application/ndjson", "ndjson"}
UNSUPPORTED = ("_typeFilter", "_elements", "includeAssociatedData", "organizeOutputBy")
#: at most this many ``patient`` references in one kick-off
MAX_PATIENTS = 1000


def _config(name: str, default):
    value = current_app.config.get(name, default)
    return type(default)(value) if not isinstance(default, str) else value


def export_dir() -> Path:
    return Path(_config("EXPORT_DIR", "var/exports"))


def _reap() -> None:
    jobs.reap(state().store, export_dir(), _config("EXPORT_STALE_SECONDS", 60))


# -- kick-off -----------------------------------------------------------------------------------------

def _params() -> dict[str, list[str]]:
    """The kick-off parameters from the query string, or a POSTed Parameters resource."""
    out: dict[str, list[str]] = {}
    for k, v in request.args.items(multi=True):
        out.setdefault(k, []).append(v)
    if request.method == "POST" and request.content_length:
        body = read_body()
        if body.get("resourceType") != "Parameters":
            raise FhirHttpError(400, "POST $export takes a Parameters resource")
        for p in body.get("parameter") or ():
            value = next((v for k, v in p.items() if k.startswith("value")), None)
            if isinstance(value, dict) and p.get("valueReference") is value:  # patient: a Reference
                value = value.get("reference")
            if p.get("name") and isinstance(value, str):
                out.setdefault(p["name"], []).append(value)
    return out


def _kick_off(kind: str, group: str | None, allowed: tuple[str, ...], default: tuple[str, ...]):
    if "respond-async" not in prefer():
        raise FhirHttpError(400, "$export is asynchronous: send the header 'Prefer: respond-async'")
    params = _params()
    for name in UNSUPPORTED:
        if name in params:
            raise FhirHttpError(400, f"$export parameter {name} is not supported here")
    fmt = (params.get("_outputFormat") or [NDJSON])[-1].strip().replace(" ", "+")
    if fmt not in OUTPUT_FORMATS:
        raise FhirHttpError(400, f"_outputFormat {fmt!r} is not supported: use {NDJSON}")
    since = None
    if params.get("_since"):
        rng = date_range(params["_since"][-1])
        if rng is None or "T" not in params["_since"][-1]:
            raise FhirHttpError(400, f"_since {params['_since'][-1]!r} is not a FHIR instant")
        since = rng[0].isoformat()
    types = [t.strip() for v in params.get("_type") or () for t in v.split(",") if t.strip()]
    unknown = [t for t in types if t not in allowed]
    if unknown:
        raise FhirHttpError(400, f"_type {', '.join(unknown)} is not exported here (this export takes: "
                                 f"{', '.join(allowed)})")
    types = list(dict.fromkeys(types)) or list(default)
    patients = [p.strip() for v in params.get("patient") or () for p in v.split(",") if p.strip()]
    if patients and kind == "system":
        raise FhirHttpError(400, "the patient parameter applies to Patient and Group exports, not to $export")

    access = current_access()
    s = state()
    from server.routes.operations import mapping_context
    ctx = mapping_context()
    if kind == "group":
        check_id(group)
        groups.refresh(s.store, ctx)
        with s.store.reading() as tx:
            g = tx.read("Group", group).resource
        payer = groups.payer_of_group(g, ctx)
        if access.recipient is not None and payer is not None and payer != access.recipient:
            raise FhirHttpError(403, "a client acting for a payer may export only that payer's Group")
    patient_ids = _patients(patients, g if kind == "group" else None) if patients else None
    _reap()
    who = {k: getattr(access, k) for k in ("client_id", "recipient", "purpose", "emergency", "admin")}
    job = jobs.create(s.store, access.client_id, who, request.url,
                      {"kind": kind, "group": group, "types": types, "since": since, "format": NDJSON,
                       "patients": patient_ids})
    from fhir_iop.payer.rollup import load_rules
    rules = load_rules(current_app.config.get("MAPPINGS"))
    threading.Thread(target=_work, args=(s.store, job.id, access, export_dir(), _config("EXPORT_TTL", 3600), ctx,
                                         rules), daemon=True, name=f"bulk-export-{job.id[:8]}").start()
    oo = outcome(f"export {job.id} accepted; poll the Content-Location URL", "informational", "information")
    return respond(oo, 202, {"Content-Location": f"{base_url()}/bulk-export/{job.id}"}, fmt="json")


def _patients(refs: list[str], group: dict | None) -> list[str]:
    """The Patient ids of the ``patient`` parameter (Bulk Data v2: the export holds only their
    compartments). 400 for one that is no Patient reference, or that this client may not see or is not
    a member of the Group, with one message for all three: the answer must not tell an outside
    recipient whether a client it may not see is in the program (42 CFR Part 2)."""
    from fhir_iop.bulk.part2 import patient_of
    from server.routes.resources import store
    if len(refs) > MAX_PATIENTS:
        raise FhirHttpError(400, f"at most {MAX_PATIENTS} patient references in one export")
    members = None
    if group is not None:  # (read as the export reads them: fhir_iop.bulk.runner)
        members = {patient_of({"subject": m.get("entity")}) for m in group.get("member") or ()}
    ids = []
    with store().reading() as tx:  # (the request's Part 2 gate: a withheld Patient is not found)
        for ref in refs:
            pid = patient_of({"subject": {"reference": ref}})
            try:
                if pid is None or (members is not None and pid not in members):
                    raise NotFound(ref)
                check_id(pid)
                tx.read("Patient", pid)
            except StoreError:  # (no such id, deleted, withheld, not a member, not an id)
                raise FhirHttpError(400, f"patient {ref[:100]!r} is not a patient this export can include") from None
            ids.append(pid)
    return list(dict.fromkeys(ids))


def _work(*args) -> None:
    runner.run_job(*args)  # looked up at run time (tests slow it down)


@bp.route("/Group/<gid>/$export", methods=["GET", "POST"])
def group_export(gid: str):
    return _kick_off("group", gid, runner.GROUP_ALLOWED, runner.GROUP_TYPES)


@bp.route("/Patient/$export", methods=["GET", "POST"])
def patient_export():
    return _kick_off("patient", None, runner.PATIENT_TYPES, runner.PATIENT_TYPES)


@bp.route("/$export", methods=["GET", "POST"])
def system_export():
    return _kick_off("system", None, runner.SYSTEM_TYPES, runner.SYSTEM_TYPES)


# -- status, manifest, cancel, files ------------------------------------------------------------------

def _own_job(job_id: str) -> jobs.Job:
    _reap()
    job = jobs.get(state().store, job_id) if len(job_id) <= 64 else None
    if job is None or job.client != current_access().client_id:
        raise NotFound(f"no export {job_id} (finished exports expire; another client's are not visible)")
    return job


@bp.get("/bulk-export/<job_id>")
def status(job_id: str):
    job = _own_job(job_id)
    if job.state in jobs.ACTIVE:
        return respond(None, 202, {"X-Progress": job.progress or job.state,
                                   "Retry-After": str(_config("EXPORT_RETRY_AFTER", 2))})
    if job.state == "failed":
        return respond(outcome("; ".join(str(e) for e in job.error) or "the export failed", "exception"), 500,
                       fmt="json")
    base = f"{base_url()}/bulk-export/{job.id}"
    manifest = {"transactionTime": instant(job.transaction_time), "request": job.request,
                "requiresAccessToken": True,
                "output": [{"type": f["type"], "url": f"{base}/{f['name']}", "count": f["count"]}
                           for f in job.files if not f.get("error") and not f.get("deleted")],
                "error": [{"type": f["type"], "url": f"{base}/{f['name']}", "count": f["count"]}
                          for f in job.files if f.get("error")]}
    if job.params.get("since"):  # (the deletions since then: transaction Bundles, fhir_iop/bulk/runner.py)
        manifest["deleted"] = [{"type": f["type"], "url": f"{base}/{f['name']}", "count": f["count"]}
                               for f in job.files if f.get("deleted")]
    headers = {"Expires": http_date(job.expires)} if job.expires else {}
    import orjson
    from flask import Response
    return Response(orjson.dumps(manifest), 200, headers, content_type="application/json")


@bp.delete("/bulk-export/<job_id>")
def cancel(job_id: str):
    job = _own_job(job_id)
    jobs.cancel(state().store, job.id, export_dir())
    return respond(outcome(f"export {job.id} cancelled and its files deleted", "informational", "information"),
                   202, fmt="json")


@bp.get("/bulk-export/<job_id>/<name>")
def download(job_id: str, name: str):
    job = _own_job(job_id)
    f = next((f for f in job.files if f["name"] == name), None) if job.state == "completed" else None
    path = export_dir() / job.id / name if f else None
    if path is None or not path.is_file():
        raise NotFound(f"export {job_id} has no file {name!r}")
    return send_file(path.resolve(), mimetype=NDJSON, conditional=False, etag=False, max_age=0)




def _register_auth_rules() -> None:
    """Status, cancel and files are checked here (the job's own client only), not by scope: any
    authenticated client may ask, and sees only its own jobs. The kick-off is checked by
    ``server/auth.py`` (search on each ``_type``)."""
    from server.auth import rule
    for endpoint in ("export.status", "export.cancel", "export.download"):
        rule(endpoint)(lambda view_args: [])


_register_auth_rules()
