"""The embedded billing engine and the local BillingOS API server built on it."""

from .engine import LocalBilling
from .plans import Catalog, PlansError, load_plans, parse_plans

__all__ = ["Catalog", "LocalBilling", "PlansError", "load_plans", "parse_plans"]
