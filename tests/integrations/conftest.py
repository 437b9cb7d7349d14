"""The integrations' tests use the middleware tests' real LocalBilling fixture."""

from ..middleware.conftest import billing

__all__ = ["billing"]
