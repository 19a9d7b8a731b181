"""Fuzz a real mrs-server against its own OpenAPI schema for a long budget, and print the counts.

    .venv/bin/python tools/fuzz.py --cases 1000      # per operation and mode (valid / invalid)

Runs tests/test_fuzz.py (the suite's fuzz test, 200 cases each) with ``MRS_FUZZ_CASES``,
then prints how many requests each operation got and with which statuses. Exit code:
pytest's (0: no 5xx, every error in the envelope, every response valid against the schema).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000, help="cases per operation and mode (default 1000)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "statuses.json"
        env = {**os.environ, "MRS_FUZZ_CASES": str(args.cases), "MRS_FUZZ_REPORT": str(report)}
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz.py"],
                                cwd=ROOT, env=env)
        seconds = time.monotonic() - started
        rows = json.loads(report.read_text()) if report.exists() else []
    by_operation: dict[tuple[str, str], collections.Counter[int]] = collections.defaultdict(collections.Counter)
    for operation, mode, status, count in rows:
        by_operation[operation, mode][status] += count
    print("\n| operation | cases | statuses |\n|---|---:|---|")
    for (operation, mode), statuses in sorted(by_operation.items()):
        detail = ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items()))
        print(f"| {operation} ({mode}) | {sum(statuses.values())} | {detail} |")
    total = sum(count for *_, count in rows)
    server_errors = sum(count for *_, status, count in rows if status >= 500)
    print(f"\n{total} requests in {seconds:.0f} s, {server_errors} with a 5xx status; pytest exit code {result.returncode}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
