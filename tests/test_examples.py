"""The examples run as a user runs them."""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from billingos_asgi import BillingOS, LocalBilling
from billingos_asgi.local.background import serve_in_thread
from billingos_asgi.local.server import create_app as create_server

from .asgi import serve
from .conftest import SECRET_KEY

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("shell_key", [None, "not a key"])  # whatever the shell holds: the embedded engine
def test_make_demo_meters_two_customers_until_one_runs_out(shell_key: str | None) -> None:
    env = {name: value for name, value in os.environ.items() if name != "BILLINGOS_SECRET_KEY"}
    if shell_key is not None:
        env["BILLINGOS_SECRET_KEY"] = shell_key
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    answers = [line for line in lines if "->" in line]
    assert "-> 401" in answers[0] and "-> 403" in answers[1] and "-> 200" in answers[2]
    searches = [line for line in answers if "user_123  GET  /v1/search" in line]
    assert [line.split("-> ")[1][:3] for line in searches] == ["200"] * 10 + ["429"]
    table = {line.split()[0] + " " + line.split()[2]: line for line in lines if line.startswith("user_")}
    assert "10 / 10" in table["user_123 API"] and "10 / 100000" in table["user_456 API"]


async def test_starlette_example_meters_each_route_by_its_declaration(tmp_path: Path) -> None:
    from examples.starlette_routes import PLANS, create_app

    async with LocalBilling.from_file(PLANS, tmp_path / "billing.db") as billing:
        app = create_app(billing)
        alice, bob = {"cookie": "session=session-alice"}, {"cookie": "session=session-bob"}
        async with serve(app) as client:
            searches = [(await client.get("/v1/search?q=x", headers=alice)).status_code for _ in range(11)]
            forbidden = await client.post("/v1/export", headers=alice)
            exported = await client.post("/v1/export", headers=bob)
            stored = await client.post("/v1/files", headers=bob, content=b"x" * 2_000_000)
            chunked = await client.post("/v1/files", headers=bob, content=chunks(10, b"x" * 100_000))  # no length
            anonymous = await client.get("/v1/search")
            usage = await client.get("/billing/usage", headers=alice)
        assert searches == [200] * 10 + [429]
        assert (forbidden.status_code, exported.status_code, stored.status_code) == (403, 200, 201)
        assert chunked.request.headers.get("transfer-encoding") == "chunked" and chunked.json() == {"stored": 1_000_000}
        assert anonymous.status_code == 401 and usage.json()["customer_id"] == "user_123"
        assert await billing.recorded_units("user_123", "api_calls") == 10
        assert await billing.recorded_units("user_456", "storage_gb") == 0.003


async def chunks(count: int, chunk: bytes) -> AsyncIterator[bytes]:
    """A streamed request body: httpx sends it chunked, with no Content-Length."""
    for _ in range(count):
        yield chunk


async def test_llm_example_bills_the_tokens_it_streamed(tmp_path: Path) -> None:
    from examples.llm_streaming import PLANS, create_app

    async with LocalBilling.from_file(PLANS, tmp_path / "billing.db") as billing:
        app = create_app(billing)
        async with serve(app) as client:
            answers = []
            for _ in range(4):
                response = await client.post("/v1/chat?prompt=cats", headers={"X-API-Key": "key_alice"})
                answers.append((response.status_code, len(response.text.split()) if response.status_code == 200 else 0))
                await anyio.sleep(1.2)  # one flush window each: usage is confirmed between calls
            team = await client.post("/v1/chat?prompt=dogs", headers={"X-API-Key": "key_bob"})
        # 9 tokens an answer on a quota of 25: the third starts with 7 left and overshoots (the 7 are
        # recorded, the 2 beyond the limit reported as rejected); the fourth finds the quota used up.
        assert answers == [(200, 9), (200, 9), (200, 9), (429, 0)]
        assert team.status_code == 200
        assert await billing.recorded_units("alice", "tokens") == 25
        assert await billing.recorded_units("bob", "tokens") == 9


async def test_api_key_example_maps_keys_to_customers(tmp_path: Path) -> None:
    from examples.api_key_app import PLANS, create_app

    async with LocalBilling.from_file(PLANS, tmp_path / "billing.db") as billing:
        app = create_app(billing)
        alice, bob = {"authorization": "Bearer key_alice"}, {"authorization": "Bearer key_bob"}
        async with serve(app) as client:
            searches = [(await client.get("/v1/search?q=x", headers=alice)).status_code for _ in range(11)]
            forbidden = await client.post("/v1/export", headers=alice)
            exported = await client.post("/v1/export", headers=bob)
            unknown = await client.get("/v1/search", headers={"authorization": "Bearer key_mallory"})
            raw_key = await client.get("/v1/search", headers={"authorization": "key_alice"})  # not a bearer token
            anonymous = await client.get("/v1/search")
            health = await client.get("/health")
        assert searches == [200] * 10 + [429]
        assert (forbidden.status_code, exported.status_code) == (403, 200)
        assert (unknown.status_code, raw_key.status_code, anonymous.status_code, health.status_code) == (
            401,
            401,
            401,
            200,
        )
        assert await billing.recorded_units("user_123", "api_calls") == 10
        assert await billing.recorded_units("user_456", "api_calls") == 0  # the export route is a flag, not counted


async def assert_bills_the_account_its_auth_signed_in(client: Any) -> None:
    """The Litestar and Quart examples' scenario, through ``client`` (httpx's or the framework's own),
    inside the app's lifespan: leaving it drains the usage, for the caller to read back."""
    alice, bob = {"authorization": "Bearer token-alice"}, {"authorization": "Bearer token-bob"}
    searches = [(await client.get("/v1/search?q=x", headers=alice)).status_code for _ in range(11)]
    forbidden = await client.post("/v1/export", headers=alice)
    exported = await client.post("/v1/export", headers=bob)
    searched = await client.get("/v1/search", headers=bob)
    anonymous = await client.get("/v1/search")
    health = await client.get("/health")
    assert searches == [200] * 10 + [429]
    assert (forbidden.status_code, exported.status_code, searched.status_code) == (403, 201, 200)
    assert (anonymous.status_code, health.status_code) == (401, 200)


async def test_litestar_example_bills_the_account_its_auth_signed_in(tmp_path: Path) -> None:
    pytest.importorskip("litestar")
    from examples.litestar_app import PLANS, create_app

    async with LocalBilling.from_file(PLANS, tmp_path / "billing.db") as billing:
        async with serve(create_app(billing)) as client:
            await assert_bills_the_account_its_auth_signed_in(client)
        assert await billing.recorded_units("user_123", "api_calls") == 10
        assert await billing.recorded_units("user_456", "api_calls") == 1


async def test_quart_example_bills_the_account_its_auth_signed_in(tmp_path: Path) -> None:
    pytest.importorskip("quart")
    from examples.quart_app import PLANS, create_app

    async with LocalBilling.from_file(PLANS, tmp_path / "billing.db") as billing:
        async with create_app(billing).test_app() as test_app:  # Quart's own test client, inside the lifespan
            await assert_bills_the_account_its_auth_signed_in(test_app.test_client())
        assert await billing.recorded_units("user_123", "api_calls") == 10
        assert await billing.recorded_units("user_456", "api_calls") == 1


@pytest.mark.parametrize(
    ("example", "method", "path", "headers", "customer", "feature", "units"),
    [
        ("fastapi_app", "GET", "/v1/search", {"x-api-key": "key_alice"}, "user_123", "api_calls", 1),
        ("api_key_app", "GET", "/v1/search", {"authorization": "Bearer key_alice"}, "user_123", "api_calls", 1),
        ("starlette_routes", "GET", "/v1/search", {"cookie": "session=session-alice"}, "user_123", "api_calls", 1),
        ("litestar_app", "GET", "/v1/search", {"authorization": "Bearer token-alice"}, "user_123", "api_calls", 1),
        ("quart_app", "GET", "/v1/search", {"authorization": "Bearer token-alice"}, "user_123", "api_calls", 1),
        ("llm_streaming", "POST", "/v1/chat?prompt=cats", {"x-api-key": "key_alice"}, "alice", "tokens", 9),
    ],
)
async def test_each_example_bills_the_hosted_api_when_a_secret_key_is_set(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    example: str,
    method: str,
    path: str,
    headers: dict[str, str],
    customer: str,
    feature: str,
    units: int,
) -> None:
    """``default_billing()`` with BILLINGOS_SECRET_KEY: the HTTP client, at BILLINGOS_API_URL (the local API here)."""
    if example in ("litestar_app", "quart_app"):
        pytest.importorskip(example.removesuffix("_app"))
    module = importlib.import_module(f"examples.{example}")
    async with LocalBilling.from_file(module.PLANS, tmp_path / "hosted.db") as hosted:
        with serve_in_thread(create_server(hosted, secret_key=SECRET_KEY)) as base_url:
            monkeypatch.setenv("BILLINGOS_SECRET_KEY", SECRET_KEY)
            monkeypatch.setenv("BILLINGOS_API_URL", base_url)
            billing = module.default_billing()
            assert isinstance(billing, BillingOS) and billing.base_url == base_url
            async with billing, serve(module.create_app(billing)) as client:
                response = await client.request(method, path, headers=headers)
            assert response.status_code == 200, response.text
            assert await hosted.recorded_units(customer, feature) == units


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("billed", ["embedded", "hosted"])
async def test_django_example_bills_the_signed_in_user_under_uvicorn(tmp_path: Path, billed: str) -> None:
    """Run as its docstring says: `migrate`, then uvicorn; SIGTERM drains the usage into the billing file,
    or, with BILLINGOS_SECRET_KEY set, into the hosted API (the local one here, on that file)."""
    pytest.importorskip("django")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DJANGO_DB": str(tmp_path / "django.sqlite3")}
    for name in ("BILLINGOS_SECRET_KEY", "BILLINGOS_API_URL", "BILLING_DB"):
        env.pop(name, None)
    plans = ROOT / "examples" / "plans.toml"
    if billed == "hosted":  # the app's own engine, if it took one, would bill memory: the file stays empty
        async with LocalBilling.from_file(plans, tmp_path / "billing.db") as hosted:
            with serve_in_thread(create_server(hosted, secret_key=SECRET_KEY)) as api_url:
                await run_django_example({**env, "BILLINGOS_SECRET_KEY": SECRET_KEY, "BILLINGOS_API_URL": api_url})
    else:
        await run_django_example({**env, "BILLING_DB": str(tmp_path / "billing.db")})
    async with LocalBilling.from_file(plans, tmp_path / "billing.db") as billing:
        assert await billing.recorded_units("user_123", "api_calls") == 10
        assert await billing.recorded_units("user_456", "api_calls") == 1


async def run_django_example(env: dict[str, str]) -> None:
    """`migrate`, then uvicorn until SIGTERM, driven as alice and bob; the usage is drained on return."""
    await anyio.run_process([sys.executable, "examples/django_app.py", "migrate"], cwd=ROOT, env=env)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "examples.django_app:app",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    server = await anyio.open_process(command, cwd=ROOT, env=env, stdout=None, stderr=None)
    try:
        base_url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base_url) as alice, httpx.AsyncClient(base_url=base_url) as bob:
            with anyio.fail_after(30):
                while True:
                    try:
                        await alice.get("/health")
                        break
                    except httpx.TransportError:
                        await anyio.sleep(0.05)
            anonymous = await alice.get("/v1/search")
            wrong = await alice.post("/login", data={"username": "alice", "password": "guess"})
            for client, name in ((alice, "alice"), (bob, "bob")):
                signed_in = await client.post("/login", data={"username": name, "password": f"{name}-password"})
                assert signed_in.status_code == 200, signed_in.text
            searches = [(await alice.get("/v1/search?q=x")).status_code for _ in range(11)]
            alice.cookies.set("csrftoken", "t" * 32)  # past Django's CSRF check, to the view's own methods
            posted = await alice.post("/v1/search?q=x", headers={"x-csrftoken": "t" * 32})  # not metered
            forbidden = await alice.get("/v1/export")
            exported = await bob.get("/v1/export")
            searched = await bob.get("/v1/search")
    finally:
        server.terminate()  # SIGTERM: uvicorn runs the lifespan's shutdown, which drains the usage queue
        with anyio.fail_after(30):
            await server.wait()
    assert server.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
    assert anonymous.status_code == 401 and anonymous.headers["content-type"] == "application/problem+json"
    assert wrong.status_code == 401
    assert searches == [200] * 10 + [429]
    assert posted.status_code == 405  # the route key meters GET: the view answers nothing else
    assert (forbidden.status_code, exported.status_code, searched.status_code) == (403, 200, 200)
