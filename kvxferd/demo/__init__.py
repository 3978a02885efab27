"""``kvxferd demo``: a whole deployment on one machine, every byte checked.

Latency is measured per request from the moment the prefill engine sent the
last layer signal of the request's last chunk to the moment the decode engine
had every decode rank's KVReady: the time the transfer adds after prefill.
Throughput is the bytes the prefill ranks wrote for requests that ended ok,
over the wall time of the run (GB/s, 1e9 bytes per second).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kvxferd.config import Config
from kvxferd.demo.engine import DemoEngine, DemoRequest
from kvxferd.demo.launch import Cluster, prepare
from kvxferd.errors import KvxferdError


@dataclass
class Summary:
    requests: int
    ok: int = 0
    failed: int = 0
    verified: int = 0
    bytes: int = 0
    seconds: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    chunked: int = 0
    steps: int = 0
    transports: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    daemons: dict[str, int] = field(default_factory=dict)
    problem: str | None = None
    run_dir: str | None = None

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    @property
    def passed(self) -> bool:
        clean = all(code == 0 for code in self.daemons.values())
        return self.problem is None and clean and self.ok == self.verified == self.requests

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["gbps"] = round(self.gbps, 3)
        out["passed"] = self.passed
        return out

    def table(self) -> str:
        lines = [
            f"requests      {self.requests}  ({self.chunked} chunked, {self.steps} forward steps)",
            f"ok            {self.ok}",
            f"failed        {self.failed}",
            f"verified      {self.verified}  (decode blocks checked byte for byte once ready)",
            f"moved         {self.bytes / 2**20:.1f} MiB in {self.seconds:.2f} s = {self.gbps:.2f} GB/s",
            f"latency       p50 {self.p50_ms:.2f} ms, p99 {self.p99_ms:.2f} ms "
            "(last layer signal -> every decode rank's KVReady)",
            f"transports    {', '.join(f'{k}: {v}' for k, v in sorted(self.transports.items())) or '-'}",
            f"daemons       {', '.join(f'{k}={v}' for k, v in self.daemons.items())}",
        ]
        lines += [f"failure       {f}" for f in self.failures[:10]]
        lines += [f"error reply   {n}x {e}" for e, n in list(self.errors.items())[:10]]
        if self.problem:
            lines.append(f"problem       {self.problem}")
        if self.run_dir:
            lines.append(f"run dir       {self.run_dir}")
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(summary: Summary, requests: list[DemoRequest], seconds: float, errors: Counter[str]) -> None:
    latencies = []
    for req in requests:
        if req.prefill_ok and req.ready_at is not None:
            summary.ok += 1
            summary.bytes += req.nbytes
            if req.last_signal_at is not None:
                latencies.append((req.ready_at - req.last_signal_at) * 1e3)
        elif req.finished:
            summary.failed += 1
        if req.verified:
            summary.verified += 1
        elif req.ready_at is not None:
            summary.failures.append(f"{req.rid}: KVReady but the decode blocks do not match what prefill wrote")
        if req.failure:
            summary.failures.append(f"{req.rid}: {req.failure}")
        summary.chunked += req.chunks > 1
        for name in req.transports:
            summary.transports[name] = summary.transports.get(name, 0) + 1
    summary.seconds = seconds
    summary.p50_ms = round(_percentile(latencies, 0.50), 3)
    summary.p99_ms = round(_percentile(latencies, 0.99), 3)
    summary.errors = dict(errors)


def run(
    config: Config,
    *,
    requests: int,
    seed: int = 0,
    transport: str = "auto",
    timeout_s: float = 300.0,
    keep: bool = False,
    log_level: str = "WARNING",
    progress: bool = True,
    layer_ms: float = 0.5,
) -> Summary:
    config, config_path, run_dir = prepare(config)
    prefill, decode = config.group(role="prefill"), config.group(role="decode")
    summary = Summary(requests)
    deadline = time.monotonic() + timeout_s
    cluster = Cluster(config, config_path, run_dir, log_level)
    engine: DemoEngine | None = None
    bar = None
    try:
        cluster.start(min(timeout_s, 60.0))
        engine = DemoEngine(config, prefill, decode, seed=seed, transport=transport, layer_s=layer_ms / 1e3)
        engine.register()
        engine.plan(requests)
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=requests, unit="req", file=sys.stderr, disable=None, desc="kvxferd demo")
        start = time.monotonic()

        def advance(_req: DemoRequest) -> None:
            if bar is not None:
                bar.update(1)

        try:
            engine.run(deadline, advance, cluster.check)
        except TimeoutError:
            summary.problem = f"timed out after {timeout_s:g}s"
        summary.steps = engine.step
        summarize(summary, engine.requests, time.monotonic() - start, engine.errors)
    except (KvxferdError, OSError) as exc:  # the summary says what went wrong; the CLI exits non-zero
        summary.problem = f"{type(exc).__name__}: {exc}"
    finally:
        if bar is not None:
            bar.close()
        if engine is not None:
            engine.close()
        summary.daemons = cluster.stop()
        if keep or not summary.passed:
            summary.run_dir = str(run_dir)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    return summary
