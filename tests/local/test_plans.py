"""The plans file (SPEC section 3): valid files load exactly, invalid ones are refused naming file, key and fault."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from billingos_asgi import LocalBilling
from billingos_asgi.local import PlansError, load_plans, parse_plans, plans
from billingos_asgi.local.plans import Feature, Grant

MICRO = 1_000_000

VALID_TOML = """
[features.api_calls]
title = "API calls"
type = "usage_quota"

[features.export]
title = "Data export"
type = "boolean_flag"

[features.storage_gb]
title = "Storage"
type = "usage_quota"

[features.seats]
type = "numeric_limit"

[plans.free]
name = "Free"
interval = "month"
features = { api_calls = 100, export = false, storage_gb = 1.5, seats = 1 }

[plans.pro]
name = "Pro"
interval = "year"
features = { api_calls = 100000, export = true, storage_gb = "unlimited", seats = "unlimited" }

[plans.bare]

[customers]
user_123 = "free"
user_456 = "pro"
"""

# The features block every invalid file below starts from.
FEATURES_TOML = """
[features.api_calls]
title = "API calls"
type = "usage_quota"

[features.export]
title = "Data export"
type = "boolean_flag"
"""


def write(tmp_path: Path, text: str, name: str = "plans.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- valid files --


def test_valid_toml_file_loads_features_plans_and_customers(tmp_path: Path) -> None:
    catalog = load_plans(write(tmp_path, VALID_TOML))

    assert dict(catalog.features) == {
        "api_calls": Feature("api_calls", "API calls", "usage_quota"),
        "export": Feature("export", "Data export", "boolean_flag"),
        "storage_gb": Feature("storage_gb", "Storage", "usage_quota"),
        "seats": Feature("seats", "seats", "numeric_limit"),  # title defaults to the key
    }
    assert sorted(catalog.plans) == ["bare", "free", "pro"]
    assert dict(catalog.customers) == {"user_123": "free", "user_456": "pro"}

    free = catalog.plans["free"]
    assert (free.key, free.name, free.interval) == ("free", "Free", "month")
    assert dict(free.grants) == {
        "api_calls": Grant(catalog.features["api_calls"], 100 * MICRO),
        "storage_gb": Grant(catalog.features["storage_gb"], 1_500_000),
        "seats": Grant(catalog.features["seats"], 1 * MICRO),
    }

    pro = catalog.plans["pro"]
    assert (pro.name, pro.interval) == ("Pro", "year")
    assert dict(pro.grants) == {
        "api_calls": Grant(catalog.features["api_calls"], 100_000 * MICRO),
        "export": Grant(catalog.features["export"], None),
        "storage_gb": Grant(catalog.features["storage_gb"], None),
        "seats": Grant(catalog.features["seats"], None),
    }

    bare = catalog.plans["bare"]  # every plan key has a default
    assert (bare.name, bare.interval, dict(bare.grants)) == ("bare", "month", {})


def test_a_byte_order_mark_is_not_content(tmp_path: Path) -> None:
    """Windows editors may save "UTF-8 with BOM": the same plans, not an invalid statement at line 1."""
    path = tmp_path / "plans.toml"
    path.write_bytes(b"\xef\xbb\xbf" + VALID_TOML.encode())
    assert load_plans(path) == load_plans(write(tmp_path, VALID_TOML, name="plain.toml"))


def test_export_false_is_not_granted(tmp_path: Path) -> None:
    catalog = load_plans(write(tmp_path, VALID_TOML))
    assert "export" not in catalog.plans["free"].grants
    assert "export" in catalog.plans["pro"].grants


def test_unlimited_quota_is_a_grant_without_limit() -> None:
    catalog = parse_plans(
        {
            "features": {"api_calls": {"type": "usage_quota"}},
            "plans": {"pro": {"features": {"api_calls": "unlimited"}}},
        }
    )
    grant = catalog.plans["pro"].grants["api_calls"]
    assert grant.limit is None
    assert grant.feature == Feature("api_calls", "api_calls", "usage_quota")


@pytest.mark.parametrize(
    ("limit", "micro"),
    [(0, 0), (0.5, 500_000), (2.25, 2_250_000), (0.1, 100_000), (0.000001, 1), (99_999_999_999_999, 10**20 - MICRO)],
)
def test_fractional_and_boundary_limits_become_exact_micro_units(limit: float, micro: int) -> None:
    catalog = parse_plans(
        {"features": {"gb": {"type": "usage_quota"}}, "plans": {"p": {"features": {"gb": limit}}}}, source="x"
    )
    assert catalog.plans["p"].grants["gb"].limit == micro


def test_dict_load_with_all_intervals() -> None:
    data: dict[str, Any] = {
        "features": {"api_calls": {"title": "API calls", "type": "usage_quota"}},
        "plans": {
            interval: {"name": interval.title(), "interval": interval, "features": {"api_calls": 5}}
            for interval in ("day", "week", "month", "year")
        },
        "customers": {"a": "day", "b": "year"},
    }
    catalog = parse_plans(data)
    assert {key: plan.interval for key, plan in catalog.plans.items()} == {
        "day": "day",
        "week": "week",
        "month": "month",
        "year": "year",
    }
    assert catalog.plans["week"].name == "Week"
    assert catalog.plans["day"].grants["api_calls"].limit == 5 * MICRO
    assert dict(catalog.customers) == {"a": "day", "b": "year"}


@pytest.mark.parametrize("data", [{}, {"features": {"api_calls": {"type": "usage_quota"}}}])
def test_a_dict_without_plans_is_refused_as_a_file_is(data: dict[str, Any]) -> None:
    # No customer could ever be subscribed: every check would answer "not found".
    with pytest.raises(PlansError) as excinfo:
        LocalBilling.from_dict(data)
    assert str(excinfo.value) == "<dict>: plans: no plan is defined (add a [plans.<key>] table)"


async def test_from_file_builds_a_working_engine(tmp_path: Path) -> None:
    async with LocalBilling.from_file(write(tmp_path, VALID_TOML), tmp_path / "billing.db") as billing:
        assert sorted(billing.catalog.plans) == ["bare", "free", "pro"]
        entitlement = await billing.check_entitlement("user_456", "export")
        assert entitlement.has_access is True
        entitlement = await billing.check_entitlement("user_123", "api_calls")
        assert (entitlement.has_access, entitlement.limit, entitlement.usage) == (True, 100.0, 0.0)


# -- invalid files: the message is "<file>: <dotted key>: <fault>" --


def test_not_toml_at_all(tmp_path: Path) -> None:
    path = write(tmp_path, "this is [not toml\n")
    with pytest.raises(PlansError) as excinfo:
        load_plans(path)
    assert str(excinfo.value).startswith(f"{path}: not valid TOML: ")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(PlansError) as excinfo:
        load_plans(path)
    assert str(excinfo.value) == f"{path}: cannot read the plans file: No such file or directory"


def test_a_missing_relative_path_names_the_directory_it_was_looked_for_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server started from another directory (a service, ``--app-dir``) resolves ``plans.toml``
    elsewhere: the message says where."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PlansError) as excinfo:
        LocalBilling.from_file("plans.toml")
    assert str(excinfo.value) == (
        f"plans.toml: cannot read the plans file: No such file or directory"
        f" ({tmp_path / 'plans.toml'}: relative to the working directory)"
    )


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(PlansError) as excinfo:
        load_plans(tmp_path)
    assert str(excinfo.value) == f"{tmp_path}: cannot read the plans file: Is a directory"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="no /proc here")
def test_a_refused_read_leaves_no_descriptor_open(tmp_path: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(PlansError):
            load_plans(tmp_path)
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_no_one_writes_to_is_refused_rather_than_waited_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening a pipe no one writes to would block start-up for ever."""
    monkeypatch.setattr(plans, "PIPE_WAIT", 0.1)
    path = tmp_path / "plans.toml"
    os.mkfifo(path)
    with pytest.raises(PlansError) as excinfo:
        load_plans(path)
    assert str(excinfo.value) == f"{path}: cannot read the plans file: nothing came through the pipe in 0.1 s"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_a_writer_opens_after_the_read_began_is_read(tmp_path: Path) -> None:
    """A writer may open its end after the read did: its bytes are waited for, not taken for an empty file."""
    path = tmp_path / "plans.toml"
    os.mkfifo(path)

    def write() -> None:
        with open(path, "wb") as fh:  # blocks until the read opens its end, then races the read
            fh.write(b'[features.api_calls]\ntype = "usage_quota"\n[plans.free]\nfeatures = { api_calls = 7 }\n')

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    catalog = load_plans(path)
    writer.join(5)
    assert list(catalog.plans["free"].grants) == ["api_calls"]


@pytest.mark.skipif(not Path("/dev/fd").is_dir(), reason="no /dev/fd here")
def test_a_pipe_is_read_to_its_writers_end() -> None:
    """``billingos-asgi serve --plans <(envsubst < plans.tmpl)``: the shell hands over /dev/fd/63."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b'[features.api_calls]\ntype = "usage_quota"\n[plans.free]\nfeatures = { api_calls = 7 }\n')
        os.close(write_end)
        catalog = load_plans(f"/dev/fd/{read_end}")
    finally:
        os.close(read_end)
    assert list(catalog.plans["free"].grants) == ["api_calls"]


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero here")
def test_a_device_that_never_ends_is_cut_off() -> None:
    with pytest.raises(PlansError, match="/dev/zero: cannot read the plans file: larger than 64 MiB"):
        load_plans("/dev/zero")


@pytest.mark.parametrize("text", ["", "# plans to come\n", FEATURES_TOML], ids=["empty", "comments", "features-only"])
def test_a_file_without_plans_is_refused(tmp_path: Path, text: str) -> None:
    """An empty or truncated file would serve every customer as unknown or planless: a mistake, not a setup."""
    path = write(tmp_path, text)
    with pytest.raises(PlansError) as excinfo:
        load_plans(path)
    assert str(excinfo.value) == f"{path}: plans: no plan is defined (add a [plans.<key>] table)"


def test_from_file_with_corrupt_toml_raises_plans_error_a_value_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[features.api_calls]\ntype = "usage_quota"\ngarbage = = =\n[plans\n')
    with pytest.raises(PlansError) as excinfo:
        LocalBilling.from_file(path, tmp_path / "billing.db")
    assert isinstance(excinfo.value, ValueError)
    assert str(excinfo.value).startswith(f"{path}: not valid TOML: ")
    assert not (tmp_path / "billing.db").exists()  # refused before the database was touched


def test_from_file_with_corrupt_bytes_raises_plans_error_a_value_error(tmp_path: Path) -> None:
    """A file that is not even UTF-8 (a truncated binary, a UTF-16 export) is a corrupt plans file too."""
    path = tmp_path / "corrupt.toml"
    path.write_bytes(b'[features.api_calls]\ntype = "usage_quota"\n\xff\xfe\x00garbage\n')
    with pytest.raises(PlansError) as excinfo:
        LocalBilling.from_file(path, tmp_path / "billing.db")
    assert str(excinfo.value).startswith(f"{path}: not valid TOML: ")
    assert not (tmp_path / "billing.db").exists()


INVALID_FILES = [
    pytest.param(
        FEATURES_TOML + "\n[extras]\nfoo = 1\n",
        "extras: unknown top-level key (expected features, plans, customers)",
        id="unknown-top-level-key",
    ),
    pytest.param(
        '[features.api_calls]\ntitle = "API calls"\ntype = "usage_qouta"\n',
        "features.api_calls.type: must be one of boolean_flag, usage_quota, numeric_limit, got 'usage_qouta'",
        id="feature-unknown-type",
    ),
    pytest.param(
        '[features.api_calls]\ntitle = "API calls"\n',
        "features.api_calls.type: must be one of boolean_flag, usage_quota, numeric_limit, got None",
        id="feature-missing-type",
    ),
    pytest.param(
        "[features]\nexport = 5\n",
        "features.export: must be a table, got int",
        id="feature-not-a-table",
    ),
    pytest.param(
        'features = "all of them"\n',
        "features: must be a table, got str",
        id="features-not-a-table",
    ),
    pytest.param(
        '[features.api_calls]\ntype = "usage_quota"\nlimit = 5\n',
        "features.api_calls.limit: unknown key (expected title, type)",
        id="unknown-key-in-feature",
    ),
    pytest.param(
        "[features.api_calls]\ntitle = 5\ntype = 'usage_quota'\n",
        "features.api_calls.title: must be a string",
        id="feature-title-not-a-string",
    ),
    pytest.param(
        FEATURES_TOML + '\n[plans.free]\nname = "Free"\nprice = 10\n',
        "plans.free.price: unknown key (expected name, interval, features)",
        id="unknown-key-in-plan",
    ),
    pytest.param(
        FEATURES_TOML + "\n[plans.free]\nfeatures = { api_calls = 10, api_cals = 5 }\n",
        "plans.free.features.api_cals: unknown feature (declare it under [features])",
        id="plan-grants-undeclared-feature",
    ),
    pytest.param(
        FEATURES_TOML + "\n[plans.pro]\nfeatures = { export = 1 }\n",
        "plans.pro.features.export: boolean_flag takes true or false, got 1",
        id="boolean-flag-given-number",
    ),
    pytest.param(
        FEATURES_TOML + '\n[plans.pro]\nfeatures = { export = "yes" }\n',
        "plans.pro.features.export: boolean_flag takes true or false, got 'yes'",
        id="boolean-flag-given-string",
    ),
    pytest.param(
        FEATURES_TOML + '\n[plans.free]\nfeatures = { api_calls = "lots" }\n',
        "plans.free.features.api_calls: usage_quota takes a number or 'unlimited', got 'lots'",
        id="quota-string-not-unlimited",
    ),
    pytest.param(
        FEATURES_TOML + '\n[plans.free]\nfeatures = { api_calls = "Unlimited" }\n',
        "plans.free.features.api_calls: usage_quota takes a number or 'unlimited', got 'Unlimited'",
        id="quota-unlimited-wrong-case",
    ),
    pytest.param(
        FEATURES_TOML + '\n[plans.free]\nfeatures = { api_calls = "100" }\n',
        "plans.free.features.api_calls: usage_quota takes a number or 'unlimited', got '100'",
        id="quota-numeric-string",
    ),
    pytest.param(
        FEATURES_TOML + "\n[plans.free]\nfeatures = { api_calls = -1 }\n",
        "plans.free.features.api_calls: limit must be >= 0 and below 100000000000000, got -1",
        id="negative-limit",
    ),
    pytest.param(
        FEATURES_TOML + "\n[plans.free]\nfeatures = { api_calls = -0.5 }\n",
        "plans.free.features.api_calls: limit must be >= 0 and below 100000000000000, got -0.5",
        id="negative-fractional-limit",
    ),
    pytest.param(
        FEATURES_TOML + "\n[plans.free]\nfeatures = { api_calls = 0.0000001 }\n",
        "plans.free.features.api_calls: limit 1e-07 is below the resolution of 1e-06 units",
        id="limit-below-resolution",
    ),
    pytest.param(
        FEATURES_TOML + "\n[plans.free]\nfeatures = { api_calls = 100_000_000_000_000 }\n",
        "plans.free.features.api_calls: limit must be >= 0 and below 100000000000000, got 100000000000000",
        id="limit-above-decimal-20-6",
    ),
    pytest.param(
        FEATURES_TOML + "\n[plans.free]\nfeatures = { api_calls = nan }\n",
        "plans.free.features.api_calls: usage_quota takes a number or 'unlimited', got nan",
        id="nan-limit",
    ),
    pytest.param(
        FEATURES_TOML + "\n[plans.free]\nfeatures = { api_calls = inf }\n",
        "plans.free.features.api_calls: usage_quota takes a number or 'unlimited', got inf",
        id="inf-limit",
    ),
    pytest.param(
        FEATURES_TOML + "\n[plans.free]\nfeatures = { api_calls = -inf }\n",
        "plans.free.features.api_calls: usage_quota takes a number or 'unlimited', got -inf",
        id="minus-inf-limit",
    ),
    pytest.param(
        FEATURES_TOML + "\n[plans.free]\nfeatures = { api_calls = true }\n",
        "plans.free.features.api_calls: usage_quota takes a number or 'unlimited', got True",
        id="bool-as-quota",
    ),
    pytest.param(
        '[features.seats]\ntype = "numeric_limit"\n\n[plans.team]\nfeatures = { seats = false }\n',
        "plans.team.features.seats: numeric_limit takes a number or 'unlimited', got False",
        id="bool-as-numeric-limit",
    ),
    pytest.param(
        FEATURES_TOML + '\n[plans.free]\ninterval = "fortnight"\nfeatures = { api_calls = 10 }\n',
        "plans.free.interval: must be one of day, week, month, year, got 'fortnight'",
        id="bad-interval",
    ),
    pytest.param(
        FEATURES_TOML + '\n[plans.free]\ninterval = "monthly"\n',
        "plans.free.interval: must be one of day, week, month, year, got 'monthly'",
        id="interval-monthly",
    ),
    pytest.param(
        FEATURES_TOML + "\n[plans.free]\nname = 3\n",
        "plans.free.name: must be a string",
        id="plan-name-not-a-string",
    ),
    pytest.param(
        FEATURES_TOML + "\n[plans.free]\nfeatures = [1, 2]\n",
        "plans.free.features: must be a table, got list",
        id="plan-features-not-a-table",
    ),
    pytest.param(
        FEATURES_TOML + "\n[plans]\nfree = 1\n",
        "plans.free: must be a table, got int",
        id="plan-not-a-table",
    ),
    pytest.param(
        FEATURES_TOML + '\n[plans.free]\nfeatures = { api_calls = 10 }\n\n[customers]\nuser_123 = "gold"\n',
        "customers.user_123: unknown plan 'gold'",
        id="customer-unknown-plan",
    ),
    pytest.param(
        FEATURES_TOML + "\n[plans.free]\nfeatures = { api_calls = 10 }\n\n[customers]\nuser_123 = 7\n",
        "customers.user_123: unknown plan 7",
        id="customer-plan-not-a-string",
    ),
    pytest.param(
        'customers = ["user_123"]\n' + FEATURES_TOML,
        "customers: must be a table, got list",
        id="customers-not-a-table",
    ),
]


@pytest.mark.parametrize(("text", "message"), INVALID_FILES)
def test_invalid_file_is_refused_naming_file_key_and_fault(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PlansError) as excinfo:
        load_plans(path)
    assert str(excinfo.value) == f"{path}: {message}"
    assert isinstance(excinfo.value, ValueError)


@pytest.mark.parametrize(("text", "message"), INVALID_FILES[:3])
def test_from_file_refuses_invalid_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PlansError) as excinfo:
        LocalBilling.from_file(path)
    assert str(excinfo.value) == f"{path}: {message}"


def test_dict_errors_name_the_source() -> None:
    data = {"features": {"api_calls": {"type": "usage_quota"}}, "plans": {"free": {"features": {"api_calls": -3}}}}
    with pytest.raises(PlansError) as excinfo:
        LocalBilling.from_dict(data)
    assert (
        str(excinfo.value)
        == "<dict>: plans.free.features.api_calls: limit must be >= 0 and below 100000000000000, got -3"
    )

    with pytest.raises(PlansError) as excinfo:
        parse_plans(data, source="billing.toml")
    assert str(excinfo.value).startswith("billing.toml: plans.free.features.api_calls: ")


def test_top_level_not_a_mapping() -> None:
    with pytest.raises(PlansError) as excinfo:
        parse_plans(["features"], source="s")  # type: ignore[arg-type]
    assert str(excinfo.value) == "s: (top level): must be a table, got list"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"features": {"": {"type": "usage_quota"}}}, "s: features.'': name must not be empty"),
        (
            {"features": {"a\nb": {"type": "usage_quota"}}},
            "s: features.'a\\nb': name must not contain control characters",
        ),
        ({"plans": {" ": {}}}, "s: plans.' ': name must not be empty"),
        (
            {"plans": {"p": {}}, "customers": {"x" * 256: "p"}},
            f"s: customers.'{'x' * 76}...: name is 256 characters long",  # (the key shortened)
        ),
    ],
)
def test_unusable_keys_are_refused(data: dict[str, Any], message: str) -> None:
    with pytest.raises(PlansError) as excinfo:
        parse_plans(data, source="s")
    assert str(excinfo.value).startswith(message)


HUGE = 10**400  # TOML integers have no size limit; a float holds none this large


def test_a_huge_integer_limit_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "plans.toml"
    path.write_text(f'[features.api_calls]\ntype = "usage_quota"\n[plans.free]\nfeatures = {{ api_calls = {HUGE} }}\n')
    with pytest.raises(PlansError) as excinfo:
        load_plans(path)
    assert str(excinfo.value) == (
        f"{path}: plans.free.features.api_calls: limit must be >= 0 and below 100000000000000, "
        "got an integer of 398 digits or so"
    )
    with pytest.raises(PlansError, match=r"^<plans>: features.a.type: must be one of .*, got an integer of"):
        parse_plans({"features": {"a": {"type": 10**5000}}})  # (its repr would raise)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[features.a]\ntype = [HUGE]\n", "features.a.type"),
        ('[features.a]\ntype = "usage_quota"\n[plans.p]\nfeatures = { a = [HUGE] }\n', "plans.p.features.a"),
        ("[plans.p]\ninterval = { n = HUGE }\n", "plans.p.interval"),
        ("[plans.p]\n[customers]\nu1 = [HUGE]\n", "customers.u1"),
    ],
)
def test_a_huge_integer_inside_a_value_is_refused_by_name(tmp_path: Path, text: str, where: str) -> None:
    """A hex literal has no digit limit in tomllib; its repr, over 4,300 digits, raises."""
    path = tmp_path / "plans.toml"
    path.write_text(text.replace("HUGE", "0x" + "f" * 5000))
    with pytest.raises(PlansError, match=rf"^{re.escape(str(path))}: {re.escape(where)}: .*too long to show"):
        load_plans(path)


def test_an_integer_too_long_to_read_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "plans.toml"
    path.write_text(f"[features.a]\ntype = {'1' * 5000}\n")
    with pytest.raises(PlansError, match=rf"^{re.escape(str(path))}: not valid TOML: Exceeds the limit"):
        load_plans(path)


def test_a_file_nested_too_deeply_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "plans.toml"
    path.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(PlansError, match=rf"^{re.escape(str(path))}: not valid TOML: nested too deeply$"):
        load_plans(path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"plans": {}, 1: {}, "extra": {}}, "s: 1: unknown top-level key"),
        ({"features": {"a": {"type": "usage_quota", 1: "x", "z": "y"}}}, "s: features.a.1: unknown key"),
        ({"plans": {"p": {2: "x", "zz": "y"}}}, "s: plans.p.2: unknown key"),
    ],
)
def test_unknown_keys_of_mixed_types_are_refused_by_name(data: dict[Any, Any], message: str) -> None:
    with pytest.raises(PlansError) as excinfo:
        parse_plans(data, source="s")
    assert str(excinfo.value).startswith(message)


class NumpyLikeFloat(float):
    """A float subclass whose repr names its type, as numpy 2's float64 does ("np.float64(1.5)")."""

    def __repr__(self) -> str:
        return f"np.float64({float.__repr__(self)})"


def test_a_float_subclass_limit_counts_as_its_value() -> None:
    """Its repr went into Decimal(): a crash (decimal.InvalidOperation) at load, not a plan."""
    data = {
        "features": {"storage_gb": {"type": "usage_quota"}},
        "plans": {"free": {"features": {"storage_gb": NumpyLikeFloat(1.5)}}},
    }
    assert parse_plans(data).plans["free"].grants["storage_gb"].limit == 1_500_000


def test_the_largest_limit_upstream_holds_is_taken() -> None:
    data = {
        "features": {"storage_gb": {"type": "usage_quota"}},
        "plans": {"big": {"features": {"storage_gb": 99_999_999_999_999.5}}},
    }
    assert parse_plans(data).plans["big"].grants["storage_gb"].limit == 99_999_999_999_999_500_000
