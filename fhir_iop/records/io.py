"""Reading and writing IOP records as CSV (one file per record type) and NDJSON.

Readers stream: they yield ``(line, record)`` or a :class:`~fhir_iop.errors.Problem` per input
record, never raise on a bad record, and hold one record at a time.

CSV cells: empty means "not given"; a list is ``|``-separated (``F11.20|F10.20``); a history is
``;``-separated entries whose parts are joined by ``@`` (``active@2026-01-05;on-hold@2026-02-01``).
"""

from __future__ import annotations

import csv
import io
import re
import typing
from collections.abc import Iterator
from datetime import date, datetime, time
from pathlib import Path

import orjson
from pydantic import BaseModel, ValidationError

from fhir_iop.errors import Problem
from fhir_iop.records.model import BY_STEM, FieldError, Part, Record

LIST_SEP, ENTRY_SEP, PART_SEP = "|", ";", "@"
CSV_SUFFIXES = (".csv",)
NDJSON_SUFFIXES = (".ndjson", ".jsonl")


def record_type_for(path: Path) -> type[Record] | None:
    stem = path.name.split(".", 1)[0]
    return BY_STEM.get(stem)


def _shape(annotation) -> tuple[str, type[Part] | None]:
    """``scalar``, ``list`` (of scalars) or ``parts`` (list of Part models)."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        item = typing.get_args(item)[0] if typing.get_origin(item) is typing.Annotated else item
        if isinstance(item, type) and issubclass(item, Part):
            return "parts", item
        return "list", None
    return "scalar", None


_SHAPES: dict[type, dict[str, tuple[str, type[Part] | None]]] = {}


def shapes(model: type[BaseModel]) -> dict[str, tuple[str, type[Part] | None]]:
    if model not in _SHAPES:
        _SHAPES[model] = {name: _shape(f.annotation) for name, f in model.model_fields.items()}
    return _SHAPES[model]


def _problems(where: str, err: ValidationError, key: str | None) -> list[Problem]:
    out = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"]) or None
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            loc = ".".join(x for x in (loc, cause.field) if x)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "extra_forbidden":
            msg = "unknown field"
        where_k = f"{where} ({key})" if key else where
        out.append(Problem(where_k, msg, field=loc))
    return out


def _validate(model: type[Record], data: dict, where: str, context: dict):
    try:
        return model.model_validate(data, context=context)
    except ValidationError as e:
        key = data.get(model.key_field) if isinstance(data, dict) else None
        return _problems(where, e, f"{model.key_field}={key}" if key else None)


# -- CSV -------------------------------------------------------------------------------------

def _decoded_lines(raw: typing.BinaryIO) -> Iterator[str]:
    """Lines decoded as UTF-8; undecodable bytes survive as surrogates and are reported per record."""
    first = True
    for line in raw:
        if first and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        first = False
        yield line.decode("utf-8", errors="surrogateescape")


def _bad_bytes(value: str) -> str | None:
    for ch in value:
        if "\udc80" <= ch <= "\udcff":
            return f"0x{ord(ch) - 0xDC00:02X}"
    return None


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _control(value) -> str | None:
    """``U+00XX`` of the first control character (C0 but tab, LF, CR) in a value, its items or parts."""
    if isinstance(value, str):
        m = _CONTROL.search(value)
        return f"U+{ord(m[0]):04X}" if m else None
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, list):
        return next((c for v in value if (c := _control(v)) is not None), None)
    return None


def _csv_cell(model: type[Record], name: str, cell: str):
    kind, part = shapes(model)[name]
    if kind == "list":
        return [v for v in (x.strip() for x in cell.split(LIST_SEP)) if v]
    if kind == "parts":
        names = list(part.model_fields)
        entries = []
        for entry in (e.strip() for e in cell.split(ENTRY_SEP)):
            if not entry:
                continue
            values = entry.split(PART_SEP)
            if len(values) != len(names):
                raise ValueError(f"entry {entry!r} should be {PART_SEP.join(names)}")
            entries.append({k: v for k, v in zip(names, values) if v != ""})
        return entries
    return cell


def read_csv(path: Path, model: type[Record], context: dict) -> Iterator[tuple[int, Record] | Problem]:
    with open(path, "rb") as raw:
        reader = csv.reader(_decoded_lines(raw), strict=True)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield Problem(f"{path}:1", f"unreadable CSV header: {e}")
            return
        header = [h.strip() for h in header]
        unknown = [h for h in header if h not in model.model_fields]
        if unknown or len(set(header)) != len(header):
            what = f"unknown columns {unknown}" if unknown else "a column is named twice"
            yield Problem(f"{path}:1", f"{what}; {model.file_stem} columns are: "
                          f"{', '.join(model.model_fields)}", field="header")
            return
        start = reader.line_num + 1
        offset = 0  # physical lines skipped before the current reader started
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                end = offset + reader.line_num
                span = f"{start}" if end <= start else f"{start}-{end}"
                yield Problem(f"{path}:{span}", f"broken CSV quoting: {e} (an unbalanced quote)")
                if "end of data" in str(e) and end > start:
                    # a quote that never closes swallowed the rest: read again after its line
                    offset = start
                    raw.seek(0)
                    lines = _decoded_lines(raw)
                    for _ in range(start):
                        next(lines, None)
                    reader = csv.reader(lines, strict=True)
                    start += 1
                else:
                    start = end + 1
                continue
            line, end = start, offset + reader.line_num
            start = end + 1
            if not row or all(not c.strip() for c in row):
                continue
            where = f"{path}:{line}" if end == line else f"{path}:{line}-{end}"
            if len(row) != len(header):
                yield Problem(where, f"{len(row)} cells where the header has {len(header)}"
                              + (" (an unbalanced quote joins lines)" if end > line else ""))
                continue
            data, bad = {}, None
            for name, cell in zip(header, row):
                if (b := _bad_bytes(cell)) is not None:
                    bad = Problem(where, f"not UTF-8 (byte {b}); save the file as UTF-8", field=name)
                    break
                if "\n" in cell or "\r" in cell:
                    bad = Problem(where, "line break inside a cell (an unbalanced quote?)", field=name)
                    break
                if (c := _control(cell)) is not None:
                    bad = Problem(where, f"control character {c} in the cell", field=name)
                    break
                cell = cell.strip()
                if cell:
                    try:
                        data[name] = _csv_cell(model, name, cell)
                    except ValueError as e:
                        bad = Problem(where, str(e), field=name)
                        break
            if bad:
                yield bad
                continue
            result = _validate(model, data, where, context)
            if isinstance(result, list):
                yield from result
            else:
                yield line, result


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, BaseModel):
        return PART_SEP.join(_csv_value(getattr(value, n)) for n in type(value).model_fields)
    if isinstance(value, list):
        sep = ENTRY_SEP if value and isinstance(value[0], BaseModel) else LIST_SEP
        return sep.join(_csv_value(v) for v in value)
    return str(value)


class CsvRecordWriter:
    def __init__(self, stream: typing.TextIO, model: type[Record]):
        self.fields = list(model.model_fields)
        self.writer = csv.writer(stream, lineterminator="\n")
        self.writer.writerow(self.fields)

    def write(self, record: Record) -> None:
        self.writer.writerow([_csv_value(getattr(record, f)) for f in self.fields])


# -- NDJSON ----------------------------------------------------------------------------------

def read_ndjson(path: Path, model: type[Record], context: dict) -> Iterator[tuple[int, Record] | Problem]:
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if n == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                data = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                msg = str(e)
                if "utf-8" in msg.lower() or "surrogate" in msg.lower():
                    msg = "not UTF-8; save the file as UTF-8"
                yield Problem(where, f"not valid JSON: {msg}")
                continue
            if not isinstance(data, dict):
                yield Problem(where, f"expected a JSON object, got {type(data).__name__}")
                continue
            bad = next(((k, c) for k, v in data.items() if (c := _control([k, v])) is not None), None)
            if bad is not None:
                yield Problem(where, f"control character {bad[1]} in the value", field=str(bad[0])[:64])
                continue
            result = _validate(model, data, where, context)
            if isinstance(result, list):
                yield from result
            else:
                yield n, result


class NdjsonRecordWriter:
    def __init__(self, stream: typing.BinaryIO, model: type[Record]):
        self.stream = stream

    def write(self, record: Record) -> None:
        self.stream.write(orjson.dumps(record.model_dump(mode="json", exclude_none=True,
                                                         exclude_defaults=False)) + b"\n")


def read_records(path: Path, context: dict, model: type[Record] | None = None):
    """Records of one file, typed by its name (``clients.csv``, ``attendance.ndjson``...)."""
    model = model or record_type_for(path)
    if model is None:
        known = ", ".join(BY_STEM)
        yield Problem(str(path), f"not an IOP record file: the name should start with one of {known}")
        return
    if path.suffix in CSV_SUFFIXES:
        yield from read_csv(path, model, context)
    elif path.suffix in NDJSON_SUFFIXES:
        yield from read_ndjson(path, model, context)
    else:
        yield Problem(str(path), "unknown file format: use .csv or .ndjson")


def dump_records(records, model: type[Record], fmt: str = "csv") -> str | bytes:
    """All records of one type as a CSV text or NDJSON bytes (for tests and small outputs)."""
    if fmt == "csv":
        buf = io.StringIO()
        w = CsvRecordWriter(buf, model)
    else:
        buf = io.BytesIO()
        w = NdjsonRecordWriter(buf, model)
    for r in records:
        w.write(r)
    return buf.getvalue()
