"""PHI-free logs: what the application and the HTTP libraries log is scrubbed as each record is made.

* Query strings are cut from the string arguments of werkzeug's request log line (``"GET
  /Patient?name=… HTTP/1.1" 200``), of gunicorn's access log (its ``%(r)s``, ``%(q)s``, ``%(U)s``…
  atoms) and of urllib3's request lines: search parameters such as
  ``name=``, ``birthdate=`` or ``identifier=`` are PHI. The path stays (ids are not PHI here).
* A logged exception keeps its type and stack frames (file, line, function, source line) but not
  its message, which may quote a value (a name in a record that failed to parse).

:func:`install` sets a log record factory (once per process), so every logger below the scrubbed
names is covered whatever handlers the deployment configures. ``server.create_app`` and the
``fhir-iop`` command call it. Messages themselves must still hold only ids and counts: the log scan
in ``tests/test_log_phi.py`` checks everything the test run logged for the example clinic's names,
birth dates and MRNs.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping

#: the loggers whose records are scrubbed (and their children: ``fhir_iop.bulk``, ``server.app``...)
SCRUBBED = ("fhir_iop", "server", "werkzeug", "gunicorn", "urllib3", "requests", "flask")
#: the loggers whose string arguments carry URLs (their query strings are cut)
URL_LOGGERS = ("werkzeug", "gunicorn", "urllib3", "requests")
WITHHELD = "[query withheld]"


def strip_query(s: str) -> str:
    """``GET /Patient?name=x HTTP/1.1`` → ``GET /Patient?[query withheld] HTTP/1.1``."""
    if "?" not in s:
        return s
    out = []
    for word in s.split(" "):
        if "?" in word:
            head, _, tail = word.partition("?")
            word = head + "?" + WITHHELD + ('"' if tail.endswith('"') else "")
        out.append(word)
    return " ".join(out)


def scrub(record: logging.LogRecord) -> logging.LogRecord:
    top = record.name.split(".", 1)[0]
    if top in URL_LOGGERS:
        if isinstance(record.args, tuple):
            record.args = tuple(strip_query(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, Mapping):  # gunicorn's access log: atoms by name (q: the query string)
            record.args = {k: (WITHHELD if k == "q" and v not in ("", "-") else
                               strip_query(v) if isinstance(v, str) else v) for k, v in record.args.items()}
        if isinstance(record.msg, str) and not record.args:
            record.msg = strip_query(record.msg)
    if record.exc_info and record.exc_info[0] is not None:
        etype, _, tb = record.exc_info
        frames = "".join(traceback.format_list(traceback.extract_tb(tb)))
        record.msg = (f"{record.getMessage()}\nTraceback (most recent call last; the exception's message is "
                      f"withheld: it may quote PHI):\n{frames}{etype.__module__}.{etype.__qualname__}")
        record.args = None
        record.exc_info = None
        record.exc_text = None
    return record


class PhiSafeLogFilter(logging.Filter):
    """The same scrubbing as a filter, for a handler a deployment configures itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        scrub(record)
        return True


def install() -> None:
    """Scrub every record of the :data:`SCRUBBED` loggers as it is made (idempotent)."""
    base = logging.getLogRecordFactory()
    if getattr(base, "fhir_iop_scrub", False):
        return

    def factory(*args, **kwargs):
        rec = base(*args, **kwargs)
        if rec.name.split(".", 1)[0] in SCRUBBED:
            scrub(rec)
        return rec

    factory.fhir_iop_scrub = True
    logging.setLogRecordFactory(factory)
