"""Reading files for validation: JSON, NDJSON or XML, invalid content carried through.

A file that cannot be read at all (missing, not JSON, not well-formed XML, not FHIR) raises
:class:`~fhir_iop.errors.InputError`; content that is readable but wrong is left for the validator
(JSON) or reported here as issues with the element's location (XML elements R4 does not define).
"""

from __future__ import annotations

from pathlib import Path

import orjson

from fhir_iop.errors import InputError
from fhir_iop.validation.definitions import Definitions
from fhir_iop.validation.validator import Issue


def read_resources(path: Path, defs: Definitions) -> list[tuple[str, dict, list[Issue]]]:
    """``(label, resource, issues found while reading)`` for each resource in the file.

    A JSON or XML file holds one resource (a Bundle is one resource, validated entry by entry);
    an NDJSON file holds one per line.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: {e.strerror}") from e
    suffix = path.suffix.lower()
    if suffix in (".ndjson", ".jsonl"):
        out = []
        for n, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not valid JSON: {e}") from e
            out.append((f"{path}:{n}", _resource(path, value), []))
        return out
    if suffix == ".xml" or (suffix != ".json" and data.lstrip()[:1] == b"<"):
        from fhir_iop.validation.fhirxml import parse
        try:
            res, problems = parse(data, defs)
        except ValueError as e:
            raise InputError(f"{path}: not FHIR XML: {e}") from e
        return [(str(path), res, [Issue("error", "structure", p.location, p.message, "xml") for p in problems])]
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON: {e}") from e
    return [(str(path), _resource(path, value), [])]


def _resource(path: Path, value) -> dict:
    if not isinstance(value, dict) or not isinstance(value.get("resourceType"), str):
        raise InputError(f"{path}: not a FHIR resource (no resourceType)")
    return value
