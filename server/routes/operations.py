"""Operations: ``$validate`` on a type, ``$load-iop`` on the server (IOP record files in, FHIR stored)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from flask import Blueprint, request
from werkzeug.utils import secure_filename

from fhir_iop.errors import operation_outcome
from fhir_iop.fhir import r4
from fhir_iop.records.io import record_type_for
from fhir_iop.store.repository import check_type, structure_issues
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
    validate = validator()
    if validate is not None:
        return validate(res, profiles=[profile]) if profile else validate(res)
    issues = structure_issues(res)
    if issues:
        return {"resourceType": "OperationOutcome", "issue": issues}
    return outcome(f"{res.get('resourceType')} is structurally valid R4 (fhir.resources {r4.FHIR_VERSION}); "
                   "profiles and terminology were not checked", "informational", "information")


@bp.post("/<rtype>/$validate")
def validate_type(rtype: str):
    check_type(rtype)
    body = read_body()
    profile = request.args.get("profile")
    if body.get("resourceType") == "Parameters":
        params = body.get("parameter") or []
        res = next((p.get("resource") for p in params if p.get("name") == "resource"), None)
        profile = next((p.get("valueUri") or p.get("valueCanonical") for p in params if p.get("name") == "profile"),
                       profile)
        if not isinstance(res, dict):
            raise FhirHttpError(400, "Parameters for $validate need a 'resource' parameter")
        body = res
    if body.get("resourceType") != rtype:
        raise FhirHttpError(400, f"the resource is a {body.get('resourceType')}, the URL names {rtype}")
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
