"""Operations: ``$validate`` on a type and on an instance, ``$load-iop`` on the server (IOP record files in,
FHIR stored).

``$validate`` (http://hl7.org/fhir/R4/resource-operation-validate.html) answers 200 with an
OperationOutcome whatever the verdict; the resource comes as the body or as the ``resource``
parameter of a Parameters body, ``profile`` and ``mode`` as query or Parameters parameters:

- ``POST [type]/$validate``: the posted resource (``mode=update`` needs it to carry an id);
- ``POST [type]/[id]/$validate``: the posted resource as an update of ``[id]`` (its id must be
  ``[id]``); with no resource, or ``mode=delete``, the stored one;
- ``GET [type]/[id]/$validate``: the stored current version (``profile=`` to check it against a
  profile; ``mode=delete``: whether it may be deleted). A missing or deleted resource is 404/410, as
  a read would be.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from flask import Blueprint, request
from werkzeug.utils import secure_filename

from fhir_iop.errors import ConfigError, operation_outcome
from fhir_iop.fhir import r4
from fhir_iop.records.io import record_type_for
from fhir_iop.store.repository import check_type, structure_issues
from server import interactions
from server.app import state
from server.errors import FhirHttpError, outcome
from server.formats import read_body, respond

bp = Blueprint("operations", __name__)


def validator():
    """The project's validator (fhir_iop.validation); None where it is not installed (structure only)."""
    try:
        from fhir_iop.validation import validate
    except ImportError:
        return None
    return validate


def validate_resource(res: dict, profile: str | None) -> dict:
    """The project's validator; where its FHIR definitions are not installed (a wheel without
    node_modules and no FHIR_IOP_DEFINITIONS), the structure check, saying what was not checked."""
    validate = validator()
    missing = None
    if validate is not None:
        try:
            return validate(res, profiles=[profile]) if profile else validate(res)
        except ConfigError as e:
            if profile:  # a profile was asked for: not checking it silently would be a false all-clear
                raise FhirHttpError(422, f"cannot validate against {profile}: {e}") from None
            missing = str(e)
    issues = structure_issues(res)
    if issues:
        return {"resourceType": "OperationOutcome", "issue": issues}
    note = f" ({missing})" if missing else ""
    return outcome(f"{res.get('resourceType')} is structurally valid R4 (fhir.resources {r4.FHIR_VERSION}); "
                   f"profiles, invariants and terminology were not checked{note}", "informational", "information")


MODES = ("create", "update", "delete", "profile")


def _validate_args(body: dict | None) -> tuple[dict | None, str | None, str | None]:
    """(resource, profile, mode) from the query and a body that is a resource or Parameters."""
    profile, mode = request.args.get("profile"), request.args.get("mode")
    if body is not None and body.get("resourceType") == "Parameters":
        params = [p for p in body.get("parameter") or [] if isinstance(p, dict)]
        res = next((p.get("resource") for p in params if p.get("name") == "resource"), None)
        profile = next((p.get("valueUri") or p.get("valueCanonical") for p in params if p.get("name") == "profile"),
                       profile)
        mode = next((p.get("valueCode") for p in params if p.get("name") == "mode"), mode)
        if res is not None and not isinstance(res, dict):
            raise FhirHttpError(400, "the 'resource' parameter of $validate must be a resource")
        body = res
    if mode is not None and mode not in MODES:
        raise FhirHttpError(400, f"$validate mode {mode!r} is not one of {', '.join(MODES)}")
    if profile is not None and not isinstance(profile, str):
        raise FhirHttpError(400, "the 'profile' parameter of $validate is a canonical URL")
    return body, profile, mode


@bp.post("/<rtype>/$validate")
def validate_type(rtype: str):
    check_type(rtype)
    body, profile, mode = _validate_args(read_body())
    if not isinstance(body, dict):
        raise FhirHttpError(400, "Parameters for $validate need a 'resource' parameter")
    if body.get("resourceType") != rtype:
        raise FhirHttpError(400, f"the resource is a {body.get('resourceType')}, the URL names {rtype}")
    if mode == "delete":
        raise FhirHttpError(400, "$validate mode=delete names an instance: use [type]/[id]/$validate")
    if mode == "update" and not body.get("id"):
        raise FhirHttpError(400, "$validate mode=update needs a resource with an id")
    return respond(validate_resource(body, profile))


def _stored(rtype: str, rid: str) -> dict:
    """The current version of ``rtype/rid`` as a read would give it (404 missing or withheld, 410 deleted)."""
    import orjson
    with interactions.GatedStore(state().store).reading() as tx:  # Part 2: withheld reads as missing
        stored = interactions.read(tx, rtype, rid).stored
    body = stored.body
    return orjson.loads(body) if isinstance(body, (str, bytes)) else body


@bp.route("/<rtype>/<rid>/$validate", methods=["GET", "POST"])
def validate_instance(rtype: str, rid: str):
    check_type(rtype)
    body, profile, mode = _validate_args(read_body() if request.method == "POST" else None)
    if mode == "create":
        raise FhirHttpError(400, "$validate mode=create is for the type ([type]/$validate), not an instance")
    if body is None or mode == "delete":
        res = _stored(rtype, rid)
        if mode == "delete":
            return respond(outcome(f"{rtype}/{rid} exists and may be deleted (this server does not refuse "
                                   "deleting a resource that others refer to)", "informational", "information"))
        return respond(validate_resource(res, profile))
    if body.get("resourceType") != rtype:
        raise FhirHttpError(400, f"the resource is a {body.get('resourceType')}, the URL names {rtype}")
    if body.get("id") != rid:
        raise FhirHttpError(400, f"the resource's id {body.get('id')!r} is not the id in the URL ({rid!r}); "
                                 "an update must carry the id it updates")
    return respond(validate_resource(body, profile))


def mapping_context():
    """A fresh mapping context per load; settings and terminology (config ``MAPPINGS``) read once."""
    from fhir_iop.mapping.common import MappingContext
    s = state()
    if s.mapping_context is None:
        from flask import current_app

        from fhir_iop.settings import load_settings
        from fhir_iop.terminology import load_terminology
        mappings = current_app.config.get("MAPPINGS")
        s.mapping_context = (load_settings(mappings), load_terminology(mappings))
    settings, terminology = s.mapping_context
    return MappingContext(settings=settings, terminology=terminology)


@bp.post("/$load-iop")
def load_iop():
    """multipart/form-data: IOP record files, each named as its record type (clients.csv…)."""
    from fhir_iop.store.iop import load
    if request.mimetype != "multipart/form-data" or not request.files:
        raise FhirHttpError(415, "$load-iop takes multipart/form-data with one file per record type "
                                 "(e.g. clients.csv, attendance.ndjson)")
    problems = []
    with tempfile.TemporaryDirectory(prefix="fhir-iop-load-") as tmp:
        for f in (f for key in request.files for f in request.files.getlist(key)):
            name = secure_filename(f.filename or "")
            if not name or not record_type_for(Path(name)):
                raise FhirHttpError(400, f"{f.filename!r} is not named after an IOP record type "
                                         "(see docs/record-format.md)")
            f.save(Path(tmp) / name)
        result = load(state().store, [Path(tmp)], mapping_context(), problems.append)
    oo = operation_outcome(problems)
    summary = ", ".join(f"{n} {t}" for t, n in sorted(result.types.items())) or "nothing"
    changes = ", ".join(f"{n} {k}" for k, n in sorted(result.outcomes.items()))
    oo["issue"].insert(0, {"severity": "information", "code": "informational",
                           "diagnostics": f"stored {summary} ({changes or 'no changes'}); {len(problems)} problem(s)"})
    if len(oo["issue"]) > 1 and oo["issue"][1].get("diagnostics") == "no problems":
        oo["issue"].pop(1)
    return respond(oo)
