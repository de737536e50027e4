"""Validation of FHIR R4 resources: structure, cardinality, fixed/pattern values, slices, bindings,
invariants, extensions and Bundle references, against the R4 core definitions and the profiles
fhir-iop knows (its own, US Core 5.0.1, the core profiles).

    from fhir_iop.validation import validate
    outcome = validate(resource)                 # an OperationOutcome (dict)

    from fhir_iop.validation import Validator
    issues = Validator().validate(resource, profiles=[url])   # list[Issue]

See docs/validation.md for what is covered and what is not.
"""

from __future__ import annotations

from fhir_iop.validation.validator import Issue, Options, Validator

__all__ = ["Issue", "Options", "Validator", "operation_outcome", "validate"]

_default: Validator | None = None


def default_validator() -> Validator:
    """One Validator per process with the default options (definitions are loaded once)."""
    global _default
    if _default is None:
        _default = Validator()
    return _default


def operation_outcome(issues: list[Issue]) -> dict:
    """The OperationOutcome of a list of issues (one informational issue if there are none)."""
    out = [i.to_fhir() for i in issues]
    if not out:
        out = [{"severity": "information", "code": "informational", "diagnostics": "No issues detected"}]
    return {"resourceType": "OperationOutcome", "issue": out}


def validate(resource: dict, profiles: tuple[str, ...] | list[str] = ()) -> dict:
    """Validates one resource (or Bundle) and returns the OperationOutcome."""
    return operation_outcome(default_validator().validate(resource, profiles))
