"""Agreement with the HL7 Java validator on its own R4 test cases.

    python -m fhir_iop.validation.agreement [--fixtures DIR]     (or: fhir-iop agreement)

``DIR/manifest-r4.json`` lists the cases (``file``, ``expected_error_count``,
``expected_error_expressions``, ``depends_on_terminology_server``, and per-case settings copied
from the upstream manifest). For each case fhir-iop validates the file with the settings the case
names and compares:

- the verdict: any error (or fatal) issue, against ``expected_error_count > 0``;
- the locations: how many of the expected error locations carry an error of ours (HL7's
  ``/*Type/id*/`` markers and ``/f:`` XML paths are normalised away before comparing).

Cases that needed an online terminology server are reported as a separate group. Settings
honoured when a case has them: ``examples`` (example URLs allowed), ``allowed-extension-domain(s)``,
``validateContains: IGNORE``, ``best-practice`` (the severity of best-practice invariants such as
dom-6), ``profile`` (validate against a profile, loading its ``supporting`` files), ``supporting``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from fhir_iop.errors import FhirIopError, InputError
from fhir_iop.validation.validator import Issue, Validator

DEFAULT_FIXTURES = "fhir-test-cases-validator-r4"


def default_fixtures() -> Path:
    from fhir_iop.terminology import PROJECT_ROOT
    return PROJECT_ROOT.parent / "shared" / "fixtures" / DEFAULT_FIXTURES


@dataclass
class CaseResult:
    name: str
    file: str
    terminology: bool
    expected_errors: int
    found_errors: int
    expected_locations: list[str]
    matched_locations: list[str]
    issues: list[Issue]
    expected_messages: list[str]
    skipped: str | None = None

    @property
    def agrees(self) -> bool:
        return (self.expected_errors > 0) == (self.found_errors > 0)

    def reason(self) -> str:
        if self.expected_errors and not self.found_errors:
            return "missed: " + (self.expected_messages[0] if self.expected_messages else "?")
        errors = [i for i in self.issues if i.severity in ("error", "fatal")]
        return "extra: " + (f"{errors[0].expression}: {errors[0].message}" if errors else "?")


@dataclass
class Report:
    results: list[CaseResult] = field(default_factory=list)

    def group(self, terminology: bool) -> list[CaseResult]:
        return [r for r in self.results if r.terminology == terminology and r.skipped is None]

    @staticmethod
    def figures(results: list[CaseResult]) -> tuple[int, int, int, int]:
        """(cases agreeing, cases, expected locations found, expected locations)."""
        agree = sum(r.agrees for r in results)
        locs = sum(len(r.expected_locations) for r in results)
        found = sum(len(r.matched_locations) for r in results)
        return agree, len(results), found, locs

    def verdict_agreement(self, terminology: bool = False) -> float:
        agree, n, _, _ = self.figures(self.group(terminology))
        return agree / n if n else 0.0

    def lines(self, verbose: bool = True) -> list[str]:
        out = []
        for label, term in (("no terminology server", False), ("needs a terminology server", True)):
            agree, n, found, locs = self.figures(self.group(term))
            out.append(f"{label:>28}: verdict agrees on {agree}/{n} cases ({100 * agree / n if n else 0:.1f}%), "
                       f"{found}/{locs} expected error locations found")
        skipped = [r for r in self.results if r.skipped]
        if skipped:
            out.append(f"{'skipped':>28}: " + ", ".join(f"{r.name} ({r.skipped})" for r in skipped))
        if verbose:
            for term in (False, True):
                bad = [r for r in self.group(term) if not r.agrees]
                if bad:
                    out.append(f"disagreements ({'needs terminology server' if term else 'no terminology server'}):")
                    for r in bad:
                        out.append(f"  {r.name} [{r.file}] expected {r.expected_errors} error(s), found "
                                   f"{r.found_errors}: {r.reason()[:200]}")
        return out


def normalise(expression: str) -> str:
    e = re.sub(r"/\*.*?\*/", "", expression)
    if e.startswith("/f:"):
        e = e[3:].split("/")[0]
    return e.rstrip("/")


def load_case(path: Path, validator: Validator) -> tuple[dict | None, list[Issue]]:
    """A case file as JSON, with the problems found reading it (an unreadable file is one fatal issue)."""
    from fhir_iop.validation.files import read_resources
    try:
        [(_, resource, issues)] = read_resources(path, validator.defs)
    except FhirIopError as e:
        return None, [Issue("fatal", "structure", path.name, str(e), "read")]
    return resource, issues


def run_agreement(fixtures: Path | None = None, names: list[str] | None = None) -> Report:
    fixtures = Path(fixtures) if fixtures else default_fixtures()
    manifest_path = fixtures / "manifest-r4.json"
    if not manifest_path.is_file():
        raise InputError(f"{manifest_path}: no manifest (the HL7 validator test cases are in "
                         f"../shared/fixtures/{DEFAULT_FIXTURES})")
    manifest = orjson.loads(manifest_path.read_bytes())
    base = Validator()
    report = Report()
    for case in manifest.get("cases", ()):
        if names and case["name"] not in names:
            continue
        expected_messages = []
        outcome_path = fixtures / case.get("expected_outcome", "")
        if outcome_path.is_file():
            oo = orjson.loads(outcome_path.read_bytes())
            expected_messages = [(i.get("details") or {}).get("text") or i.get("diagnostics", "")
                                 for i in oo.get("issue", ()) if i.get("severity") in ("error", "fatal")]
        result = CaseResult(case["name"], case["file"], bool(case.get("depends_on_terminology_server")),
                            int(case.get("expected_error_count", 0)), 0,
                            sorted({normalise(e) for e in case.get("expected_error_expressions", ())}), [], [],
                            expected_messages)
        report.results.append(result)
        validator, profiles, skip = _configure(case, fixtures, base)
        if skip:
            result.skipped = skip
            continue
        path = fixtures / case["file"]
        resource, issues = load_case(path, validator)
        if resource is not None:
            issues += validator.validate(resource, profiles)
        result.issues = issues
        errors = [i for i in issues if i.severity in ("error", "fatal")]
        result.found_errors = len(errors)
        ours = {normalise(i.expression) for i in errors}
        result.matched_locations = [e for e in result.expected_locations if e in ours]
    return report


def _configure(case: dict, fixtures: Path, base: Validator) -> tuple[Validator, tuple[str, ...], str | None]:
    """The validator and profiles a case asks for, or a reason to skip it."""
    changes = {}
    if "examples" in case:
        changes["allow_example_urls"] = bool(case["examples"])
    domains = case.get("allowed-extension-domains") or ([case["allowed-extension-domain"]]
                                                        if case.get("allowed-extension-domain") else [])
    if domains:
        changes["extension_domains"] = base.options.extension_domains + tuple(domains)
    if str(case.get("best-practice", "")).lower() in ("warning", "error", "information", "hint"):
        changes["best_practice"] = {"hint": "information"}.get(case["best-practice"].lower(),
                                                               case["best-practice"].lower())
    if str(case.get("validateContains", "")).upper() == "IGNORE":
        changes["check_contained"] = False
    profiles: tuple[str, ...] = ()
    supporting = list(case.get("supporting", ()))
    prof = case.get("profile")
    if isinstance(prof, dict):
        supporting += prof.get("supporting", ())
        if prof.get("source"):
            supporting.append(prof["source"])
    defs = base.defs
    if supporting:
        extra = []
        for name in supporting:
            p = fixtures / name
            if not p.is_file():
                return base, (), f"supporting file {name} is not in the fixtures"
            if p.suffix == ".xml":
                from fhir_iop.validation.fhirxml import parse
                try:
                    extra.append(parse(p.read_bytes(), defs)[0])
                except ValueError:
                    return base, (), f"supporting file {name} is not FHIR XML"
            else:
                extra.append(orjson.loads(p.read_bytes()))
        defs = defs.overlay(extra)
    if isinstance(prof, dict) and prof.get("source"):
        src = next((r for r in extra if r.get("resourceType") == "StructureDefinition"
                    and supporting[-1] == prof["source"]), None)
        url = src.get("url") if src else None
        if not url or defs.structure(url) is None or not defs.structure(url).has_snapshot:
            return base, (), "its profile has no snapshot"
        profiles = (url,)
    if not changes and defs is base.defs:
        return base, profiles, None
    from dataclasses import replace
    return Validator(defs, replace(base.options, **changes)), profiles, None


if __name__ == "__main__":
    from fhir_iop.cli import main
    import sys
    main(["agreement", *sys.argv[1:]])
