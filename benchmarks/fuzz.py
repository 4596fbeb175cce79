"""The listener fuzzer of tests/integration/test_fuzz.py with as many cases as you like.

    .venv/bin/python -m benchmarks.fuzz [--cases 20000] [--seed 1] [--path plain|fast|both]

Every invariant of the test is checked at the end of each run (no crash, no thread, descriptor or
temporary file left, nothing outside the storage, every stored instance whole, C-ECHO answers);
prints the cases run by kind and the time they took.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from tests.integration.test_fuzz import run_fuzz


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--path", choices=["plain", "fast", "both"], default="both")
    args = parser.parse_args()
    paths = {"plain": [False], "fast": [True], "both": [False, True]}[args.path]
    for fast_path in paths:
        work = Path(tempfile.mkdtemp(prefix="segnode-fuzz-"))
        try:
            started = time.perf_counter()
            kinds = run_fuzz(work, fast_path, args.cases, args.seed)
            seconds = time.perf_counter() - started
        finally:
            shutil.rmtree(work, ignore_errors=True)
        name = "fast path" if fast_path else "plain pynetdicom"
        by_kind = ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items()))
        print(f"{name}: {sum(kinds.values())} cases in {seconds:.0f} s, every invariant held ({by_kind})")


if __name__ == "__main__":
    main()
