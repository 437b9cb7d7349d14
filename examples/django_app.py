"""A Django API metered by BillingMiddleware, the customer named by Django's own auth (`request.user`).

One file: settings, views and URLs (and, run as a script, its own manage.py). Django's session
auth runs inside Django, so BillingMiddleware has no `customer=` resolver:
`IdentifyCustomerMiddleware`, after `AuthenticationMiddleware`, names the signed-in user's customer
and gates the request before the view; BillingMiddleware answers the ASGI lifespan Django refuses,
so the usage tracker starts and drains with the server.

Run it:  python examples/django_app.py migrate    # Django's tables, and the users alice and bob
         uvicorn examples.django_app:app --port 8000
         curl -c jar -d username=alice -d password=alice-password localhost:8000/login
         curl -b jar "localhost:8000/v1/search?q=cats"
Billing: the embedded engine with `plans.toml` beside this file, or the hosted BillingOS API when
BILLINGOS_SECRET_KEY is set. Django's own database: the SQLite file DJANGO_DB (default: in /tmp).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import django
from django.conf import settings

PLANS = Path(__file__).with_name("plans.toml")
USERS = {"alice": "user_123", "bob": "user_456"}  # username -> BillingOS customer (a user field in a real app)

settings.configure(
    SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY", "django-insecure-example-only"),
    ALLOWED_HOSTS=["localhost", "127.0.0.1"],
    ROOT_URLCONF=__name__,
    INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes", "django.contrib.sessions"],
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get("DJANGO_DB", str(Path(tempfile.gettempdir()) / "billingos_django_example.sqlite3")),
        }
    },
    MIDDLEWARE=[
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "billingos_django.IdentifyCustomerMiddleware",  # after the auth it reads
    ],
    BILLINGOS_CUSTOMER=f"{__name__}.customer_of",
)
django.setup()

# Django is set up: the rest may import models and views.
from django.apps import apps  # noqa: E402
from django.contrib.auth import aauthenticate, alogin  # noqa: E402
from django.contrib.auth.models import User  # noqa: E402
from django.core.asgi import get_asgi_application  # noqa: E402
from django.core.management import execute_from_command_line  # noqa: E402
from django.db.models.signals import post_migrate  # noqa: E402
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402
from django.views.decorators.http import require_POST, require_safe  # noqa: E402

from billingos_asgi import BillingBackend, BillingMiddleware, BillingOS, LocalBilling  # noqa: E402
from billingos_django import metered  # noqa: E402


async def customer_of(request: HttpRequest) -> str | None:
    """`BILLINGOS_CUSTOMER`: the signed-in user's BillingOS customer (None: anonymous, 401)."""
    user = await request.auser()
    return USERS.get(user.get_username()) if user.is_authenticated else None


@csrf_exempt  # scripts sign in here; a browser app would use Django's LoginView and its CSRF token
@require_POST
async def login(request: HttpRequest) -> JsonResponse:
    user = await aauthenticate(request, username=request.POST.get("username"), password=request.POST.get("password"))
    if user is None:
        return JsonResponse({"error": "wrong username or password"}, status=401)
    await alogin(request, user)
    return JsonResponse({"signed_in": user.get_username()})


async def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


# A route key with a method ("GET /v1/search") meters only that method (and HEAD beside GET), while
# a Django view answers every method unless told otherwise: require_safe (GET and HEAD) keeps a POST
# from running the view unbilled, and @metered makes a view the middleware did not meter fail closed.
@require_safe
@metered("api_calls")
async def search(request: HttpRequest) -> JsonResponse:
    q = request.GET.get("q", "")
    return JsonResponse({"query": q, "results": [f"result for {q!r}"]})


@require_safe
@metered("export")
async def export(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"export": "started"})


urlpatterns = [
    path("login", login),
    path("health", health),
    path("v1/search", search),
    path("v1/export", export),
]


def create_demo_users(**kwargs: Any) -> None:
    """After `migrate`: the example's users, password `<name>-password`."""
    for name in USERS:
        if not User.objects.filter(username=name).exists():
            User.objects.create_user(name, password=f"{name}-password")


post_migrate.connect(create_demo_users, sender=apps.get_app_config("auth"))


def default_billing() -> BillingBackend:
    if os.environ.get("BILLINGOS_SECRET_KEY"):
        return BillingOS()
    return LocalBilling.from_file(PLANS, os.environ.get("BILLING_DB", ":memory:"))


def create_app(billing: BillingBackend) -> BillingMiddleware:
    return BillingMiddleware(
        get_asgi_application(),
        billing=billing,
        customer=None,
        routes={"GET /v1/search": "api_calls", "GET /v1/export": "export"},
    )


if __name__ == "__main__":  # this file is its own manage.py
    execute_from_command_line(sys.argv)
else:
    app = create_app(default_billing())
