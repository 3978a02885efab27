#!/usr/bin/env python3
"""Minutes of mixed traffic through a whole deployment with faults on a schedule: `make soak`.

The demo's engines (continuous batching, chunked prompts, cache_infos at random points, every
decode block checked byte for byte at KVReady) drive a barrier service, 2 prefill and 2 decode
ranks on host memory, with requests spread over the transports given (shm and rdma by default)
and some aborted by the scheduler after their first step. Every ``--fault-every`` seconds one
fault of the cycle below is injected while requests are in flight:

  kill-prefill   SIGKILL prefill rank 1, start it again, its worker registers again
  kill-barrier   SIGKILL the barrier service, start it again
  kill-decode    SIGKILL decode rank 0, start it again, the decode engine registers again
  stop-prefill   SIGSTOP prefill rank 0 past the barrier timeout, then SIGCONT
  new-decode     the decode engine "restarts": it registers a new cache on every rank
  kill-barrier-prefill  SIGKILL the barrier service and prefill rank 1 together, start both again
  kill-engine    the decode engine dies (its connections close); a new one registers new caches
  down-prefill   SIGKILL prefill rank 1 and leave it down for --down-s (60 s), then start it again

Prefill rank 0 and decode rank 1 are never restarted, so their memory is the soak's leak measure:
once warm, to the last sample, RSS must grow less than 5 %. Warm is after ``--warm-s`` (60 s) and
after one whole fault cycle (every fault once, then the window after the first of the next cycle):
bounded tables fill to their worst case in the first one (a prefill rank down for a minute fails
thousands of requests, and a decode daemon remembers the notices of their failures). Growth
from the very first sample (after 100 requests) is printed beside it, and so are RSS's private
(RssAnon) and shared (RssShmem: the engines' KV cache pages a daemon maps) parts: the first
minutes fill the rdma transport's pools (~10 MB of a prefill daemon's private memory, ~2 MB
without rdma) and the remembered endings to their steady size. Printed at the end: requests by outcome
(ok and verified, aborted, failed, decode told but a dead prefill rank's result missing, lost: no
decision within --lost-s, undecided when its decode engine died, wrong bytes), per fault
the requests that ended in the window after it, every prefill rank's tables once idle, and memory
per daemon. Exit status 1 if any KVReady came with wrong bytes, a daemon died on its own, the
tables did not empty, or an unrestarted daemon's RSS grew 5 % or more once warm.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from kvxferd.client import DecodeEngine, credentials, status
from kvxferd.config import loads
from kvxferd.demo.engine import DemoEngine, DemoRequest, u64_view
from kvxferd.demo.launch import Cluster, prepare
from kvxferd.kvcache import HostKVCache
from kvxferd.protocol import CacheInfo

CONFIG = """
groups:
  - {name: prefill, role: prefill, world_size: 2, endpoint: "ipc://{run_dir}/p-{rank}.sock", memory: host}
  - {name: decode, role: decode, world_size: 2, endpoint: "ipc://{run_dir}/d-{rank}.sock", memory: host}
kv: {num_layers: 8, kv_heads: 8, head_dim: 64, block_tokens: 16, num_blocks: 512, dtype: bfloat16}
barrier: {timeout_s: 4}
timeouts: {pending_s: 8, progress_s: 8, verdict_s: 12, peer_s: 5, startup_s: 30, shutdown_s: 5, heartbeat_s: 0.5}
"""
FAULTS = (
    "kill-prefill",
    "kill-barrier",
    "kill-decode",
    "stop-prefill",
    "new-decode",
    "kill-barrier-prefill",
    "kill-engine",
    "down-prefill",
)
STEADY = ("prefill-0", "decode-1")  # never restarted: their RSS is the leak measure
ROUND = 100  # requests planned at a time


#: what each sample reads from /proc/PID/status: resident memory, and its private and shared parts
MEMORY = {"VmRSS": "rss", "RssAnon": "private", "RssShmem": "shared"}


def memory_kib(pid: int) -> dict[str, int] | None:
    """Resident KiB of ``pid``: all of it, private (heap, stacks) and shared memory (the engines'
    KV cache segments it maps, resident once touched), or None once it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    found = {MEMORY[k]: int(v.split()[0]) for k, _, v in (ln.partition(":") for ln in lines) if k in MEMORY}
    return found if len(found) == len(MEMORY) else None


class SoakEngine(DemoEngine):
    """The demo's engine with unique ids across rounds, a transport per request, and aborts."""

    def __init__(self, *args: Any, transports: list[str], abort_rate: float, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.transports = transports
        self.abort_rate = abort_rate
        self.planned = 0
        self.aborted: set[str] = set()
        self.old_caches: list[HostKVCache] = []
        self.views = [self.dviews]  # the decode engine's caches, one entry per registration of all
        self.epoch_of: dict[str, int] = {}  # request -> the registration its blocks were given in
        self.orphans: set[str] = set()  # started when the decode engine died (see new_engine)

    def plan(self, count: int) -> None:
        cap = self.shape.num_blocks * self.bt // 4
        self.requests = []
        for i in range(self.planned, self.planned + count):
            n = self.rng.randint(1, min(512, cap)) if self.rng.random() < 0.7 else self.rng.randint(513, 2048)
            req = DemoRequest(i, f"soak-{i}", n)
            self.requests.append(req)
            self.by_id[req.rid] = req
        self.planned += count

    def forget(self) -> None:
        """Drop the finished round's requests (late notices for them are ignored)."""
        for req in self.requests:
            self.by_id.pop(req.rid, None)
            self.epoch_of.pop(req.rid, None)
        self.requests = []

    def _cache_info(self, req: DemoRequest) -> CacheInfo:
        self.epoch_of[req.rid] = len(self.views) - 1
        transport = self.transports[req.index % len(self.transports)]
        info = super()._cache_info(req)
        return dataclasses.replace(info, transport=transport)

    def _run_step(self, table: list[tuple[DemoRequest, int, int]], on_progress: Any) -> int:
        finished = super()._run_step(table, on_progress)
        for req, off, _ in table:
            if off == 0 and self.rng.random() < self.abort_rate:
                self.aborted.add(req.rid)
                self.sched.abort(req.rid, "the soak's scheduler aborts it")
        return finished

    def _verify(self, req: DemoRequest) -> bool:
        """Check the request's blocks in the cache they were given in (a KVReady its decode daemon
        sent before it took the new registration is about the old cache, and right)."""
        current, self.dviews = self.dviews, self.views[self.epoch_of.pop(req.rid, len(self.views) - 1)]
        try:
            return super()._verify(req)
        finally:
            self.dviews = current

    def new_decode_caches(self, timeout_s: float = 10.0) -> None:
        """The decode engine restarts: a new cache on every rank (the old ones kept until the end,
        as a dead engine's segments would be, so late writes into them land somewhere harmless)."""
        self.old_caches += self.dcaches
        self.dcaches = [HostKVCache.create(self.shape) for _ in range(self.world)]
        self.dviews = [u64_view(c) for c in self.dcaches]
        self.views.append(self.dviews)
        self.decode.register(self.dcaches, timeout_s)

    def new_engine(self, timeout_s: float = 10.0) -> None:
        """The decode engine dies (its connections close) and a new one registers new caches. What
        it waited for then dies with it: a notice its daemon handed it just before may be lost in
        its socket, which no real engine minds (its successor never reserved those blocks)."""
        self.orphans |= {r.rid for r in self.requests if r.started_at is not None and not r.finished}
        self.decode.close()
        group = self.config.group(self.peer)
        ends = [self.config.endpoint(group, r) for r in range(self.world)]
        self.decode = DecodeEngine(ends, credentials=credentials(self.config))
        self.new_decode_caches(timeout_s)

    def close(self) -> None:
        super().close()
        for c in self.old_caches:
            c.close()
            c.unlink()


class Faults:
    def __init__(
        self, cluster: Cluster, engine: SoakEngine, every_s: float, stop_s: float, cycle: list[str], down_s: float
    ) -> None:
        self.cluster, self.engine = cluster, engine
        self.cycle = cycle
        self.every_s, self.stop_s, self.down_s = every_s, stop_s, down_s
        self.down: float | None = None  # when prefill rank 1, killed and left down, starts again
        self.next_at = time.monotonic() + every_s
        self.count = 0
        self.stopped: tuple[str, float] | None = None  # (daemon, SIGCONT due)
        self.log: list[dict[str, Any]] = []

    def check(self) -> None:
        now = time.monotonic()
        if self.stopped is not None and now >= self.stopped[1]:
            os.kill(self.cluster.daemon(self.stopped[0]).popen.pid, signal.SIGCONT)
            self.stopped = None
        if self.down is not None and now >= self.down:
            self.down = None
            started = time.monotonic()
            self.cluster.restart("prefill-1")
            self.engine.workers[1].register(self.engine.pcaches[1])
            self.log[-1]["restart_s"] = round(time.monotonic() - started, 2)
        if now >= self.next_at and self.stopped is None and self.down is None:
            self.inject(self.cycle[self.count % len(self.cycle)], now)
            self.count += 1
            self.next_at = time.monotonic() + self.every_s
        self.cluster.check(skip=frozenset({"prefill-1"}) if self.down is not None else frozenset())

    def _kill_and_restart(self, name: str) -> float:
        d = self.cluster.daemon(name)
        d.popen.send_signal(signal.SIGKILL)
        d.popen.wait(timeout=10)
        started = time.monotonic()
        self.cluster.restart(name)
        return time.monotonic() - started

    def inject(self, fault: str, now: float) -> None:
        e = self.engine
        record: dict[str, Any] = {"fault": fault, "at_s": round(now - START, 1)}
        if fault == "kill-prefill":
            record["restart_s"] = round(self._kill_and_restart("prefill-1"), 2)
            e.workers[1].register(e.pcaches[1])
        elif fault == "kill-barrier":
            record["restart_s"] = round(self._kill_and_restart("barrier"), 2)
        elif fault == "kill-decode":
            record["restart_s"] = round(self._kill_and_restart("decode-0"), 2)
            e.decode.register_rank(0, e.dcaches[0])  # the engine registers with the new daemon
        elif fault == "stop-prefill":
            os.kill(self.cluster.daemon("prefill-0").popen.pid, signal.SIGSTOP)
            self.stopped = ("prefill-0", now + self.stop_s)
            record["stopped_s"] = self.stop_s
        elif fault == "new-decode":
            e.new_decode_caches()
        elif fault == "kill-barrier-prefill":
            for name in ("barrier", "prefill-1"):
                d = self.cluster.daemon(name)
                d.popen.send_signal(signal.SIGKILL)
                d.popen.wait(timeout=10)
            started = time.monotonic()
            self.cluster.restart("barrier")
            self.cluster.restart("prefill-1")
            record["restart_s"] = round(time.monotonic() - started, 2)
            e.workers[1].register(e.pcaches[1])
        elif fault == "kill-engine":
            e.new_engine()
        elif fault == "down-prefill":
            d = self.cluster.daemon("prefill-1")
            d.popen.send_signal(signal.SIGKILL)
            d.popen.wait(timeout=10)
            self.down = now + self.down_s
            record["down_s"] = self.down_s
        self.log.append(record)


START = time.monotonic()


def outcome_of(req: DemoRequest, engine: SoakEngine) -> str:
    if req.ready_at is not None and not req.verified:
        return "wrong bytes"
    if req.lost == "prefill":
        # decode was told by every rank; some prefill ranks reported and the others never did: a
        # rank that died holding the request, and the scheduler did not end it when its connection closed
        partial = engine.sched.outcome(req.rid)
        if partial is not None and partial.results:
            return "decode told, a dead prefill rank's result missing"
    if req.lost and req.rid in engine.orphans:
        return "its decode engine died"
    if req.lost:
        return "lost"
    if req.prefill_ok and req.verified:
        return "ok"
    return "aborted" if req.rid in engine.aborted else "failed"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--fault-every", type=float, default=30.0, help="seconds between faults (0: none)")
    ap.add_argument(
        "--faults", default=",".join(FAULTS), help=f"comma-separated, injected in turn (of: {', '.join(FAULTS)})"
    )
    ap.add_argument("--transports", default="shm,rdma", help="comma-separated; requests take them in turn")
    ap.add_argument("--abort-rate", type=float, default=0.05)
    ap.add_argument("--lost-s", type=float, default=40.0, help="give up on a request undecided this long")
    ap.add_argument(
        "--warm-s", type=float, default=60.0, help="growth is judged from the first sample after this (warm-up)"
    )
    ap.add_argument("--down-s", type=float, default=60.0, help="how long down-prefill leaves the rank down")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layer-ms", type=float, default=0.5)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--keep", action="store_true", help="keep the run directory (logs)")
    args = ap.parse_args()

    config, config_path, run_dir = prepare(loads(CONFIG), "kvx-soak-")
    cluster = Cluster(config, config_path, run_dir, "WARNING")
    prefill, decode = config.group(role="prefill"), config.group(role="decode")
    transports = [t for t in args.transports.split(",") if t]
    cycle = [f for f in args.faults.split(",") if f]
    unknown = sorted(set(cycle) - set(FAULTS))
    if unknown or not cycle:
        ap.error(f"--faults: unknown {unknown}; choose from {', '.join(FAULTS)}")
    outcomes: Counter[str] = Counter()
    by_fault: list[Counter[str]] = []
    examples: dict[str, list[str]] = {}
    rss: dict[str, dict[str, int | None]] = {}
    tables: dict[str, Any] = {}
    problem = None
    codes: dict[str, int] = {}
    engine: SoakEngine | None = None
    faults: Faults | None = None
    started = time.monotonic()
    stop_s = config.barrier.timeout_s + 1.0
    try:
        cluster.start(60.0)
        engine = SoakEngine(
            config,
            prefill,
            decode,
            seed=args.seed,
            transport="auto",
            layer_s=args.layer_ms / 1e3,
            transports=transports,
            abort_rate=args.abort_rate,
        )
        engine.lost_s = args.lost_s
        engine.register()
        faults = Faults(cluster, engine, args.fault_every or float("inf"), stop_s, cycle, args.down_s)
        started = time.monotonic()
        end = started + args.minutes * 60

        def sample(when: str) -> None:
            for d in cluster.daemons:
                entry = rss.setdefault(d.name, {"series_kib": []})
                kib = memory_kib(d.popen.pid)
                entry["pid"] = d.popen.pid
                if when == "first":
                    entry["first_pid"], entry["first_kib"] = d.popen.pid, kib
                elif when == "last":
                    entry["last_kib"] = kib
                if entry.get("first_pid") == d.popen.pid and kib is not None:
                    # one sample per round, same process only
                    entry["series_kib"].append({**kib, "t": round(time.monotonic() - started, 1)})

        def ended(req: DemoRequest) -> None:
            what = outcome_of(req, engine)  # type: ignore[arg-type]
            outcomes[what] += 1
            while len(by_fault) <= len(faults.log):  # by_fault[k]: ended after k faults
                by_fault.append(Counter())
            by_fault[len(faults.log)][what] += 1
            if what != "ok" and req.failure and len(examples.setdefault(what, [])) < 3:
                examples[what].append(f"{req.rid}: {req.failure}")
            elif what == "wrong bytes" and len(examples.setdefault(what, [])) < 3:  # (no failure to quote)
                ready_s = round((req.ready_at or 0.0) - started, 2)
                examples[what].append(
                    f"{req.rid}: KVReady at {ready_s}s after {len(faults.log)} faults, transports "
                    f"{sorted(t for t in req.transports if t)}, decode blocks {list(req.dst)[:16]}"
                )

        warm = False
        while time.monotonic() < end:
            engine.plan(ROUND)
            engine.run(end + 4 * args.lost_s, ended, faults.check)
            engine.forget()
            sample("round" if warm else "first")  # the first after one round: caches mapped, imports done
            warm = True
        if faults.stopped is not None:
            os.kill(cluster.daemon(faults.stopped[0]).popen.pid, signal.SIGCONT)
        faults.next_at = float("inf")  # no fault after the last round
        if faults.down is not None:  # the soak ended while prefill rank 1 was down: it starts again
            faults.down = time.monotonic()
            faults.check()
        sample("last")
        # every table empties once the remembered endings expire
        keys = credentials(config)
        idle_by = time.monotonic() + config.timeouts.pending_s + config.timeouts.verdict_s + 10
        for r in range(prefill.world_size):
            while True:
                reply = status(config.endpoint(prefill, r), 10.0, credentials=keys)
                tables[f"prefill-{r}"] = json.loads(reply.report)["tables"]
                if not any(tables[f"prefill-{r}"].values()) or time.monotonic() > idle_by:
                    break
                engine.decode.collect(0.5)
    except Exception as exc:  # the report says what went wrong; exit 1
        problem = f"{type(exc).__name__}: {exc}"
    finally:
        if engine is not None:
            engine.close()
        codes = cluster.stop()
        if args.keep or problem or outcomes["wrong bytes"]:  # (the daemons' logs, to find out why)
            print(f"run dir: {run_dir}", file=sys.stderr)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)

    # per daemon and measure (rss, private, shared), in percent: from the first sample of the same
    # process to the last, and from the first after --warm-s (transports' pools filled, the
    # remembered endings at their steady size) to the last
    # warm: once every fault of the cycle happened once, and the window after the first fault of
    # the next cycle passed (each bounded table has then met its worst case: a prefill rank down
    # for a minute fails thousands of requests, and the notices of their failures fill a decode
    # daemon's memory of notices seen), or after --warm-s, whichever is later
    warm_from = args.warm_s
    if faults is not None and args.fault_every > 0 and len(faults.log) > len(cycle):
        next_cycle = faults.log[len(cycle)]["at_s"] - (started - START)  # (on the samples' clock)
        warm_from = max(warm_from, next_cycle + args.fault_every)
    growth: dict[str, dict[str, float]] = {}
    second_half: dict[str, dict[str, float]] = {}  # "warm": from the first sample after warm_from
    for name, entry in rss.items():
        series = entry["series_kib"]
        if entry.get("first_pid") != entry.get("pid") or len(series) < 2:
            continue  # restarted during the soak: its first sample is gone with it
        first, last = series[0], series[-1]
        warm_at = next((x for x in series if x["t"] >= warm_from), series[len(series) // 2])
        growth[name] = {m: round(100.0 * (last[m] - first[m]) / max(first[m], 1), 2) for m in MEMORY.values()}
        second_half[name] = {m: round(100.0 * (last[m] - warm_at[m]) / max(warm_at[m], 1), 2) for m in MEMORY.values()}
        entry["warm_t"] = warm_at["t"]
    # the leak measure: RSS once warm, of the daemons never restarted (private memory is printed
    # beside it: a few MB, so one-time pools show as large percentages of it)
    full = {n: second_half[n]["rss"] if n in growth else None for n in STEADY}
    failed_checks = []
    if outcomes["wrong bytes"]:
        failed_checks.append(f"{outcomes['wrong bytes']} KVReady with wrong bytes")
    if problem:
        failed_checks.append(problem)
    if any(c != 0 for c in codes.values()):
        failed_checks.append(f"daemons did not exit cleanly: {codes}")
    if any(any(t.values()) for t in tables.values()) or not tables:
        failed_checks.append(f"tables not empty at the end: {tables}")
    if any(g is None or g >= 5.0 for g in full.values()):
        failed_checks.append(f"RSS growth once warm of the unrestarted daemons (%): {full}")
    report = {
        "minutes": args.minutes,
        "transports": transports,
        "requests": sum(outcomes.values()),
        "outcomes": dict(outcomes),
        "faults": faults.log if faults is not None else [],
        "after_each_fault": [dict(c) for c in by_fault],
        "examples": examples,
        "tables": tables,
        "rss": rss,
        "rss_growth_pct": growth,
        "rss_growth_warm_pct": second_half,
        "exit_codes": codes,
        "passed": not failed_checks,
        "problems": failed_checks,
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"soak          {args.minutes:g} min, transports {', '.join(transports)}")
        print(f"requests      {report['requests']}  " + ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items())))
        for i, rec in enumerate(report["faults"]):
            after = by_fault[i + 1] if i + 1 < len(by_fault) else Counter()
            print(f"fault {i:<3}     {json.dumps(rec)} -> until the next: {dict(after)}")
        for what, lines in examples.items():
            for line in lines:
                print(f"{what:<13} {line[:300]}")
        for name, t in tables.items():
            print(f"tables        {name}: {t}")
        for name, entry in sorted(rss.items()):
            series = entry["series_kib"]
            if name not in growth:
                last = entry.get("last_kib") or {}
                print(f"memory        {name}: restarted during the soak; RSS {last.get('rss')} KiB at the end")
                continue
            for m in MEMORY.values():
                print(
                    f"memory        {name} {m:<8} {series[0][m]:>7} -> {series[-1][m]:>7} KiB over {len(series)} "
                    f"samples: {growth[name][m]:+6.2f} % (from {entry['warm_t']:g} s: {second_half[name][m]:+.2f} %)"
                )
        print(f"exit codes    {codes}")
        print("PASSED" if not failed_checks else "FAILED: " + "; ".join(failed_checks))
    return 0 if not failed_checks else 1


if __name__ == "__main__":
    sys.exit(main())
