"""``docs/record-format.md``, generated from the record models and CodeSystems (a test keeps it current).

Run ``python -m fhir_iop.records.doc > docs/record-format.md`` after changing a model.
"""

from __future__ import annotations

import inspect
import typing

from fhir_iop.records.io import ENTRY_SEP, LIST_SEP, PART_SEP, shapes
from fhir_iop.records.model import RECORD_TYPES, CodeFrom, Part
from fhir_iop.terminology import load_terminology

INTRO = f"""# The IOP record format

fhir-iop's own format for an Intensive Outpatient Program's records. Each record type is one file,
named after the type: `clients.csv` or `clients.ndjson`, and so on. A run may include any of them;
a record that points to another type (an attendance row to its group session) needs that type in
the same run.

- **CSV**: UTF-8, a header row naming the columns (any order, unknown columns rejected), empty cell
  = not given. Lists are `{LIST_SEP}`-separated (`F11.20{LIST_SEP}F10.20`); histories are
  `{ENTRY_SEP}`-separated entries whose parts are joined by `{PART_SEP}`
  (`referred{PART_SEP}2026-01-02{ENTRY_SEP}active{PART_SEP}2026-01-05`).
- **NDJSON**: one JSON object per line with the same field names; lists are arrays and history
  entries are objects (`{{"status": "active", "since": "2026-01-05"}}`).
- Dates are `YYYY-MM-DD`; datetimes are ISO 8601, and one written without a UTC offset takes the
  site time zone (`mappings/site.json`). Coded fields take the codes listed, or a site code that a
  ConceptMap in the site's mappings directory translates to one of them.

Generated from `fhir_iop/records/model.py` by `python -m fhir_iop.records.doc`.
"""


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _type_name(args[0])
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is list:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    if origin is typing.Literal:
        return "code"
    if isinstance(annotation, type):
        return {"str": "text", "int": "integer"}.get(annotation.__name__, annotation.__name__)
    return str(annotation)


def _code_from(annotation) -> CodeFrom | None:
    if typing.get_origin(annotation) is typing.Annotated:
        return next((m for m in typing.get_args(annotation)[1:] if isinstance(m, CodeFrom)), None)
    for a in typing.get_args(annotation):
        if (found := _code_from(a)) is not None:
            return found
    return None


def _codes(field, terminology) -> str:
    coded = next((m for m in field.metadata if isinstance(m, CodeFrom)), None) or _code_from(field.annotation)
    if coded is not None:
        return ", ".join(f"`{c}`" for c in terminology.codes(coded.cs_id)) + f" (CodeSystem {coded.cs_id})"
    ann = field.annotation
    for a in (ann, *typing.get_args(ann)):
        if typing.get_origin(a) is typing.Literal:
            return ", ".join(f"`{c}`" for c in typing.get_args(a))
        if typing.get_origin(a) is list:
            inner = typing.get_args(a)[0]
            if typing.get_origin(inner) is typing.Literal:
                return ", ".join(f"`{c}`" for c in typing.get_args(inner))
    for m in field.metadata:
        if getattr(m, "pattern", None):
            return f"pattern `{m.pattern}`"
    return ""


def _table(model, terminology) -> list[str]:
    rows = ["| field | type | required | allowed | meaning |", "|---|---|---|---|---|"]
    for name, f in model.model_fields.items():
        kind, part = shapes(model)[name]
        typ = _type_name(f.annotation)
        if kind == "parts":
            typ = f"history of {part.__name__} (`{PART_SEP.join(part.model_fields)}`)"
        rows.append(f"| `{name}` | {typ} | {'yes' if f.is_required() else 'no'} | "
                    f"{_codes(f, terminology)} | {f.description or ''} |")
    return rows


def record_format_markdown() -> str:
    t = load_terminology()
    out = [INTRO]
    parts = set()
    for model in RECORD_TYPES:
        out += [f"## `{model.file_stem}` — {model.__name__}", "", inspect.cleandoc(model.__doc__ or ""), ""]
        out += _table(model, t) + [""]
        parts |= {p for k, p in shapes(model).values() if p}
    for part in sorted(parts, key=lambda p: p.__name__):
        out += [f"## {part.__name__} (a history entry)", ""] + _table(part, t) + [""]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(record_format_markdown(), end="")
