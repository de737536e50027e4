"""The :class:`~fhir_iop.security.access.Access` of the current request.

The authorization layer (``server/auth.py``) sets ``g.access`` before each request; with
authorization off (``INSECURE_NO_AUTH``, development only) every request acts as the program itself.
"""

from __future__ import annotations

from flask import current_app, g

from fhir_iop.security.access import DEVELOPMENT, Access


def current_access() -> Access:
    access = g._get_current_object().get("access")  # (one context lookup)
    if access is not None:
        return access
    if current_app.config.get("INSECURE_NO_AUTH"):
        return DEVELOPMENT
    raise RuntimeError("no access context: the authorization layer did not run for this request")
