"""The soak (benchmarks/soak.py) for five minutes: senders at work while the node, its worker,
PostgreSQL, Redis and the PACS are killed and restarted; nothing acknowledged is lost, every series
has one DELIVERED job and one SEG at the PACS."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

MINUTES = 5
LIMIT_S = MINUTES * 60 + 900  # set-up, and the jobs settling after the senders stop


@pytest.mark.timeout(LIMIT_S + 60)
def test_five_minutes_of_faults_lose_nothing_and_deliver_each_series_once() -> None:
    soak = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--minutes", str(MINUTES), "--seed", "20261206"],
        capture_output=True,
        text=True,
        timeout=LIMIT_S,
        check=False,
    )
    assert soak.returncode == 0, soak.stdout[-6000:] + soak.stderr[-6000:]
    assert "every invariant held" in soak.stdout
    assert "duplicates               0" in soak.stdout
    faults = next(line for line in soak.stdout.splitlines() if line.startswith("faults"))
    assert all(kind in faults for kind in ("node", "worker", "postgres", "redis", "pacs")), faults
