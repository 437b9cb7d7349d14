"""The public surface: names users import, kept sorted and importable."""

from __future__ import annotations

from importlib import resources

import pytest

import billingos_asgi


def test_all_is_sorted_and_importable() -> None:
    assert billingos_asgi.__all__ == sorted(billingos_asgi.__all__)
    for name in billingos_asgi.__all__:
        assert getattr(billingos_asgi, name) is not None


def test_every_public_name_says_what_it_is() -> None:
    for name in billingos_asgi.__all__:
        doc = getattr(billingos_asgi, name).__doc__ or ""
        assert doc.strip() and not doc.startswith(f"{name}("), name  # not a dataclass's generated signature


def test_spec_names_are_exported() -> None:
    for name in ("BillingOS", "LocalBilling", "BillingOSError", "Entitlement", "TrackUsageResult", "UsageMetrics"):
        assert name in billingos_asgi.__all__


def test_backends_satisfy_the_protocol() -> None:
    billing = billingos_asgi.LocalBilling.from_dict({"features": {}, "plans": {"free": {}}})
    client = billingos_asgi.BillingOS("sk_test_x", base_url="http://127.0.0.1:9")
    assert isinstance(billing, billingos_asgi.BillingBackend)
    assert isinstance(client, billingos_asgi.BillingBackend)
    billing._store.close()


@pytest.mark.parametrize(
    "error",
    [
        billingos_asgi.AuthenticationError,
        billingos_asgi.NotFoundError,
        billingos_asgi.ValidationError,
        billingos_asgi.QuotaExceededError,
        billingos_asgi.RateLimitError,
        billingos_asgi.ServerError,
        billingos_asgi.NetworkError,
    ],
)
def test_every_error_of_the_spec_is_a_billingos_error_carrying_status_message_and_body(
    error: type[billingos_asgi.BillingOSError],
) -> None:
    raised = error("refused", status=400, body={"message": "refused"})
    assert isinstance(raised, billingos_asgi.BillingOSError)
    assert (raised.status, raised.message, raised.body) == (400, "refused", {"message": "refused"})


def test_the_package_ships_its_type_information() -> None:
    assert resources.files("billingos_asgi").joinpath("py.typed").is_file()
