"""``billingos-asgi serve`` as a user runs it: a real process, a real port."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

import billingos_asgi
from billingos_asgi import LocalBilling
from billingos_asgi.cli import build_parser
from billingos_asgi.local.server import DEFAULT_SECRET_KEY
from tests.local.conftest import write_locked

PLANS = (
    '[features.api_calls]\ntype = "usage_quota"\n[plans.free]\nfeatures = { api_calls = 5 }\n'
    '[customers]\nalice = "free"\n'
)
SECRET = "sk_test_kept_secret_4f1c"


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
        (["--track-rate-limit", "1000/hour"], "expected N/min"),
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


@pytest.mark.parametrize(
    "argv",
    [
        ["--secret-key", "sk_live_SECRET1", "serve", "--plans", "p.toml"],  # the option before its command
        ["serve", "--plans", "p.toml", "--secret_key", "sk_live_SECRET1"],  # a misspelt option
        ["serve", "--plans", "p.toml", "--log-level", "sk_live_AB/SECRET1+="],  # in the wrong place, with a "/"
    ],
)
def test_a_secret_key_argparse_quotes_in_an_error_is_masked(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    error = capsys.readouterr().err
    assert exited.value.code == 2 and "sk_***" in error and "SECRET1" not in error


def test_version_is_the_package_version() -> None:
    answered = run_cli("--version")
    assert answered.returncode == 0 and answered.stdout == f"billingos-asgi {billingos_asgi.__version__}\n"


def test_rate_limit_accepts_n_per_min() -> None:
    assert build_parser().parse_args(["serve", "--plans", "p", "--rate-limit", "100/min"]).rate_limit == 100
    args = build_parser().parse_args(["serve", "--plans", "p", "--track-rate-limit", "1000/min"])
    assert (args.rate_limit, args.track_rate_limit) == (None, 1000)


def test_serve_answers_on_its_port(tmp_path: Path) -> None:
    plans = tmp_path / "plans.toml"
    plans.write_text(PLANS)
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
            deadline = time.monotonic() + 60  # a fresh interpreter's imports, on a busy machine
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


def test_an_empty_secret_key_in_the_environment_is_as_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """As the client reads it (an .env template's ``BILLINGOS_SECRET_KEY=``): the default applies."""
    monkeypatch.setenv("BILLINGOS_SECRET_KEY", "")
    assert build_parser().parse_args(["serve", "--plans", "p.toml"]).secret_key == DEFAULT_SECRET_KEY


@contextmanager
def serving(plans: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], str, list[str]]]:
    """``serve --port 0`` in its own process: the process, the address its banner names, the lines so far."""
    command = [sys.executable, "-m", "billingos_asgi", "serve", "--plans", str(plans), "--port", "0", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        assert process.stderr is not None
        # Read from the pipe itself: a buffered readline() would take several lines at once and
        # leave the banner in its buffer, where the selector never sees it.
        received = ""
        with selectors.DefaultSelector() as selector:
            selector.register(process.stderr, selectors.EVENT_READ)
            deadline = time.monotonic() + 60  # a fresh interpreter's imports, on a busy machine
            while "Uvicorn running on" not in received:
                assert selector.select(max(0.0, deadline - time.monotonic())), f"no banner: {received!r}"
                chunk = os.read(process.stderr.fileno(), 65536).decode()
                assert chunk, f"the server exited: {received!r}"
                received += chunk
        lines += received.splitlines(keepends=True)
        banner = next(line for line in lines if "Uvicorn running on" in line)
        yield process, banner.split(" on ")[1].split()[0], lines
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)


def test_a_port_in_use_is_refused_in_one_line_before_the_app_starts(tmp_path: Path) -> None:
    plans = tmp_path / "plans.toml"
    plans.write_text(PLANS)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--plans", str(plans), "--port", str(port))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"billingos-asgi: cannot listen on 127.0.0.1:{port}: ")
    assert result.stderr.count("\n") == 1  # not uvicorn's start-up and shut-down log around its error


def test_an_unknown_host_is_refused_in_one_line(tmp_path: Path) -> None:
    plans = tmp_path / "plans.toml"
    plans.write_text(PLANS)
    result = run_cli("serve", "--plans", str(plans), "--host", "no-such-host.invalid", "--port", "0")
    assert result.returncode == 2
    assert result.stderr.startswith("billingos-asgi: cannot listen on no-such-host.invalid:0: ")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("host", "said"),
    [
        ("", "argument --host: the host is empty"),  # (an unset $HOST listened on every interface)
        ("é" * 64, "cannot listen on "),  # (no IDNA name: a traceback)
    ],
)
def test_a_host_that_cannot_be_listened_on_is_refused_in_one_line(tmp_path: Path, host: str, said: str) -> None:
    plans = tmp_path / "plans.toml"
    plans.write_text(PLANS)
    result = run_cli("serve", "--plans", str(plans), "--host", host, "--port", "0")
    assert result.returncode == 2 and said in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_server_cleanly_and_the_secret_key_is_never_shown(
    tmp_path: Path, stop: signal.Signals
) -> None:
    plans = tmp_path / "plans.toml"
    plans.write_text(PLANS)
    with serving(plans, "--secret-key", SECRET) as (process, address, lines):
        assert address.startswith("http://127.0.0.1:") and not address.endswith(":0")  # the port it took
        answer = httpx.get(
            f"{address}/v1/usage/metrics?customer_id=alice", headers={"Authorization": f"Bearer {SECRET}"}
        )
        assert answer.status_code == 200
        process.send_signal(stop)
        out, err = process.communicate(timeout=60)
    output = "".join(lines) + out + err
    # Ctrl+C ends with status 0; SIGTERM is raised again once uvicorn has shut down, for the parent to see.
    assert process.returncode == (0 if stop == signal.SIGINT else -stop)
    assert "Application shutdown complete" in output and "Traceback" not in output
    assert SECRET not in output


def test_the_help_never_shows_the_secret_key_from_the_environment() -> None:
    env = {**os.environ, "BILLINGOS_SECRET_KEY": SECRET}
    result = subprocess.run(
        [sys.executable, "-m", "billingos_asgi", "serve", "--help"], capture_output=True, text=True, timeout=30, env=env
    )
    assert result.returncode == 0 and "--secret-key" in result.stdout and SECRET not in result.stdout


def test_a_bad_secret_key_in_the_environment_is_named_as_such_and_never_shown() -> None:
    env = {**os.environ, "BILLINGOS_SECRET_KEY": "pk_live_kept_secret_4f1c"}
    result = subprocess.run(
        [sys.executable, "-m", "billingos_asgi", "serve", "--plans", "p.toml"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert result.returncode == 2 and "$BILLINGOS_SECRET_KEY" in result.stderr  # not only "--secret-key", never given
    assert "kept_secret" not in result.stderr
