"""``billingos-asgi serve``: run the local BillingOS API server under uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence

from . import __version__
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
        raise argparse.ArgumentTypeError("the secret key must start with 'sk_' and be printable ASCII without spaces")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="billingos-asgi", description="billingos-asgi tools")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the local BillingOS API server")
    serve.add_argument("--plans", required=True, help="plans file (TOML)")
    serve.add_argument("--db", default=":memory:", help="SQLite database file (default: in memory)")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)"
    )
    serve.add_argument("--port", type=_port, default=8787, help="0: any free port (default %(default)s)")
    serve.add_argument(
        "--secret-key",
        type=_secret_key,
        default=os.environ.get("BILLINGOS_SECRET_KEY", DEFAULT_SECRET_KEY),
        help=f"the one key accepted (default: $BILLINGOS_SECRET_KEY, else {DEFAULT_SECRET_KEY}; the environment "
        "keeps a real key out of the process list)",
    )
    serve.add_argument("--rate-limit", type=_rate_limit, metavar="N/min", help="emulate the hosted rate limit")
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
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    app = create_app(billing, secret_key=args.secret_key, rate_limit=args.rate_limit)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
