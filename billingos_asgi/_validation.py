"""Input checks shared by the client, the embedded engine and the local server.

Everything is checked before any network call or write, so a bad argument never reaches the
service and never records anything.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from decimal import ROUND_HALF_UP, Context, Decimal
from typing import Any

from ._exceptions import ValidationError

MAX_ID_LENGTH = 255
#: Upstream stores DECIMAL(20,6): 14 integer digits and 6 decimals, so every quantity is below this
#: (and every float below it fits: the last one, 99999999999999.984375, has 6 decimals).
QUANTITY_BOUND = 10**14
MICRO = 1_000_000  # units are stored as integer micro-units: upstream's DECIMAL(20,6)
QUANTITY_DECIMALS = 6
_HALF_MICRO = 0.5 / MICRO  # the least quantity stored as a micro-unit rather than 0
MAX_METADATA_BYTES = 8192
MIN_SESSION_TTL = 60
MAX_SESSION_TTL = 86400
#: C0 controls and DEL: searched in C, as every id of every call is checked (a batch's key too).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


#: Past any body this library sends or takes (and short of int()'s 4,300 digits).
_TOO_LONG = 10**18


def content_length(value: str) -> int | None:
    """A ``Content-Length`` 's byte count; None for one that is no count (only ASCII digits are:
    "²" is a digit ``int()`` refuses); past :data:`_TOO_LONG`, that (leading zeros do not count)."""
    if not (value.isascii() and value.isdigit()):
        return None
    digits = value.lstrip("0") or "0"
    return int(digits) if len(digits) < 19 else _TOO_LONG


def check_id(name: str, value: object) -> str:
    """Return ``value`` if it is a usable identifier, else raise ValidationError naming ``name``."""
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValidationError(f"{name} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise ValidationError(f"{name} is {len(value)} characters long; the maximum is {MAX_ID_LENGTH}")
    if _CONTROL.search(value):
        raise ValidationError(f"{name} must not contain control characters")
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8 for it, on the wire or on disk
        raise ValidationError(f"{name} is not valid Unicode text (a lone surrogate)") from None
    return value


RESOLUTION = Decimal(1).scaleb(-QUANTITY_DECIMALS)
#: Decimal arithmetic of our own, exact to upstream's maximum at its resolution: not the thread's
#: context, which is the app's (money code setting a precision of 4 recorded 12345.678 units as 12350).
EXACT = Context(prec=40)


def micro_units(value: float) -> tuple[int, bool]:
    """``value`` in integer micro-units as upstream's DECIMAL(20,6) stores it (its shortest decimal, a
    tie rounded up), and whether a remainder finer than a micro-unit was dropped (rounded down).

    Through the float's shortest decimal, not ``value * MICRO``: 14 integer digits times 10**6 is
    beyond a float's 53 bits, and that product could round past a limit the same quantity equals.
    """
    if not isinstance(value, float):
        return value * MICRO, False
    # (float's repr: a subclass's may name its type, numpy's "np.float64(1.5)")
    exact = Decimal(float.__repr__(value)).scaleb(QUANTITY_DECIMALS, EXACT)
    units = int(exact.to_integral_value(ROUND_HALF_UP, EXACT))
    return units, exact > units


def stored_quantity(value: float) -> float:
    """``value`` as upstream stores it (see :func:`micro_units`)."""
    return micro_units(value)[0] / MICRO


def float_of_decimal(value: Decimal) -> float:
    """A Decimal quantity as the float the rest of the path counts in; a signalling NaN (which
    refuses to convert) as NaN, refused with the other values that are not finite."""
    return math.nan if value.is_snan() else float(value)


class NotACustomerId(TypeError):
    """What :func:`customer_answer` raises for an answer that is no string: its message names the
    answer's type only, so it may be logged as it is."""


def customer_answer(answer: object, source: str) -> str | None:
    """What an app's customer function answered: a customer id (by :func:`check_id`'s rules), or None
    for nobody (None or a blank string: an app's "no user" must never let a request through
    ungated); anything else raises (TypeError, or ValidationError naming the fault)."""
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        return None
    if not isinstance(answer, str):
        # Its type only: what an auth function answers (credentials, a user) may hold a secret.
        kind = type(answer).__qualname__
        raise NotACustomerId(f"{source} returned an object of type {kind}, not a customer id (a string) or None")
    return check_id("customer_id", answer)


def check_quantity(value: object, *, finer_ok: bool = False) -> float:
    """Return ``value`` as a float if it is a finite quantity > 0 within upstream's precision
    (``finer_ok``: or below it, a part of a sum that will be)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        raise ValidationError(f"quantity must be a number, got {type(value).__name__}")
    try:
        quantity = float(value)
    except OverflowError:  # an int too large for a float
        raise ValidationError(f"quantity is too large: upstream holds quantities below {QUANTITY_BOUND}") from None
    except ValueError:  # Decimal("sNaN"): a signalling NaN refuses to become a float
        raise ValidationError(f"quantity must be a finite number, got {value!r}") from None
    if not math.isfinite(quantity):
        raise ValidationError(f"quantity must be a finite number, got {value!r}")
    if quantity <= 0:
        raise ValidationError(f"quantity must be greater than 0, got {value!r}")
    if quantity >= QUANTITY_BOUND:
        raise ValidationError(f"quantity {value!r} is too large: upstream holds quantities below {QUANTITY_BOUND}")
    if not finer_ok and quantity < _HALF_MICRO:  # stored as 0 (a DECIMAL(20,6) column rounds half up)
        raise ValidationError(f"quantity {value!r} is below the resolution of {1 / MICRO:g} units")
    return quantity


def check_metadata(value: object, name: str = "metadata") -> dict[str, Any] | None:
    """Return ``value`` if it is None or a small JSON object, else raise ValidationError."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValidationError(f"{name} must be an object, got {type(value).__name__}")
    value = dict(value)  # json.dumps takes dicts only: a read-only or custom Mapping is an object too
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValidationError(f"{name} must be JSON-serialisable: {exc}") from None
    try:
        encoded = text.encode()  # UTF-8, as httpx sends it; ensure_ascii=True would hide a lone surrogate
    except UnicodeEncodeError:
        raise ValidationError(f"{name} is not valid Unicode text (a lone surrogate)") from None
    if len(encoded) > MAX_METADATA_BYTES:
        raise ValidationError(f"{name} is {len(encoded)} bytes as JSON; the maximum is {MAX_METADATA_BYTES}")
    return value


def check_expires_in(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"expiresIn must be an integer number of seconds, got {type(value).__name__}")
    if not MIN_SESSION_TTL <= value <= MAX_SESSION_TTL:
        raise ValidationError(f"expiresIn must be between {MIN_SESSION_TTL} and {MAX_SESSION_TTL} seconds, got {value}")
    return value


def check_operations(value: object) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValidationError("allowedOperations must be a list of strings")
    return [check_id("allowedOperations[]", item) for item in value]
