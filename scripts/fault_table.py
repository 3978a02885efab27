#!/usr/bin/env python3
"""Run the fault cases of ``tests/faults`` and print what each measured: `make faults`.

Each case (a real deployment: barrier service, 2 prefill and 2 decode ranks) records the fault,
the seconds from it to the engines' report (or to the refusal, the exit, the completion), what
happened to the requests it touched, how many unaffected requests moved verified bytes, and how
long the faulted process took to serve again. Every case also asserts that no socket file is left
after the clean stop that ends it, and checks its tables where it says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "faults.jsonl"
        env = {**os.environ, "KVXFERD_FAULT_REPORT": str(report)}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/faults", *sys.argv[1:]]
        code = subprocess.run(cmd, env=env, check=False).returncode
        rows = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    print()
    print("| fault | transport | to report (s) | requests it touched | unaffected, verified | rejoin (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = [r.get("fault", r["case"]), r.get("transport", "shm"), r.get("report_s", "-"), r.get("affected", "-")]
        cells.append(r["verified"])
        print("| " + " | ".join(str(c) for c in [*cells, r.get("rejoin_s", "-")]) + " |")
    return code


if __name__ == "__main__":
    sys.exit(main())
