"""`make demo`: two customers on two plans use an API until one runs out of quota.

Starts the local BillingOS API server (the embedded engine behind a real loopback socket), talks to
it with the same `BillingOS` client an app uses against the hosted service, and prints the usage
table a customer would see. No account, no internet.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import anyio

from billingos_asgi import BillingOS, LocalBilling, QuotaExceededError, UsageMetrics
from billingos_asgi.local.background import serve_in_thread
from billingos_asgi.local.server import DEFAULT_SECRET_KEY, create_app

PLANS = Path(__file__).with_name("plans.toml")
CUSTOMERS = ("user_123", "user_456")  # Free and Pro in plans.toml
BAR_WIDTH = 24


def usage_bar(consumed: float, limit: float | None) -> str:
    if limit is None:
        return "[" + "~" * BAR_WIDTH + "] unlimited"
    filled = BAR_WIDTH if limit == 0 else min(BAR_WIDTH, round(BAR_WIDTH * consumed / limit))
    return "[" + "#" * filled + "." * (BAR_WIDTH - filled) + f"] {round(100 * consumed / limit) if limit else 100:3d}%"


def number(value: float | None) -> str:
    return "unlimited" if value is None else f"{value:g}"


def usage_table(all_metrics: list[UsageMetrics]) -> str:
    header = f"{'customer':<10} {'plan':<6} {'feature':<14} {'used / limit':>20}  {'':<{BAR_WIDTH + 7}}  resets"
    rows = [header, "-" * len(header)]
    for metrics in all_metrics:
        for m in metrics.metrics:
            days = "day" if m.resets_in_days == 1 else "days"
            rows.append(
                f"{metrics.customer_id:<10} {m.product_name:<6} {m.feature_title:<14} "
                f"{number(m.consumed) + ' / ' + number(m.limit):>20}  {usage_bar(m.consumed, m.limit):<{BAR_WIDTH + 7}}"
                f"  in {m.resets_in_days} {days}"
            )
    return "\n".join(rows)


async def drive(client: BillingOS) -> None:
    step = 0
    exhausted: set[str] = set()
    while not exhausted:
        step += 1
        for customer in CUSTOMERS:
            try:
                result = await client.track_usage(customer, "api_calls", 3, idempotency_key=f"demo-{customer}-{step}")
            except QuotaExceededError:
                entitlement = await client.check_entitlement(customer, "api_calls")
                print(
                    f"  {customer}: +3 api_calls refused: quota_exceeded "
                    f"({number(entitlement.usage)}/{number(entitlement.limit)} used, nothing recorded)"
                )
                exhausted.add(customer)
                continue
            usage = result.usage
            print(f"  {customer}: +3 api_calls -> {number(usage.consumed_units)}/{number(usage.limit_units)}")
    # A retried request with the same idempotency key is answered from the first call: no double count.
    replay = await client.track_usage("user_456", "api_calls", 3, idempotency_key="demo-user_456-1")
    now = await client.check_entitlement("user_456", "api_calls")
    print(
        f"  user_456: request demo-user_456-1 sent again -> answered from the first call "
        f"(recorded at {replay.recorded_at:%H:%M:%S}); usage stays {number(now.usage)}"
    )
    for customer, gigabytes in (("user_123", 0.75), ("user_456", 12.5)):
        await client.track_usage(customer, "storage_gb", gigabytes)
    print()
    print(usage_table([await client.get_usage_metrics(customer) for customer in CUSTOMERS]))


def main() -> None:
    with tempfile.TemporaryDirectory() as workdir:
        billing = LocalBilling.from_file(PLANS, Path(workdir) / "billing.db")
        with serve_in_thread(create_app(billing)) as base_url:
            print(f"local BillingOS API on {base_url} (plans: {PLANS.name})\n")

            async def run() -> None:
                async with BillingOS(DEFAULT_SECRET_KEY, base_url=base_url) as client:
                    await drive(client)

            anyio.run(run)


if __name__ == "__main__":
    main()
