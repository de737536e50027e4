"""FHIR search: a query string parsed against the registry, turned into SQLAlchemy Core, and run.

Supported, for every indexed parameter of a type: token (``system|code``, ``|code``, ``system|``,
``code``; ``:not``, ``:missing``), uri (exact, ``:below``), string (starts-with, ``:exact``,
``:contains``; case- and accent-insensitive), date (prefixes eq ne lt le gt ge sa eb), reference
(``Type/id``, ``id``, absolute URL; ``:Type``), quantity/number (prefixes, ``value|system|code``),
with ``,`` as OR and repeated parameters as AND; ``_id``, ``_lastUpdated``; and the result
parameters ``_count``, ``_offset``, ``_sort``, ``_include``, ``_revinclude``, ``_summary``,
``_elements``, ``_total``. Paging is by offset over a total order (the sort keys, then the row id).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sqlalchemy import and_, exists, false, func, not_, or_, select, true

from fhir_iop.store.errors import Invalid, UnknownParameter
from fhir_iop.store.models import INDEX_TABLES, resource, search_reference
from fhir_iop.store.params import COLUMN_PARAMS, Registry, SearchParam, date_range, normalize, split_reference

#: result parameters this module handles; ``_format`` and ``_pretty`` belong to the HTTP layer
RESULT_PARAMS = ("_count", "_offset", "_sort", "_include", "_revinclude", "_summary", "_elements", "_total")
TRANSPORT_PARAMS = ("_format", "_pretty")
DATE_PREFIXES = ("eq", "ne", "lt", "le", "gt", "ge", "sa", "eb")
MODIFIERS = {"token": ("not", "missing"), "uri": ("below", "missing"), "string": ("exact", "contains", "missing"),
             "date": ("missing",), "reference": ("missing",), "quantity": ("missing",), "number": ("missing",)}
SORT_TYPES = ("date", "string", "token", "uri", "quantity", "number")
MAX_INCLUDES = 1000
#: the largest _offset (databases take 32-bit offsets at least; past it SQLite overflows: a 500)
MAX_OFFSET = 2 ** 31 - 1
TOTAL_CAP = 1000  # default: Bundle.total is given when the matches are at most this many


@dataclass
class Criterion:
    name: str
    modifier: str | None
    values: list[str]
    param: SearchParam | None  # None for _id and _lastUpdated


@dataclass
class Query:
    type: str
    criteria: list[Criterion] = field(default_factory=list)
    count: int = 50
    offset: int = 0
    sort: list[tuple[str, bool]] = field(default_factory=list)  # (name, descending)
    include: list[tuple[str, str, str | None]] = field(default_factory=list)
    revinclude: list[tuple[str, str, str | None]] = field(default_factory=list)
    summary: str | None = None
    elements: list[str] | None = None
    total: str = "estimate"
    unknown: list[tuple[str, str]] = field(default_factory=list)  # ignored (lenient), with the reason
    raw: list[tuple[str, str]] = field(default_factory=list)  # what the links repeat

    def link_params(self, offset: int) -> list[tuple[str, str]]:
        params = [(k, v) for k, v in self.raw if k not in ("_count", "_offset")]
        return params + [("_count", str(self.count)), ("_offset", str(offset))]


#: control characters (C0 but tab, LF, CR), refused in search parameters (see parse)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def split_values(value: str) -> list[str]:
    """Comma-separated alternatives, ``\\,`` kept as a comma."""
    return [v.replace("\\,", ",") for v in re.split(r"(?<!\\),", value)]


def parse(registry: Registry, rt: str, params: list[tuple[str, str]], strict: bool = False,
          default_count: int = 50, max_count: int = 1000) -> Query:
    """A search for ``rt`` from query parameters; unknown ones raise (strict) or are listed (lenient)."""
    q = Query(rt, count=default_count)

    def unknown(name: str, value: str, reason: str):
        if strict:
            raise UnknownParameter(f"{reason} (Prefer: handling=strict)")
        q.unknown.append((f"{name}={value}", reason))

    for name, value in params:
        if _CONTROL.search(name) or _CONTROL.search(value):  # whatever the route (query, form, If-None-Exist,
            # Bundle entry URL): a NUL cannot reach the database (PostgreSQL refuses it) and FHIR has no such text
            raise Invalid(f"search parameter {name[:40]!r} holds a control character", status=400)
        base, _, modifier = name.partition(":")
        modifier = modifier or None
        if name in TRANSPORT_PARAMS:
            continue
        if base in RESULT_PARAMS:
            if _result_param(registry, q, base, modifier, value, max_count, unknown):
                q.raw.append((name, value))
            continue
        if base in COLUMN_PARAMS:
            if modifier:
                raise Invalid(f"modifier :{modifier} is not supported on {base}", status=400)
            q.criteria.append(Criterion(base, None, split_values(value), None))
            q.raw.append((name, value))
            continue
        if "." in base or base.startswith("_has"):
            unknown(name, value, f"chained and reverse-chained parameters are not supported: {name}")
            continue
        p = registry.get(rt, base)
        if p is None:
            unknown(name, value, f"unknown search parameter {base!r} for {rt}")
            continue
        if modifier and not (modifier in MODIFIERS[p.type] or p.type == "reference" and modifier in p.targets):
            raise Invalid(f"modifier :{modifier} is not supported on {rt}.{base} ({p.type})", status=400)
        if modifier == "missing" and value not in ("true", "false"):
            raise Invalid(f"{name}: :missing takes true or false", status=400)
        q.criteria.append(Criterion(base, modifier, split_values(value), p))
        q.raw.append((name, value))
    _check_limits(q)
    return q


#: what one search may ask for (past them a query is slow to plan — PostgreSQL took 25 s for 64 criteria
#: on an empty store — or past the database's own limits on expression depth and compound selects: a
#: 500): criteria, values of one criterion, _sort keys, includes
MAX_CRITERIA, MAX_VALUES, MAX_SORT, MAX_INCLUDE_PARAMS = 20, 100, 8, 32
#: values of all criteria together (each is a condition the database plans)
MAX_TOTAL_VALUES = 256


def _check_limits(q: Query) -> None:
    from fhir_iop.store.errors import TooCostly
    if len(q.criteria) > MAX_CRITERIA:
        raise TooCostly(f"{len(q.criteria)} search criteria: at most {MAX_CRITERIA} in one search")
    for c in q.criteria:
        if len(c.values) > MAX_VALUES:
            raise TooCostly(f"{c.name} has {len(c.values)} values: at most {MAX_VALUES}")
    if (n := sum(len(c.values) for c in q.criteria)) > MAX_TOTAL_VALUES:
        raise TooCostly(f"{n} search values in all: at most {MAX_TOTAL_VALUES}")
    if len(q.sort) > MAX_SORT:
        raise TooCostly(f"_sort has {len(q.sort)} keys: at most {MAX_SORT}")
    if len(q.include) + len(q.revinclude) > MAX_INCLUDE_PARAMS:
        raise TooCostly(f"{len(q.include) + len(q.revinclude)} _include/_revinclude: at most {MAX_INCLUDE_PARAMS}")


def _result_param(registry, q: Query, base, modifier, value, max_count, unknown) -> bool:
    if base == "_count":
        if not value.isdigit():
            raise Invalid(f"_count must be a non-negative integer, not {value!r}", status=400)
        q.count = min(int(value), max_count)
    elif base == "_offset":
        if not value.isdigit() or int(value) > MAX_OFFSET:
            raise Invalid(f"_offset must be an integer from 0 to {MAX_OFFSET}, not {value[:20]!r}", status=400)
        q.offset = int(value)
    elif base == "_sort":
        for key in value.split(","):
            desc = key.startswith("-")
            name = key.lstrip("-")
            p = registry.get(q.type, name)
            if name in COLUMN_PARAMS or p is not None and p.type in SORT_TYPES:
                q.sort.append((name, desc))
            else:
                unknown("_sort", value, f"cannot sort {q.type} by {name!r}")
                return False
    elif base in ("_include", "_revinclude"):
        if modifier:
            unknown(f"{base}:{modifier}", value, f"{base}:{modifier} is not supported")
            return False
        parts = value.split(":")
        src = parts[0]
        p = registry.get(src, parts[1]) if len(parts) in (2, 3) else None
        if p is None or p.type != "reference" or (base == "_include" and src != q.type):
            unknown(base, value, f"{base}={value} is not a reference parameter of "
                                 f"{q.type if base == '_include' else src}")
            return False
        (q.include if base == "_include" else q.revinclude).append((src, parts[1], parts[2] if len(parts) == 3
                                                                    else None))
    elif base == "_summary":
        if value in ("count", "true", "text", "data"):  # true/text/data: server/elements.py summarize()
            q.summary = value
        elif value != "false":
            unknown("_summary", value, f"_summary={value} is not supported (count, true, text, data, false)")
            return False
    elif base == "_elements":
        q.elements = [e.strip() for e in value.split(",") if e.strip()]
    elif base == "_total":
        if value not in ("none", "estimate", "accurate"):
            raise Invalid("_total takes none, estimate or accurate", status=400)
        q.total = value
    return True


# -- SQL ------------------------------------------------------------------------------------------

def _prefix(value: str, allowed=DATE_PREFIXES) -> tuple[str, str]:
    if len(value) > 2 and value[:2] in allowed and not value[:2].isdigit():
        return value[:2], value[2:]
    return "eq", value


def _date_condition(low, high, value: str):
    prefix, v = _prefix(value)
    rng = date_range(v)
    if rng is None:
        raise Invalid(f"not a FHIR date: {v!r}", status=400)
    pl, pu = rng
    return {"eq": and_(low >= pl, high <= pu), "ne": not_(and_(low >= pl, high <= pu)),
            "lt": low < pl, "le": low <= pu, "gt": high > pu, "ge": high >= pl,
            "sa": low > pu, "eb": high < pl}[prefix]


def _number_condition(col, value: str):
    prefix, v = _prefix(value, DATE_PREFIXES + ("ap",))
    try:
        n = float(v)
    except ValueError:
        raise Invalid(f"not a number: {v!r}", status=400) from None
    decimals = len(v.split(".", 1)[1]) if "." in v else 0
    half = 0.5 * 10 ** -decimals
    return {"eq": and_(col >= n - half, col < n + half), "ne": or_(col < n - half, col >= n + half),
            "lt": col < n, "le": col <= n, "gt": col > n, "ge": col >= n, "sa": col > n, "eb": col < n,
            "ap": and_(col >= n * 0.9, col <= n * 1.1)}[prefix]


def _value_condition(c: Criterion, table, value: str):
    t = c.param.type
    if t == "token":
        if "|" in value:
            system, code = value.split("|", 1)
            conds = [table.c.system.is_(None) if system == "" else table.c.system == system]
            if code:
                conds.append(table.c.code == code)
            return and_(*conds)
        return table.c.code == value
    if t == "uri":
        return table.c.code.startswith(value, autoescape=True) if c.modifier == "below" else table.c.code == value
    if t == "string":
        n = normalize(value)
        if c.modifier == "exact":
            return table.c.value == n
        if c.modifier == "contains":
            return table.c.value.contains(n, autoescape=True)
        return table.c.value.startswith(n, autoescape=True)
    if t == "date":
        return _date_condition(table.c.low, table.c.high, value)
    if t == "reference":
        rtype, rid = split_reference(value)
        if c.modifier:  # :Type
            return and_(table.c.target_type == c.modifier, table.c.target_id == value)
        if rtype:
            return and_(table.c.target_type == rtype, table.c.target_id == rid) if "://" not in value else \
                or_(table.c.url == value, and_(table.c.target_type == rtype, table.c.target_id == rid))
        return table.c.target_id == value if "/" not in value else table.c.url == value
    if t in ("quantity", "number"):
        parts = value.split("|")
        cond = _number_condition(table.c.value, parts[0])
        if len(parts) == 3:
            if parts[1]:
                cond = and_(cond, table.c.system == parts[1])
            if parts[2]:
                cond = and_(cond, table.c.code == parts[2])
        return cond
    raise Invalid(f"parameter type {t} is not searchable", status=400)


#: how selective a parameter type usually is: the most selective criterion drives the query
SELECTIVITY = {"reference": 0, "token": 1, "uri": 1, "string": 2, "quantity": 3, "number": 3, "date": 4}


def _criterion(rt: str, c: Criterion, drive: bool):
    """A condition on the resource table for one criterion.

    The driving criterion is ``rid IN (matching index rows)``, so the database starts from the
    index table; the others are correlated ``EXISTS`` checks on the few rows that remain (SQLite
    would otherwise materialize every ``IN`` list; PostgreSQL plans both as semi-joins).
    """
    if c.param is None:  # a column of the resource table
        if c.name == "_id":
            return resource.c.id.in_(c.values)
        return or_(*(_date_condition(resource.c.last_updated, resource.c.last_updated, v) for v in c.values))
    table = INDEX_TABLES[c.param.type]

    def matching(cond=None, correlated=False):
        conds = [table.c.param == c.name]
        if cond is not None:
            conds.append(cond)
        if correlated:  # by (rid, param): the row id implies the type
            return exists().where(table.c.rid == resource.c.rid, *conds)
        return resource.c.rid.in_(select(table.c.rid).where(table.c.type == rt, *conds))

    if c.modifier == "missing":
        return not_(matching(correlated=True)) if c.values[0] == "true" else matching(correlated=not drive)
    values = _values(c)
    if c.modifier == "not":
        return not_(matching(values, correlated=True))
    return matching(values, correlated=not drive)


def _values(c: Criterion):
    table = INDEX_TABLES[c.param.type]
    conds = [_value_condition(c, table, v) for v in c.values if v != ""]
    return or_(*conds) if conds else true()  # only empty values ("name=,"): what or_() of nothing did


def _driving_rids(rt: str, c: Criterion):
    """The row ids the index table gives for a single plain criterion, in row id order."""
    table = INDEX_TABLES[c.param.type]
    return select(table.c.rid).distinct().where(table.c.type == rt, table.c.param == c.name, _values(c)) \
        .order_by(table.c.rid)


def _only_driver(q: Query, gate) -> Criterion | None:
    """The query's one criterion when its index rows alone say what matches (no Part 2 gate, no
    :not/:missing, a value to match): such rows exist only for current, undeleted resources of the type."""
    only = q.criteria[0] if len(q.criteria) == 1 else None
    if gate is not None or only is None or only.param is None or only.modifier in ("not", "missing"):
        return None
    return None if all(v == "" for v in only.values) else only


def conditions(q: Query) -> list:
    """The WHERE clause. With a driving criterion the type and liveness checks are left out: index
    rows carry the type and exist only for current, undeleted versions."""
    live = [resource.c.type == q.type, resource.c.deleted.is_(False)]
    if any(all(v == "" for v in c.values) and c.modifier != "missing" for c in q.criteria):
        return [*live, false()]  # an empty value matches nothing
    ranked = sorted(q.criteria, key=lambda c: -1 if c.param is None else
                    SELECTIVITY[c.param.type] + (10 if c.modifier in ("not", "missing") else 0))
    driving = next((c for c in ranked if c.param is not None and c.modifier not in ("not", "missing")), None)
    conds = [_criterion(q.type, c, c is driving) for c in ranked]
    return conds if driving is not None else live + conds


def _sort_key(q: Query, registry: Registry, name: str, desc: bool):
    if name == "_id":
        return resource.c.id
    if name == "_lastUpdated":
        return resource.c.last_updated
    p = registry.get(q.type, name)
    table = INDEX_TABLES[p.type]
    if p.type == "date":
        col = table.c.high if desc else table.c.low
    else:
        col = table.c.code if p.type in ("token", "uri") else table.c.value
    agg = func.max(col) if desc else func.min(col)
    return select(agg).where(table.c.rid == resource.c.rid, table.c.param == name).scalar_subquery()


def order_by(q: Query, registry: Registry) -> list:
    keys = []
    for name, desc in q.sort:
        k = _sort_key(q, registry, name, desc)
        keys.append((k.desc() if desc else k.asc()).nulls_last())
    return keys + [resource.c.rid.asc()]


@dataclass
class SearchResult:
    total: int | None
    matches: list[tuple[str, str, str]]  # (type, id, body)
    included: list[tuple[str, str, str]]
    has_next: bool


def run(conn, q: Query, registry: Registry, visible=None) -> SearchResult:
    """One page of matches (and includes). ``total``: exact for ``_summary=count``, ``_count=0`` and
    ``_total=accurate``; by default exact up to TOTAL_CAP matches and left out above (counting a
    large result costs more than the page); never with ``_total=none``.

    ``visible(table)``: the Part 2 gate's condition (``Tx.visible``), or None. It is part of every
    statement here, so withheld resources count nowhere: not in totals, pages, links or includes."""
    conds = conditions(q)
    gate = visible(resource) if visible is not None else None
    if gate is not None:
        conds = [*conds, gate]
    total = None
    if q.summary == "count" or q.count == 0 or q.total == "accurate":
        total = conn.execute(select(func.count()).select_from(resource).where(*conds)).scalar_one()
    elif q.total == "estimate":
        only = _only_driver(q, gate)
        if only is not None:
            # one criterion: count its index rows alone (they exist only for live resources of the type)
            inner = _driving_rids(q.type, only)
        else:
            inner = select(resource.c.rid).where(*conds).order_by(resource.c.rid)
        capped = inner.limit(TOTAL_CAP + 1).subquery()
        n = conn.execute(select(func.count()).select_from(capped)).scalar_one()
        total = n if n <= TOTAL_CAP else None
    if q.summary == "count":
        return SearchResult(total, [], [], False)
    only = _only_driver(q, gate) if not q.sort else None
    if only is not None:
        # one criterion in row id order: the page is cut from its index rows (a covering index, read
        # only as far as the page), not from every match (which grows with the store)
        page = _driving_rids(q.type, only).limit(q.count + 1).offset(q.offset).subquery()
        stmt = select(resource.c.rid, resource.c.type, resource.c.id, resource.c.body) \
            .where(resource.c.rid.in_(select(page.c.rid))).order_by(resource.c.rid)
    else:
        stmt = select(resource.c.rid, resource.c.type, resource.c.id, resource.c.body).where(*conds) \
            .order_by(*order_by(q, registry)).limit(q.count + 1).offset(q.offset)
    rows = conn.execute(stmt).all()
    has_next = len(rows) > q.count
    rows = rows[:q.count]
    included = _includes(conn, q, rows, visible) if rows and (q.include or q.revinclude) else []
    return SearchResult(total, [(r.type, r.id, r.body) for r in rows], included, has_next)


def _includes(conn, q: Query, rows, visible=None) -> list[tuple[str, str, str]]:
    seen = {(r.type, r.id) for r in rows}
    out: list[tuple[str, str, str]] = []
    rids = [r.rid for r in rows]
    target = resource.alias("target")
    for _src, param, ttype in q.include:
        conds = [search_reference.c.rid.in_(rids), search_reference.c.param == param,
                 target.c.type == search_reference.c.target_type, target.c.id == search_reference.c.target_id,
                 target.c.deleted.is_(False)]
        if ttype:
            conds.append(search_reference.c.target_type == ttype)
        if visible is not None and (cond := visible(target)) is not None:
            conds.append(cond)
        stmt = select(target.c.type, target.c.id, target.c.body).distinct().where(*conds).limit(MAX_INCLUDES)
        out += _new(conn.execute(stmt), seen)
    by_type: dict[str, list[str]] = {}
    for r in rows:
        by_type.setdefault(r.type, []).append(r.id)
    for src, param, ttype in q.revinclude:
        keys = or_(*(and_(search_reference.c.target_type == t, search_reference.c.target_id.in_(ids))
                     for t, ids in by_type.items() if ttype in (None, t)))
        stmt = select(resource.c.type, resource.c.id, resource.c.body).distinct() \
            .where(resource.c.rid == search_reference.c.rid, search_reference.c.type == src,
                   search_reference.c.param == param, keys).limit(MAX_INCLUDES)
        if visible is not None and (cond := visible(resource)) is not None:
            stmt = stmt.where(cond)
        out += _new(conn.execute(stmt), seen)
    return out


def _new(rows, seen: set) -> list[tuple[str, str, str]]:
    out = []
    for r in rows:
        if (r.type, r.id) not in seen:
            seen.add((r.type, r.id))
            out.append((r.type, r.id, r.body))
    return out
