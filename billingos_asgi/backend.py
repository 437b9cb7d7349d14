"""The interface the middleware needs from a billing service, hosted or embedded."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from ._models import Entitlement, SessionToken, TrackUsageResult, UsageMetrics


@runtime_checkable
class BillingBackend(Protocol):
    """Implemented by :class:`~billingos_asgi.BillingOS` (hosted) and :class:`~billingos_asgi.LocalBilling`."""

    async def check_entitlement(self, customer_id: str, feature_key: str) -> Entitlement: ...

    async def track_usage(
        self,
        customer_id: str,
        feature_key: str,
        quantity: float,
        idempotency_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> TrackUsageResult: ...

    async def get_usage_metrics(self, customer_id: str, feature_key: str | None = None) -> UsageMetrics: ...

    async def create_session_token(
        self,
        external_user_id: str,
        *,
        external_organization_id: str | None = None,
        expires_in: int = 3600,
        allowed_operations: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> SessionToken: ...

    async def aclose(self) -> None: ...
