"""``billingos-asgi serve``: run the local BillingOS API server under uvicorn."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import socket
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import __version__
from .client import _KEY_LIKE, _MASK
from .local.engine import LocalBilling
from .local.plans import PlansError
from .local.server import DEFAULT_SECRET_KEY, create_app

_RATE = re.compile(r"^\s*(\d+)\s*(?:/\s*min)?\s*$")


def _rate_limit(text: str) -> int:
    match = _RATE.match(text)
    if not match or int(match.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"expected N/min with N >= 1, got {text!r}")
    return int(match.group(1))


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {text!r}")
    return int(text)


def _secret_key(text: str) -> str:
    text = text.strip()
    if not text.startswith("sk_") or not (text.isascii() and text.isprintable()) or " " in text:
        # Where it came from too: the default is $BILLINGOS_SECRET_KEY, which argparse names --secret-key.
        raise argparse.ArgumentTypeError(
            "the secret key (--secret-key, else $BILLINGOS_SECRET_KEY) must start with 'sk_'"
            " and be printable ASCII without spaces"
        )
    return text


def _host(text: str) -> str:
    """A host to listen on, never empty: "" (an unset ``$HOST``) would listen on every interface."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the host is empty (0.0.0.0 listens on every interface, on purpose)")
    return text


def _check_address(host: str, port: int) -> None:
    """Bind ``host:port`` once and let it go (an IPv6 host has a colon, as for uvicorn): a port in use
    or an unknown host raises OSError here, for one line of error rather than uvicorn's start-up and
    shut-down log around it. uvicorn then binds it itself: handed a socket bound here instead, it
    served 1,000 concurrent clients ten times slower (the benchmarks' delivery lag, 1 s to 20 s)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


class _Parser(argparse.ArgumentParser):
    """argparse, its error messages without the secret keys they would quote ("invalid choice:
    'sk_live_...'": CI logs keep them), masked as the client masks them."""

    def error(self, message: str) -> NoReturn:
        super().error(_KEY_LIKE.sub(_MASK, message))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="billingos-asgi", description="billingos-asgi tools")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the local BillingOS API server")
    serve.add_argument("--plans", required=True, help="plans file (TOML)")
    serve.add_argument("--db", default=":memory:", help="SQLite database file (default: in memory)")
    serve.add_argument(
        "--host",
        type=_host,
        default="127.0.0.1",
        help="address to listen on (default %(default)s: this machine only; 0.0.0.0: every interface)",
    )
    serve.add_argument("--port", type=_port, default=8787, help="0: any free port (default %(default)s)")
    serve.add_argument(
        "--secret-key",
        type=_secret_key,
        default=os.environ.get("BILLINGOS_SECRET_KEY") or DEFAULT_SECRET_KEY,
        help=f"the one key accepted (default: $BILLINGOS_SECRET_KEY, else {DEFAULT_SECRET_KEY}; the environment "
        "keeps a real key out of the process list)",
    )
    serve.add_argument(
        "--rate-limit", type=_rate_limit, metavar="N/min", help="emulate the hosted global rate limit (100/min)"
    )
    serve.add_argument(
        "--track-rate-limit",
        type=_rate_limit,
        metavar="N/min",
        help="emulate the hosted per-customer limit on POST /v1/usage/track (1000/min)",
    )
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        print("billingos-asgi serve needs uvicorn: pip install 'billingos-asgi[server]'", file=sys.stderr)
        return 2
    try:
        billing = LocalBilling.from_file(args.plans, args.db)
    except (PlansError, ValueError) as exc:
        print(f"billingos-asgi: {exc}", file=sys.stderr)
        return 2
    try:
        _check_address(args.host, args.port)
    except (OSError, TypeError, UnicodeError) as exc:  # (TypeError: a name IDNA cannot encode)
        billing.close()
        print(
            f"billingos-asgi: cannot listen on {args.host}:{args.port}: {getattr(exc, 'strerror', None) or exc}",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    app = create_app(
        billing, secret_key=args.secret_key, rate_limit=args.rate_limit, track_rate_limit=args.track_rate_limit
    )
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    # Ctrl+C: uvicorn shuts down cleanly, then raises it again (uvicorn.run ignores it, as here).
    with contextlib.suppress(KeyboardInterrupt):
        server.run()  # its banner names the address (the port taken, for --port 0)
    return 0 if server.started else 3  # 3: the app failed to start, as uvicorn.run exits
