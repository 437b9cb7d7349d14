"""The plans file (SPEC section 3): features, plans and initial customer assignments.

Parsed once and refused as a whole when anything is wrong, with a message naming the file, the
key and the fault, so that a typo never becomes a silently free (or silently blocked) feature.
"""

from __future__ import annotations

import math
import os
import select
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._validation import MICRO, QUANTITY_BOUND, check_id, micro_units

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FEATURE_TYPES = ("boolean_flag", "usage_quota", "numeric_limit")
INTERVALS = ("day", "week", "month", "year")
UNLIMITED = "unlimited"


class PlansError(ValueError):
    """The plans file or dict is invalid; the message names where and what."""


@dataclass(frozen=True, slots=True)
class Feature:
    key: str
    title: str
    type: str


@dataclass(frozen=True, slots=True)
class Grant:
    """A plan's grant of one feature; ``limit`` is in micro-units, None meaning unlimited (or a flag)."""

    feature: Feature
    limit: int | None


@dataclass(frozen=True, slots=True)
class Plan:
    key: str
    name: str
    interval: str
    grants: Mapping[str, Grant]


@dataclass(frozen=True, slots=True)
class Catalog:
    features: Mapping[str, Feature]
    plans: Mapping[str, Plan]
    customers: Mapping[str, str] = field(default_factory=dict)


#: A plans file larger than this is refused (a device read would never end).
MAX_PLANS_BYTES = 64 * 2**20
#: Seconds a plans file that is a pipe is waited on for its first bytes.
PIPE_WAIT = 5.0


def load_plans(path: str | Path) -> Catalog:
    """Read and validate a TOML plans file."""
    source = str(path)
    try:
        # A byte-order mark (Notepad's "UTF-8 with BOM") is not content: tomllib would refuse it
        # as an "invalid statement" at line 1 of a file that looks right.
        data = tomllib.loads(_read(path).decode("utf-8-sig"))
    except OSError as exc:
        # A relative path is the working directory's, which a server started elsewhere does not share.
        relative = not Path(path).is_absolute()
        where = f" ({Path(path).absolute()}: relative to the working directory)" if relative else ""
        raise PlansError(f"{source}: cannot read the plans file: {exc.strerror or exc}{where}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PlansError(f"{source}: not valid TOML: {exc}") from None
    except RecursionError:  # (tomllib recurses into nested arrays and tables)
        raise PlansError(f"{source}: not valid TOML: nested too deeply") from None
    except ValueError as exc:  # an integer of more digits than Python converts (4,300)
        raise PlansError(f"{source}: not valid TOML: {exc}") from None
    return parse_plans(data, source=source)


def _read(path: str | Path) -> bytes:
    """The file's bytes. A pipe (``--plans <(envsubst < plans.tmpl)``) is read to its writer's end,
    waited on for :data:`PIPE_WAIT` seconds at most (opened for ever, one no one writes to would block
    start-up); a device that never ends (``/dev/zero``) is cut off at :data:`MAX_PLANS_BYTES`."""
    no_wait = getattr(os, "O_NONBLOCK", 0)
    descriptor = os.open(path, os.O_RDONLY | no_wait)
    try:
        file = os.fdopen(descriptor, "rb")
    except OSError:  # a directory: the descriptor is not the file object's yet
        os.close(descriptor)
        raise
    with file:
        if no_wait:
            if stat.S_ISFIFO(os.fstat(descriptor).st_mode) and not select.select([descriptor], [], [], PIPE_WAIT)[0]:
                raise OSError(0, f"nothing came through the pipe in {PIPE_WAIT:g} s")
            os.set_blocking(descriptor, True)  # (the open only: a writer's bytes are waited for)
        data = file.read(MAX_PLANS_BYTES + 1)
    if len(data) > MAX_PLANS_BYTES:
        raise OSError(0, f"larger than {MAX_PLANS_BYTES // 2**20} MiB")
    return data


def parse_plans(data: Mapping[str, Any], *, source: str = "<plans>") -> Catalog:
    """Validate a plans mapping (the TOML file's structure)."""

    def fail(key: str, fault: str) -> PlansError:
        return PlansError(f"{source}: {key}: {fault}")

    def table(value: Any, key: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise fail(key, f"must be a table, got {type(value).__name__}")
        return value

    def name(value: Any, key: str) -> str:
        try:
            return check_id("key", value)
        except ValueError as exc:
            raise fail(key, str(exc).replace("key ", "name ", 1)) from None

    root = table(data, "(top level)")
    unknown = set(root) - {"features", "plans", "customers"}
    if unknown:
        raise fail(min(map(_key_text, unknown)), "unknown top-level key (expected features, plans, customers)")

    features: dict[str, Feature] = {}
    for key, spec in table(root.get("features", {}), "features").items():
        where = f"features.{name(key, f'features.{_shown(key)}')}"
        spec = table(spec, where)
        extra = set(spec) - {"title", "type"}
        if extra:
            raise fail(f"{where}.{min(map(_key_text, extra))}", "unknown key (expected title, type)")
        kind = spec.get("type")
        if kind not in FEATURE_TYPES:
            raise fail(f"{where}.type", f"must be one of {', '.join(FEATURE_TYPES)}, got {_shown(kind)}")
        title = spec.get("title", key)
        if not isinstance(title, str):
            raise fail(f"{where}.title", "must be a string")
        features[key] = Feature(key=key, title=title, type=kind)

    plans: dict[str, Plan] = {}
    for key, spec in table(root.get("plans", {}), "plans").items():
        where = f"plans.{name(key, f'plans.{_shown(key)}')}"
        spec = table(spec, where)
        extra = set(spec) - {"name", "interval", "features"}
        if extra:
            raise fail(f"{where}.{min(map(_key_text, extra))}", "unknown key (expected name, interval, features)")
        plan_name = spec.get("name", key)
        if not isinstance(plan_name, str):
            raise fail(f"{where}.name", "must be a string")
        interval = spec.get("interval", "month")
        if interval not in INTERVALS:
            raise fail(f"{where}.interval", f"must be one of {', '.join(INTERVALS)}, got {_shown(interval)}")
        grants: dict[str, Grant] = {}
        for feature_key, value in table(spec.get("features", {}), f"{where}.features").items():
            grant_where = f"{where}.features.{feature_key}"
            feature = features.get(feature_key)
            if feature is None:
                raise fail(grant_where, "unknown feature (declare it under [features])")
            grant = _grant(feature, value, lambda fault, w=grant_where: fail(w, fault))
            if grant is not None:
                grants[feature_key] = grant
        plans[key] = Plan(key=key, name=plan_name, interval=interval, grants=grants)

    customers: dict[str, str] = {}
    for key, plan_key in table(root.get("customers", {}), "customers").items():
        where = f"customers.{name(key, f'customers.{_shown(key)}')}"
        if not isinstance(plan_key, str) or plan_key not in plans:
            raise fail(where, f"unknown plan {_shown(plan_key)}")
        customers[key] = plan_key
    if not plans:  # an empty or truncated file: every customer would be unknown or planless
        raise fail("plans", "no plan is defined (add a [plans.<key>] table)")
    return Catalog(features=features, plans=plans, customers=customers)


def _grant(feature: Feature, value: Any, fail: Any) -> Grant | None:
    """A grant from a plan's feature value, None for a flag granted as ``false``."""
    if feature.type == "boolean_flag":
        if not isinstance(value, bool):
            raise fail(f"boolean_flag takes true or false, got {_shown(value)}")
        return Grant(feature, None) if value else None
    if value == UNLIMITED:
        return Grant(feature, None)
    not_finite = isinstance(value, float) and not math.isfinite(value)  # (an int of any size is finite)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not_finite:
        raise fail(f"{feature.type} takes a number or {UNLIMITED!r}, got {_shown(value)}")
    if not 0 <= value < QUANTITY_BOUND:
        raise fail(f"limit must be >= 0 and below {QUANTITY_BOUND}, got {_shown(value)}")
    if value and not to_micro(value):  # would be 0: a typo must not silently block the feature
        raise fail(f"limit {_shown(value)} is below the resolution of {1 / MICRO:g} units")
    return Grant(feature, to_micro(value))


def _shown(value: object) -> str:
    """``value`` for a message: short, even for an integer of thousands of digits (whose repr raises)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length() * 3 // 10} digits or so"
    try:
        text = repr(value)
    except ValueError:  # an integer of more digits than Python converts, inside a list or table
        return f"a {type(value).__name__} holding an integer too long to show"
    return text if len(text) <= 80 else f"{text[:77]}..."


def _key_text(key: object) -> str:
    """A key for a message: a string as it is, anything else (a dict's key may be any) as :func:`_shown`."""
    return key if isinstance(key, str) else _shown(key)


def to_micro(value: float) -> int:
    """Units to integer micro-units (upstream's DECIMAL(20,6)), so sums never drift."""
    return micro_units(value)[0]


def from_micro(value: int) -> float:
    return value / MICRO
