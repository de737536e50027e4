"""The exceptions fhir-iop raises, and the per-record problem report.

    FhirIopError
    ├── ConfigError        a mapping table or site setting is unusable (fails before the first record)
    └── InputError         an input file cannot be read at all (missing, wrong format)

Problems with single records are not exceptions: readers and mappers yield :class:`Problem`
entries, the rest of the input still maps, and the CLI turns them into text and an
OperationOutcome.
"""

from __future__ import annotations

from dataclasses import dataclass


class FhirIopError(Exception):
    """Base of every error fhir-iop raises on purpose."""


class ConfigError(FhirIopError):
    """A site setting, CodeSystem or ConceptMap is missing or inconsistent."""


class InputError(FhirIopError):
    """An input file cannot be read as a whole."""


@dataclass(frozen=True)
class Problem:
    """One rejected record, or one thing that could not be mapped.

    ``where`` names the source: ``file:line`` for IOP records, ``file: Type/id`` for FHIR input.
    ``field`` is the record field (IOP side) or FHIRPath expression (FHIR side), if known.
    ``severity`` is ``error`` for rejected input and ``warning`` for content reported but not mapped.
    """

    where: str
    message: str
    field: str | None = None
    severity: str = "error"
    code: str = "invalid"

    def __str__(self) -> str:
        f = f" [{self.field}]" if self.field else ""
        return f"{self.where}{f}: {self.severity}: {self.message}"

    def to_issue(self) -> dict:
        issue = {"severity": self.severity, "code": self.code,
                 "diagnostics": f"{self.where}: {self.message}"}
        if self.field:
            issue["expression"] = [self.field]
        return issue


def operation_outcome(problems) -> dict:
    issues = [p.to_issue() for p in problems]
    if not issues:
        issues = [{"severity": "information", "code": "informational", "diagnostics": "no problems"}]
    return {"resourceType": "OperationOutcome", "issue": issues}
