"""The examples run as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_make_demo_meters_two_customers_until_one_runs_out() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    answers = [line for line in lines if "->" in line]
    assert "-> 401" in answers[0] and "-> 403" in answers[1] and "-> 200" in answers[2]
    searches = [line for line in answers if "user_123  GET  /v1/search" in line]
    assert [line.split("-> ")[1][:3] for line in searches] == ["200"] * 10 + ["429"]
    table = {line.split()[0] + " " + line.split()[2]: line for line in lines if line.startswith("user_")}
    assert "10 / 10" in table["user_123 API"] and "10 / 100000" in table["user_456 API"]
