"""fhir-iop's FHIR R4 facade (Flask). Production: ``gunicorn 'server:create_app()'``."""

from server.app import create_app

__all__ = ["create_app"]
