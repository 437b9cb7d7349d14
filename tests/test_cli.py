"""``billingos-asgi serve`` as a user runs it: a real process, a real port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import billingos_asgi
from billingos_asgi import LocalBilling
from billingos_asgi.cli import build_parser
from tests.local.conftest import write_locked


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "billingos_asgi", *args], capture_output=True, text=True, timeout=30)


def test_invalid_plans_file_is_refused_with_file_key_and_fault(tmp_path: Path) -> None:
    plans = tmp_path / "plans.toml"
    plans.write_text('[features.api_calls]\ntype = "usage_quotas"\n')
    result = run_cli("serve", "--plans", str(plans))
    assert result.returncode == 2
    assert str(plans) in result.stderr and "features.api_calls.type" in result.stderr
    assert "usage_quotas" in result.stderr


def test_missing_plans_file_is_refused(tmp_path: Path) -> None:
    result = run_cli("serve", "--plans", str(tmp_path / "absent.toml"))
    assert result.returncode == 2 and "cannot read the plans file" in result.stderr


def test_a_database_locked_by_another_process_is_refused_in_one_line(tmp_path: Path) -> None:
    plans = tmp_path / "plans.toml"
    plans.write_text('[features.api_calls]\ntype = "usage_quota"\n[plans.free]\nfeatures = { api_calls = 5 }\n')
    database = tmp_path / "billing.db"
    LocalBilling.from_file(plans, database).close()
    with write_locked(database):
        result = run_cli("serve", "--plans", str(plans), "--db", str(database), "--port", "0")
    assert result.returncode == 2
    assert result.stderr == f"billingos-asgi: {database}: cannot open the billing database: database is locked\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate-limit", "fast"], "expected N/min"),
        (["--rate-limit", "0/min"], "expected N/min"),
        (["--secret-key", "pk_live_x"], "must start with 'sk_'"),
        (["--port", "http"], "expected a port number"),
        (["--port", "99999"], "expected a port number from 0 to 65535, got '99999'"),
        (["--port", "-1"], "expected a port number"),
    ],
)
def test_bad_options_are_refused(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--plans", "p.toml", *args])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_version_is_the_package_version() -> None:
    answered = run_cli("--version")
    assert answered.returncode == 0 and answered.stdout == f"billingos-asgi {billingos_asgi.__version__}\n"


def test_rate_limit_accepts_n_per_min() -> None:
    assert build_parser().parse_args(["serve", "--plans", "p", "--rate-limit", "100/min"]).rate_limit == 100


def test_serve_answers_on_its_port(tmp_path: Path) -> None:
    plans = tmp_path / "plans.toml"
    plans.write_text(
        '[features.api_calls]\ntype = "usage_quota"\n[plans.free]\nfeatures = { api_calls = 5 }\n'
        '[customers]\nalice = "free"\n'
    )
    with httpx.Client() as probe:
        with socket.socket() as sock:  # a free port, released for the server to take
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        process = subprocess.Popen(
            [sys.executable, "-m", "billingos_asgi", "serve", "--plans", str(plans), "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    response = probe.post(
                        f"http://127.0.0.1:{port}/v1/usage/track",
                        json={"customer_id": "alice", "feature_key": "api_calls", "quantity": 2},
                        headers={"Authorization": "Bearer sk_test_local"},
                    )
                    break
                except httpx.TransportError:
                    assert process.poll() is None and time.monotonic() < deadline, "server did not start"
                    time.sleep(0.05)
            assert response.status_code == 201
            assert response.json()["usage"]["consumed_units"] == 2
        finally:
            process.terminate()
            process.communicate(timeout=10)


def test_the_secret_key_may_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLINGOS_SECRET_KEY", "sk_test_from_env\n")
    assert build_parser().parse_args(["serve", "--plans", "p.toml"]).secret_key == "sk_test_from_env"
