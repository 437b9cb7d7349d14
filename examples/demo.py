"""`make demo`: a FastAPI app metered by BillingMiddleware on the embedded billing engine.

Serves `examples/fastapi_app.py` under uvicorn on a loopback port, drives it with scripted
requests from two customers on two plans, prints every answer (200 / 401 / 403 / 429 and the
remaining quota), then the usage table each customer would see. No account, no internet.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.pop("BILLINGOS_SECRET_KEY", None)  # the demo runs on the embedded engine, whatever the shell holds

from billingos_asgi import LocalBilling, UsageMetrics  # noqa: E402
from billingos_asgi.local.background import serve_in_thread  # noqa: E402
from examples.fastapi_app import PLANS, create_app  # noqa: E402

CUSTOMERS = {"user_123": "key_alice", "user_456": "key_bob"}  # Free and Pro in plans.toml
BAR_WIDTH = 24


def usage_bar(consumed: float, limit: float | None) -> str:
    if limit is None:
        return "[" + "~" * BAR_WIDTH + "] unlimited"
    share = 1.0 if limit == 0 else min(1.0, consumed / limit)
    filled = round(BAR_WIDTH * share)
    return "[" + "#" * filled + "." * (BAR_WIDTH - filled) + f"] {round(100 * share):3d}%"


def number(value: float | None) -> str:
    return "unlimited" if value is None else f"{value:g}"


def usage_table(all_metrics: list[UsageMetrics]) -> str:
    header = f"{'customer':<10} {'plan':<6} {'feature':<14} {'used / limit':>20}  {'':<{BAR_WIDTH + 12}} resets"
    rows = [header, "-" * len(header)]
    for metrics in all_metrics:
        for m in metrics.metrics:
            days = "day" if m.resets_in_days == 1 else "days"
            used = f"{number(m.consumed)} / {number(m.limit)}"
            rows.append(
                f"{metrics.customer_id:<10} {m.product_name:<6} {m.feature_title:<14} {used:>20}  "
                f"{usage_bar(m.consumed, m.limit):<{BAR_WIDTH + 12}} in {m.resets_in_days} {days}"
            )
    return "\n".join(rows)


def show(who: str, method: str, path: str, response: httpx.Response) -> None:
    remaining = response.headers.get("ratelimit", "")
    left = remaining.split(";r=")[1].split(";")[0] if ";r=" in remaining else "-"
    detail = ""
    if response.headers.get("content-type", "").startswith("application/problem+json"):
        detail = "  " + response.json()["detail"]
    print(f"  {who:<9} {method:<4} {path:<18} -> {response.status_code}  remaining {left:>6}{detail}")


def drive(base_url: str) -> None:
    with httpx.Client(base_url=base_url) as client:

        def call(customer: str | None, method: str, path: str) -> httpx.Response:
            headers = {"X-API-Key": CUSTOMERS[customer]} if customer else {}
            response = client.request(method, path, headers=headers)
            show(customer or "anonymous", method, path, response)
            return response

        call(None, "GET", "/v1/search")  # 401: who pays?
        call("user_123", "POST", "/v1/export")  # 403: not in the Free plan
        call("user_456", "POST", "/v1/export")  # 200: Pro has it
        while call("user_123", "GET", "/v1/search?q=shoes").status_code != 429:
            call("user_456", "GET", "/v1/search?q=boots")
        call("user_123", "GET", "/health")  # excluded: never metered


def main() -> None:
    with tempfile.TemporaryDirectory() as workdir:
        billing = LocalBilling.from_file(PLANS, Path(workdir) / "billing.db")
        app = create_app(billing)
        with serve_in_thread(app) as base_url:
            print(f"examples/fastapi_app.py under uvicorn on {base_url}, billing: LocalBilling ({PLANS.name})\n")
            drive(base_url)
        # uvicorn has shut down: the middleware drained every usage event in the lifespan.

        async def report() -> None:
            async with billing:
                print("\n" + usage_table([await billing.get_usage_metrics(customer) for customer in CUSTOMERS]))

        anyio.run(report)


if __name__ == "__main__":
    main()
