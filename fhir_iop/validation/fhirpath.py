"""Invariants (``constraint[].expression``): fhirpathpy, each expression compiled once.

The invariants every element or resource carries (``ele-1``, ``ext-1``, ``dom-2``…``dom-6``,
``ref-1``) are evaluated natively: they run millions of times and fhirpathpy evaluates them
either slowly or, for ``dom-3``, not at all (its ``as()`` insists on singletons). fhirpathpy
lacks some FHIR functions: ``hasValue()``, ``getValue()``, ``resolve()`` and ``memberOf()`` are
supplied here; an expression using any other missing one (``conformsTo()``…) is *not evaluated*
and reported as such, never as a failure. ``htmlChecks()`` (``txt-1``/``txt-2``) is the narrative
check in :mod:`fhir_iop.validation.narrative`.

As in the HL7 validator, an expression that yields an empty collection fails.
"""

from __future__ import annotations

import re
import threading
from decimal import Decimal

import orjson
from fhirpathpy import compile as fp_compile
from fhirpathpy.engine.nodes import FP_Type, ResourceNode
from fhirpathpy.models import models

R4_MODEL = models["r4"]
UCUM = "http://unitsofmeasure.org"

_PRIMITIVE_PY = (str, bool, int, float, Decimal, FP_Type)


class NotEvaluable(Exception):
    """The expression needs something this engine does not have."""


# -- native invariants ------------------------------------------------------------------------------

def _ele1(node, env) -> bool:
    if isinstance(node, dict):
        return any(k != "id" and k != "fhir_comments" and v is not None and v != [] and v != {} for k, v in node.items())
    return node is not None


def _ext1(node, env) -> bool:
    if not isinstance(node, dict):
        return True
    has_value = any(k.startswith("value") for k in node)
    return bool(node.get("extension")) != has_value


def _dom2(node, env) -> bool:
    return not any(isinstance(c, dict) and c.get("contained") for c in node.get("contained", ()) or ())


_HTML_LOCAL_REF = re.compile(r"""\b(?:href|src)\s*=\s*["'](#[^"']*)["']""")


def _local_refs(value, out: set[str]) -> None:
    """Every '#…' value in a resource: references, canonicals, uris, and links in narrative."""
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, str):
                if v.startswith("#"):
                    out.add(v)
                elif k == "div" and "#" in v:
                    out.update(_HTML_LOCAL_REF.findall(v))
            else:
                _local_refs(v, out)
    elif isinstance(value, list):
        for v in value:
            if isinstance(v, str):
                if v.startswith("#"):
                    out.add(v)
            else:
                _local_refs(v, out)


def _dom3(node, env) -> bool:
    contained = node.get("contained") or ()
    if not contained:
        return True
    refs: set[str] = set()
    _local_refs(node, refs)
    for c in contained:
        if not isinstance(c, dict) or "id" not in c:
            continue
        if "#" + str(c["id"]) in refs:
            continue
        inner: set[str] = set()
        _local_refs(c, inner)
        if "#" in inner:
            continue
        return False
    return True


def _dom4(node, env) -> bool:
    return not any(isinstance(c, dict) and isinstance(c.get("meta"), dict) and
                   ("versionId" in c["meta"] or "lastUpdated" in c["meta"]) for c in node.get("contained", ()) or ())


def _dom5(node, env) -> bool:
    return not any(isinstance(c, dict) and isinstance(c.get("meta"), dict) and c["meta"].get("security")
                   for c in node.get("contained", ()) or ())


def _dom6(node, env) -> bool:
    text = node.get("text")
    return isinstance(text, dict) and "div" in text


def _ref1(node, env) -> bool:
    ref = node.get("reference") if isinstance(node, dict) else None
    if not isinstance(ref, str) or not ref.startswith("#"):
        return True
    if ref == "#":
        return True  # the containing resource
    root = env.root if isinstance(env.root, dict) else {}
    return any(isinstance(c, dict) and c.get("id") == ref[1:] for c in root.get("contained", ()) or ())


def _true(node, env) -> bool:
    return True


NATIVE = {
    ("ele-1", "hasValue() or (children().count() > id.count())"): _ele1,
    ("ele-1", "hasValue() or (children().count() > id.count()) or $this is Parameters"): _ele1,
    ("ext-1", "extension.exists() != value.exists()"): _ext1,
    ("dom-2", "contained.contained.empty()"): _dom2,
    ("dom-4", "contained.meta.versionId.empty() and contained.meta.lastUpdated.empty()"): _dom4,
    ("dom-5", "contained.meta.security.empty()"): _dom5,
    ("dom-6", "text.`div`.exists()"): _dom6,
    ("ref-1", "reference.startsWith('#').not() or (reference.substring(1).trace('url') in "
              "%rootResource.contained.id.trace('ids'))"): _ref1,
    ("txt-1", "htmlChecks()"): _true,   # checked with the narrative (fhir_iop.validation.narrative)
    ("txt-2", "htmlChecks()"): _true,
}
NATIVE_BY_KEY = {"dom-3": _dom3}  # two R4 variants of the same rule


def _reads(key: str, roots: frozenset[str]) -> bool:
    base = key[1:] if key.startswith("_") else key
    if base in roots:
        return True
    return any(base.startswith(r) and len(base) > len(r) and base[len(r)].isupper() for r in roots)


class Env:
    """What an expression may refer to: ``%resource``, ``%rootResource``, a resolver for references."""

    __slots__ = ("resource", "root", "resolver", "codes")

    def __init__(self, resource: dict, root: dict | None = None, resolver=None, codes=None):
        self.resource, self.root = resource, root if root is not None else resource
        self.resolver, self.codes = resolver, codes


_TOKEN = re.compile(r"'(?:[^'\\]|\\.)*'|`[^`]*`|[%$]?[A-Za-z_][A-Za-z0-9_]*|\S")
_KEYWORDS = frozenset({"and", "or", "xor", "implies", "is", "as", "in", "contains", "div", "mod", "true", "false"})
_UNCACHEABLE = ("resolve(", "memberOf(", "conformsTo(", "now(", "today(", "timeOfDay(", "%", "$this", "trace(")


def root_names(expression: str) -> frozenset[str] | None:
    """The properties of the context node an expression can read, or None if it may read more.

    A property read from the context appears as an identifier not preceded by '.'; a function
    called on the context itself (``children()``, ``exists()``…), a variable, or a function that
    reaches outside the node makes the result depend on more than those properties.
    """
    if any(u in expression.replace("%ucum", "") for u in _UNCACHEABLE):
        return None
    names = set()
    tokens = _TOKEN.findall(expression)
    for i, tok in enumerate(tokens):
        if tok[0] in "'" or not (tok[0].isalpha() or tok[0] in "_`"):
            continue
        if tok in _KEYWORDS or (i > 0 and tokens[i - 1] == "."):
            continue
        if i + 1 < len(tokens) and tokens[i + 1] == "(":
            if tok == "extension":  # extension('url') reads .extension
                names.add(tok)
                continue
            return None  # a function of the context node as a whole
        names.add(tok.strip("`"))
    return frozenset(names)


class Invariants:
    """Evaluates constraints; compiled expressions are kept for the life of the object.

    Results of expressions that read only some properties of their context node are memoised on
    those properties (resources from one source repeat the same labels, codes and periods).
    """

    _CACHE_LIMIT = 200_000

    def __init__(self):
        self._compiled: dict[str, object] = {}
        self._roots: dict[str, frozenset[str] | None] = {}
        self._results: dict[tuple, tuple[bool | None, str | None]] = {}
        self._local = threading.local()
        self._options = {
            "traceFn": lambda *a: None,
            "userInvocationTable": {
                "hasValue": {"fn": self._has_value},
                "getValue": {"fn": lambda coll: [c for c in coll if isinstance(c, _PRIMITIVE_PY)][:1]},
                "resolve": {"fn": self._resolve},
                "memberOf": {"fn": self._member_of, "arity": {1: ["String"]}},
                "htmlChecks": {"fn": lambda coll: [True]},
                "conformsTo": {"fn": self._not_evaluable("conformsTo"), "arity": {1: ["String"]}},
                "hasTemplateIdOf": {"fn": self._not_evaluable("hasTemplateIdOf"), "arity": {1: ["String"]}},
            },
        }

    # user functions
    @staticmethod
    def _has_value(coll):
        return [len(coll) == 1 and isinstance(coll[0], _PRIMITIVE_PY)]

    def _resolve(self, coll):
        env: Env | None = getattr(self._local, "env", None)
        out = []
        for item in coll:
            ref = item.get("reference") if isinstance(item, dict) else item if isinstance(item, str) else None
            if not ref:
                continue
            if ref.startswith("#") and env is not None:
                out += [c for c in env.root.get("contained", ()) or () if isinstance(c, dict) and c.get("id") == ref[1:]]
                if not out:
                    raise NotEvaluable(f"resolve(): '{ref}' is not contained")
            else:
                target = env.resolver(ref) if env is not None and env.resolver is not None else None
                if target is None:  # outside this resource or Bundle: the rule cannot be decided here
                    raise NotEvaluable(f"resolve(): '{ref}' is not available")
                out.append(target)
        return [ResourceNode.create_node(r) for r in out]  # typed, so ofType()/is() see them

    def _member_of(self, coll, url):
        env: Env | None = getattr(self._local, "env", None)
        if env is None or env.codes is None:
            raise NotEvaluable("memberOf() without terminology")
        out = []
        for item in coll:
            codings = []
            if isinstance(item, str):
                codings = [(None, item)]
            elif isinstance(item, dict):
                if "coding" in item:
                    codings = [(c.get("system"), c.get("code")) for c in item["coding"] if isinstance(c, dict)]
                elif "code" in item:
                    codings = [(item.get("system"), item.get("code"))]
            results = [env.codes.member(url, s, c) for s, c in codings if c]
            if any(r is True for r in results):
                out.append(True)
            elif any(r is None for r in results):
                raise NotEvaluable(f"ValueSet {url} cannot be expanded offline")
            else:
                out.append(False)
        return out

    @staticmethod
    def _not_evaluable(name):
        def fn(*args):
            raise NotEvaluable(f"{name}() is not supported")
        return fn

    # evaluation
    def check(self, key: str, expression: str, node, type_path: str, env: Env) -> tuple[bool | None, str | None]:
        """(True, None) holds; (False, None) fails; (None, why) could not be evaluated."""
        native = NATIVE.get((key, expression)) or NATIVE_BY_KEY.get(key)
        if native is not None:
            try:
                return native(node, env), None
            except (AttributeError, TypeError):
                return None, "malformed content"
        key = None
        if isinstance(node, dict):
            roots = self._roots.get(expression, False)
            if roots is False:
                roots = self._roots[expression] = root_names(expression)
            if roots is not None:
                sub = {k: v for k, v in node.items() if _reads(k, roots)}
                try:
                    key = (expression, type_path, orjson.dumps(sub, option=orjson.OPT_SORT_KEYS))
                except TypeError:
                    key = None
                if key is not None:
                    hit = self._results.get(key)
                    if hit is not None:
                        return hit
        result = self._evaluate(expression, node, type_path, env)
        if key is not None and result[0] is not None:
            if len(self._results) >= self._CACHE_LIMIT:
                self._results.clear()
            self._results[key] = result
        return result

    def _evaluate(self, expression: str, node, type_path: str, env: Env) -> tuple[bool | None, str | None]:
        fn = self._compiled.get(expression)
        if fn is None:
            try:
                fn = fp_compile(expression, R4_MODEL, self._options)
            except Exception as e:  # noqa: BLE001 - fhirpathpy raises plain Exceptions for its gaps
                fn = e
            self._compiled[expression] = fn
        if isinstance(fn, Exception):
            return None, f"fhirpathpy cannot parse it ({fn})"
        self._local.env = env
        try:
            result = fn(ResourceNode.create_node(node, type_path),
                        {"resource": env.resource, "rootResource": env.root, "ucum": UCUM})
        except NotEvaluable as e:
            return None, str(e)
        except Exception as e:  # noqa: BLE001
            msg = str(e)
            if msg.startswith("Not implemented"):
                return None, f"fhirpathpy: {msg.lower()}"
            return None, f"fhirpathpy failed ({msg[:120]})"
        finally:
            self._local.env = None
        if not result:
            return False, None
        if len(result) == 1 and isinstance(result[0], bool):
            return result[0], None
        return True, None
