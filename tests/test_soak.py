"""The soak test's short version: tasks from concurrent clients through two SIGKILLs; nothing lost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).parent.parent / "scripts" / "soak.py"


def test_short_soak_loses_nothing_and_balances_the_ledger() -> None:
    result = subprocess.run(
        [sys.executable, str(SOAK), "--tasks", "40", "--clients", "6", "--kills", "2"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "lost 0" in result.stdout
    assert "ledger difference 0" in result.stdout
    assert "SIGKILLed and restarted 2 times" in result.stdout
