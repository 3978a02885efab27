#!/usr/bin/env python3
"""CPU an idle deployment uses: run some requests, then sample each daemon's CPU time over a window.

    .venv/bin/python scripts/idle_cpu.py [--seconds 10] [--requests 20]

An idle daemon sleeps in poll() with no timeout; after traffic it must have no timer left
that wakes it. Prints one line per daemon with its CPU share of one core over the window.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from kvxferd.config import load
from kvxferd.demo.engine import DemoEngine
from kvxferd.demo.launch import Cluster, prepare


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the idle window")
    parser.add_argument("--requests", type=int, default=20, help="requests to run before going idle")
    args = parser.parse_args()
    config, path, run_dir = prepare(load(None))
    cluster = Cluster(config, path, run_dir, "WARNING")
    engine = None
    try:
        cluster.start(60)
        engine = DemoEngine(
            config, config.group(role="prefill"), config.group(role="decode"), seed=0, transport="auto", layer_s=0.0
        )
        engine.register()
        engine.plan(args.requests)
        engine.run(time.monotonic() + 120, lambda _r: None, cluster.check)
        before = {d.name: cpu_seconds(d.popen.pid) for d in cluster.daemons}
        t0 = time.monotonic()
        time.sleep(args.seconds)  # the measurement window itself, not synchronisation
        elapsed = time.monotonic() - t0
        print(f"idle CPU over {elapsed:.1f} s after {args.requests} requests:")
        for d in cluster.daemons:
            used = cpu_seconds(d.popen.pid) - before[d.name]
            print(f"  {d.name:10s} {used * 1e3:7.1f} ms  = {100 * used / elapsed:.3f} % of one core")
    finally:
        if engine is not None:
            engine.close()
        cluster.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
