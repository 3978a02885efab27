#!/usr/bin/env python3
"""kvxferd against the bare mechanism it drives, same runs, same run: `make bench`.

For each transport and each run size (16 KiB to 4 MiB of consecutive blocks), the same
requests' blocks are moved twice, alternating, several times:

* raw: shm -> numpy.copyto between two mapped caches in this process; rdma -> NIXL called
  directly, the fastest plain way: per-block descriptor lists prepared once, transfer indices
  computed before the clock starts, every WRITE posted and then polled in a tight loop, tried
  both as one transfer per layer of each request and as one per request (all its layers), the
  faster of the two kept as the baseline; to an agent in a second process set up exactly like
  kvxferd's decode side;
* kvxferd: a real barrier service, prefill daemon and decode daemon (separate processes);
  the bench plays the engines, and the time runs from the first cache_info sent to the
  last TransferResult received, so it includes the control plane (ZMQ, the core, the
  barrier round trip per request).

It prints median GB/s of each and their ratio (targets: rdma >= 0.9x, shm >= 0.8x).
Bytes count K and V of every layer. This machine's timing noise applies to both sides alike.
Last, it times one request of one block through kvxferd, alone: the fixed cost of a request
(control messages, the admission round, a write per layer, the completion round, results),
which the throughput rows amortise over 256 MiB requests; and the same request already
admitted when its layer signals come, alternating with the first, so the difference is what
the admission round adds when it is on the critical path (in a real forward pass it overlaps
the compute of the layers before the first one is written).

Then short prompts (``--short``): one one-block request alone (from its cache_info to the decode
engine's KVReady, and to prefill's ok result, which waits for decode's confirmation: each against
a bare pair passing as many messages), steps of 8 one-block requests, and
steps of 8 64-token prompts streamed (the next step's cache_infos and signals sent without waiting
for the last one's results, at most 4 steps in flight: the largest step rate sustained), through
the daemons over shm, each against its bare lower bound measured in the same run: the same number
of control messages through one CURVE-authenticated ZMQ pair in one process, and the same bytes
copied with numpy (issue 25's targets: one request within 3x, steps at least 0.4x as many requests
per second). Last, a short request's layer-0 signal to its bytes in the decode cache while a
256 MiB request moves (its first bytes seen at decode first), against idle (p99; target within
2x); and sent right behind that request's 32 layer signals (taking those in comes first).

Then groups of different sizes (``--maps``): the same requests of the whole model (all its KV
heads) moved from 2 prefill ranks into 2 decode ranks, then into 4 (each prefill rank writes a
slice of every block into two decode ranks), then from 4 prefill ranks into 2 (two writers per
decode block), alternating, through real daemons over the transport; the rows give each map's
rate against 2 -> 2 on the same bytes (target >= 0.9x).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kvxferd.client import DecodeEngine, PrefillScheduler, PrefillWorker, credentials, status
from kvxferd.config import Config, GroupConfig, TransportConfig, dump, loads
from kvxferd.demo.launch import Cluster
from kvxferd.kvcache import HostKVCache, KVShape
from kvxferd.protocol import CacheInfo, SlotChunk

LAYERS, HEADS, TOKENS, DIM = 32, 8, 16, 64  # a Llama-3-8B-like rank: 32 layers, bf16 16 KiB blocks
BLOCK = HEADS * TOKENS * DIM * 2
PER_REQUEST = 256  # blocks: 4 MiB per layer per K (or V)
REQUESTS = 4
SHAPE = KVShape(LAYERS, PER_REQUEST * REQUESTS, HEADS, TOKENS, DIM, "bfloat16")
TARGETS = {"shm": 0.8, "rdma": 0.9}


def plan(run_blocks: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """Per request (src, dst): source blocks consecutive, destination in shuffled runs of ``run_blocks``."""
    per = PER_REQUEST // run_blocks
    order = np.random.default_rng(seed).permutation(SHAPE.num_blocks // run_blocks)  # every run once
    out = []
    for r in range(REQUESTS):
        src = list(range(r * PER_REQUEST, (r + 1) * PER_REQUEST))
        dst = [int(c) * run_blocks + i for c in order[r * per : (r + 1) * per] for i in range(run_blocks)]
        out.append((src, dst))
    return out


def runs_of(src: list[int], dst: list[int], run_blocks: int) -> list[tuple[int, int, int]]:
    return [(src[i], dst[i], run_blocks) for i in range(0, len(src), run_blocks)]


TOTAL = REQUESTS * PER_REQUEST * BLOCK * 2 * LAYERS


# -- raw baselines ----------------------------------------------------------------------------


def raw_shm(work: list[tuple[list[int], list[int]]], run_blocks: int, src: HostKVCache, dst: HostKVCache) -> float:
    s, d = src.raw(), dst.raw()
    t = time.perf_counter()
    for sb, db in work:
        runs = runs_of(sb, db, run_blocks)
        for layer in range(LAYERS):
            for kv in (0, 1):
                for a, b, n in runs:
                    np.copyto(d[layer, kv, b : b + n], s[layer, kv, a : a + n])
    return TOTAL / (time.perf_counter() - t) / 1e9


class RawNixl:
    """NIXL without kvxferd: our process initiates, a second process is the target."""

    def __init__(self, src: HostKVCache, config: TransportConfig) -> None:
        from kvxferd.transports import rdma  # only for the shared env/agent set-up, so both sides match

        self.nixl, _ = rdma._load(config)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--nixl-target"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        md_hex, addr = self.proc.stdout.readline().split()
        self.agent = rdma._agent(self.nixl, "raw-init", config, progress_thread=False)
        view = src.raw()
        self.reg = self.agent.register_memory([(view.ctypes.data, view.nbytes, 0, "")], "DRAM")
        self.remote = self.agent.add_remote_agent(bytes.fromhex(md_hex))
        rows = lambda base: np.array(  # noqa: E731
            [[base + r * SHAPE.region_bytes, BLOCK, 0, BLOCK, SHAPE.num_blocks] for r in range(LAYERS * 2)],
            dtype=np.uint64,
        )
        self.local = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", rows(view.ctypes.data), "DRAM")
        self.peer = self.agent.prep_xfer_dlist(self.remote, rows(int(addr)), "DRAM")

    def run(self, work: list[tuple[list[int], list[int]]], *, per_request: bool = False) -> float:
        """The fastest plain way to move ``work`` with NIXL: descriptor lists prepared once, the
        indices of a transfer computed before the clock starts, every transfer posted, then polled
        in a tight loop (no sleep). ``per_request``: one transfer per request (every layer's
        blocks in it), else one per layer of each request."""
        posts = []
        for sb, db in work:
            s, d = np.asarray(sb), np.asarray(db)
            per_layer = []
            for layer in range(LAYERS):
                base = 2 * layer * SHAPE.num_blocks
                li = np.concatenate([base + s, base + SHAPE.num_blocks + s])
                ri = np.concatenate([base + d, base + SHAPE.num_blocks + d])
                per_layer.append((li, ri))
            if per_request:
                per_layer = [(np.concatenate([li for li, _ in per_layer]), np.concatenate([ri for _, ri in per_layer]))]
            posts += per_layer
        t = time.perf_counter()
        handles = []
        for li, ri in posts:
            h = self.agent.make_prepped_xfer("WRITE", self.local, li, self.peer, ri, b"")
            self.agent.transfer(h)
            handles.append(h)
        while handles:
            busy = []
            for h in handles:
                state = self.agent.check_xfer_state(h)
                if state == "PROC":
                    busy.append(h)
                elif state == "DONE":
                    h.release()
                else:
                    raise RuntimeError(f"raw NIXL write failed: {state}")
            handles = busy
        return TOTAL / (time.perf_counter() - t) / 1e9

    def close(self) -> None:
        self.local.release()
        self.peer.release()
        self.agent.remove_remote_agent(self.remote)
        self.agent.deregister_memory(self.reg)
        self.agent = None
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def nixl_target() -> None:
    from kvxferd.transports import rdma

    nixl, _ = rdma._load(TransportConfig())
    agent = rdma._agent(nixl, "raw-target", TransportConfig(), progress_thread=True)
    buf = np.ones(SHAPE.nbytes, dtype=np.uint8)  # touched, like a populated cache
    agent.register_memory([(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM")
    print(agent.get_agent_metadata().hex(), buf.ctypes.data, flush=True)
    sys.stdin.read()


# -- through kvxferd ----------------------------------------------------------------------------


def start(transport: str, p: int, d: int, blocks: int) -> tuple[Path, Config, Cluster]:
    """A barrier service, ``p`` prefill and ``d`` decode ranks of the bench's model (``blocks``
    blocks a cache) preferring ``transport``, running in a run directory of their own."""
    run_dir = Path(tempfile.mkdtemp(prefix="kvx-", dir="/tmp"))
    base = loads(
        f"kv: {{num_layers: {LAYERS}, kv_heads: {HEADS}, head_dim: {DIM}, block_tokens: {TOKENS}, "
        f"num_blocks: {blocks}, dtype: bfloat16}}\ntransport: {{prefer: {transport}}}"
    )
    groups = (
        GroupConfig("prefill", "prefill", p, "ipc://{run_dir}/p{rank}.sock"),
        GroupConfig("decode", "decode", d, "ipc://{run_dir}/d{rank}.sock"),
    )
    config = dataclasses.replace(base, run_dir=str(run_dir), groups=groups)
    path = run_dir / "config.yaml"
    path.write_text(dump(config))
    cluster = Cluster(config, path, run_dir, os.environ.get("BENCH_LOG", "WARNING"))
    cluster.start(60)
    return run_dir, config, cluster


class Deployment:
    def __init__(self, transport: str) -> None:
        self.run_dir, self.config, self.cluster = start(transport, 1, 1, SHAPE.num_blocks)
        p, d = self.config.groups
        self.src, self.dst = HostKVCache.create(SHAPE), HostKVCache.create(SHAPE)
        self.creds = credentials(self.config)
        self.dec = DecodeEngine([self.config.endpoint(d, 0)], credentials=self.creds)
        self.dec.register([self.dst])
        self.worker = PrefillWorker(self.config.endpoint(p, 0), credentials=self.creds)
        self.worker.register(self.src)
        self.sched = PrefillScheduler([self.config.endpoint(p, 0)], credentials=self.creds)
        self.peer = d.name
        self.transport = transport
        self.step = 0
        self.seq = 0
        # how long a job that could write waited for its admission, as the prefill daemon measured it
        self.held_ms: list[float] = []
        # the last ``seconds`` call's time to the decode engine's last KVReady
        self.ready_s = 0.0

    def run(self, work: list[tuple[list[int], list[int]]]) -> float:
        """Move ``work`` through the daemons; returns GB/s."""
        return sum(len(sb) for sb, _ in work) * BLOCK * 2 * LAYERS / self.seconds(work) / 1e9

    def seconds(self, work: list[tuple[list[int], list[int]]], *, admitted_first: bool = False) -> float:
        """From the first cache_info sent to the last TransferResult received (and, in
        ``ready_s``, to the decode engine's last KVReady).

        ``admitted_first``: send the cache_infos, wait (untimed) until the barrier admitted
        them, and time from the first layer signal instead: the admission round off the
        critical path, as when a cache_info comes a little before its step is computed.
        """
        self.step += 1
        ids = []
        t = time.perf_counter()
        for slot, (sb, db) in enumerate(work):
            self.seq += 1
            rid = f"b{self.seq}"
            ids.append(rid)
            tokens, gens = len(sb) * TOKENS, tuple(self.dec.generations)
            info = CacheInfo(
                rid, slot, self.step, tokens, tuple(sb), tuple(db), self.peer, self.transport, dst_generations=gens
            )
            self.sched.submit(info)
        if admitted_first:
            self.wait_admitted(len(ids))
            t = time.perf_counter()
        slots = [SlotChunk(slot, 0, len(sb) * TOKENS, self.step) for slot, (sb, _) in enumerate(work)]
        for layer in range(LAYERS):
            self.worker.layer_ready(self.step, layer, slots if layer == 0 else ())
        for rid in ids:  # (KVReady comes first: decode confirms it, then prefill reports ok)
            if not self.dec.wait(rid, 60.0).ready:
                raise RuntimeError(f"{rid}: decode was not told KVReady")
        self.ready_s = time.perf_counter() - t
        for rid in ids:
            out = self.sched.wait(rid, 60.0)
            if not out.ok:
                raise RuntimeError(f"{rid}: {out.results}")
            if not admitted_first:  # admission after the job's recovery held its first write back
                result = out.results[0]
                self.held_ms.append(max(0.0, result.admit_ms - result.wait_ms))
        return time.perf_counter() - t

    def stream(self, work: list[tuple[list[int], list[int]]], steps: int, depth: int) -> float:
        """Steps of ``work`` sent back to back, as an engine whose next step does not wait for the
        last one's transfers: cache_infos and layer signals of a step go as soon as the one before
        is out, at most ``depth`` steps in flight (then the oldest one's results are awaited).
        Returns steps per second."""
        inflight: collections.deque[list[str]] = collections.deque()
        t = time.perf_counter()
        for s in range(steps):
            self.step += 1
            base = (s % depth) * len(work)  # slots of the steps in flight never overlap
            ids = []
            for i, (sb, db) in enumerate(work):
                self.seq += 1
                ids.append(f"s{self.seq}")
                tokens, gens = len(sb) * TOKENS, tuple(self.dec.generations)
                info = CacheInfo(
                    ids[-1], base + i, self.step, tokens, tuple(sb), tuple(db), self.peer, "shm", dst_generations=gens
                )
                self.sched.submit(info)
            slots = [SlotChunk(base + i, 0, len(sb) * TOKENS, self.step) for i, (sb, _) in enumerate(work)]
            for layer in range(LAYERS):
                self.worker.layer_ready(self.step, layer, slots if layer == 0 else ())
            inflight.append(ids)
            while len(inflight) >= depth or (s == steps - 1 and inflight):
                for rid in inflight.popleft():
                    out = self.sched.wait(rid, 60.0)
                    if not out.ok:
                        raise RuntimeError(f"{rid}: {out.results}")
        elapsed = time.perf_counter() - t
        self.dec.collect(0.0)  # (what decode told its engine: not waited for)
        return steps / elapsed

    def wait_admitted(self, count: int) -> None:
        endpoint = self.config.endpoint(self.config.groups[0], 0)
        deadline = time.monotonic() + 30.0
        while True:
            requests = json.loads(status(endpoint, credentials=self.creds).report)["requests"]
            if len(requests) == count and all(r["admitted"] for r in requests):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"requests not admitted within 30s: {requests}")

    def close(self) -> None:
        for c in (self.worker, self.sched, self.dec):
            c.close()
        self.cluster.stop()
        for cache in (self.src, self.dst):
            cache.close()
            cache.unlink()
        shutil.rmtree(self.run_dir, ignore_errors=True)


# -- short prompts ------------------------------------------------------------------------------

#: control messages of one request through kvxferd, beyond its layer signals: its cache_info, the
#: admission (Admit, Admitted) and completion (Arrive, Release) rounds, the KVReady to decode, the
#: engine's KVReady (to there: READY_MESSAGES), decode's Received, the result
PER_REQUEST_MESSAGES = 9
READY_MESSAGES = 7
#: steps in flight at most when steps are streamed (an engine's next step does not wait for the last)
STREAM_DEPTH = 4


class BareControl:
    """The lower bound of the control plane: messages through one CURVE DEALER -> ROUTER pair in one
    process (all sent, then all received: ZMQ's own pipelining, no round trip per message), and the
    same bytes copied with numpy."""

    def __init__(self) -> None:
        import zmq

        from kvxferd import security

        self.run_dir = Path(tempfile.mkdtemp(prefix="kvx-", dir="/tmp"))
        config = dataclasses.replace(loads(""), run_dir=str(self.run_dir))
        creds = security.credentials(config, "daemon")
        self.ctx = zmq.Context()
        self.auth = security.authenticator(self.ctx, creds)
        self.server = self.ctx.socket(zmq.ROUTER)
        creds.server(self.server, "engine")
        self.server.bind(f"ipc://{self.run_dir}/bare.sock")
        self.client = self.ctx.socket(zmq.DEALER)
        security.credentials(config, "engine").client(self.client)
        self.client.connect(f"ipc://{self.run_dir}/bare.sock")
        self.client.send(b"hello")
        self.server.recv_multipart()  # the handshake is done: what follows is timed
        from kvxferd.protocol import LayerSignal, encode

        self.frame = encode(LayerSignal(1, 0, ()))
        shape = KVShape(LAYERS, 64, HEADS, TOKENS, DIM, "bfloat16")
        self.src, self.dst = HostKVCache.create(shape), HostKVCache.create(shape)

    def seconds(self, requests: int, blocks: int = 1, per_request: int = PER_REQUEST_MESSAGES) -> float:
        """``requests`` requests of ``blocks`` blocks in a step: their messages (``per_request`` each
        besides the layer signals) and their bytes."""
        messages = LAYERS + per_request * requests
        s, d = self.src.raw(), self.dst.raw()
        t = time.perf_counter()
        for _ in range(messages):  # sent as they come, received as they arrive (no round trip each)
            self.client.send(self.frame)
        for _ in range(messages):
            self.server.recv_multipart()
        for r in range(0, requests * blocks, blocks):
            for layer in range(LAYERS):
                for kv in (0, 1):
                    np.copyto(d[layer, kv, r : r + blocks], s[layer, kv, r : r + blocks])
        return time.perf_counter() - t

    def close(self) -> None:
        self.client.close(0)
        self.server.close(0)
        self.auth.stop()  # type: ignore[attr-defined]
        self.ctx.term()
        for cache in (self.src, self.dst):
            cache.close()
            cache.unlink()
        shutil.rmtree(self.run_dir, ignore_errors=True)


def daemon_cpu_ns(dep: Deployment) -> dict[str, int]:
    """CPU time each daemon used so far, every thread (its I/O threads too), in ns: the first field
    of /proc/PID/task/TID/schedstat (a finer count than the ticks of /proc/PID/stat)."""
    used: dict[str, int] = {}
    for daemon in dep.cluster.daemons:
        task = Path(f"/proc/{daemon.popen.pid}/task")
        total = 0
        for tid in task.iterdir() if task.exists() else ():
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int((tid / "schedstat").read_text().split()[0])
        used[daemon.name] = total
    return used


def _charge(totals: dict[str, int], dep: Deployment, before: dict[str, int]) -> None:
    for name, ns in daemon_cpu_ns(dep).items():
        totals[name] = totals.get(name, 0) + ns - before.get(name, ns)


def bench_short(repeat: int) -> list[dict[str, Any]]:
    """One one-block request alone, and steps of 8, through kvxferd (shm) and bare, alternating;
    with each daemon's CPU time per request on the way."""
    dep, bare = Deployment("shm"), BareControl()
    try:
        one = [(sb[:1], db[:1]) for sb, db in plan(1, seed=0)][:1]
        eight = [([i], [100 + i]) for i in range(8)]
        dep.seconds(one)  # warm-up
        dep.seconds(eight)
        bare.seconds(1)
        ours1, bare1, ready1, bare_ready1, ours8, bare8 = [], [], [], [], [], []
        cpu1: dict[str, int] = {}
        cpu8: dict[str, int] = {}
        for _ in range(max(repeat, 20)):
            before = daemon_cpu_ns(dep)
            ours1.append(dep.seconds(one))
            _charge(cpu1, dep, before)
            ready1.append(dep.ready_s)
            bare1.append(bare.seconds(1))
            bare_ready1.append(bare.seconds(1, per_request=READY_MESSAGES))
            before = daemon_cpu_ns(dep)
            ours8.append(dep.seconds(eight))
            _charge(cpu8, dep, before)
            bare8.append(bare.seconds(8))
        # 64-token prompts (4 blocks), steps of 8 streamed: the largest step rate sustained
        prompts = [(list(range(4 * i, 4 * i + 4)), list(range(200 + 4 * i, 204 + 4 * i))) for i in range(8)]
        dep.stream(prompts, 20, STREAM_DEPTH)  # warm-up
        streamed = [dep.stream(prompts, 50, STREAM_DEPTH) for _ in range(3)]
        bare_streamed = [1 / statistics.median(bare.seconds(8, 4) for _ in range(50)) for _ in range(3)]
    finally:
        bare.close()
        dep.close()
    one_ms, bare_ms = statistics.median(ours1) * 1e3, statistics.median(bare1) * 1e3
    ready_ms, bare_ready_ms = statistics.median(ready1) * 1e3, statistics.median(bare_ready1) * 1e3
    rate, bare_rate = 8 / statistics.median(ours8), 8 / statistics.median(bare8)
    row: dict[str, Any] = {"short": True, "one_ms": one_ms, "bare_ms": bare_ms, "rate": rate, "bare_rate": bare_rate}
    row["ready_ms"], row["bare_ready_ms"] = ready_ms, bare_ready_ms
    row["steps64"], row["bare_steps64"] = max(streamed), max(bare_streamed)
    row["cpu_us_one"] = {name: ns / 1e3 / len(ours1) for name, ns in sorted(cpu1.items())}
    row["cpu_us_eight"] = {name: ns / 1e3 / (8 * len(ours8)) for name, ns in sorted(cpu8.items())}
    print(
        f"  short: one request, KVReady {ready_ms:.2f} ms vs bare {bare_ready_ms:.2f} ms "
        f"({ready_ms / bare_ready_ms:.1f}x), result {one_ms:.2f} ms vs bare {bare_ms:.2f} ms "
        f"({one_ms / bare_ms:.1f}x); steps of 8: "
        f"{rate:.0f} req/s vs bare {bare_rate:.0f} ({rate / bare_rate:.2f}x)",
        file=sys.stderr,
    )
    return [row]


# -- a signal while a large request moves -------------------------------------------------------

BIG_BLOCKS = 256  # the large request: 256 blocks x 32 layers x K,V x 16 KiB = 256 MiB
PROBE_BLOCK = SHAPE.num_blocks - 1  # the short request's one block (source and destination)


#: what else the daemon does when a short request's layer 0 is signalled: nothing; moving a 256 MiB
#: request (its first bytes are seen at decode before the short one is signalled); or taking in that
#: request's 32 layer signals, sent just before the short one's
IDLE, MOVING, TOGETHER = "idle", "moving", "together"


def signal_to_landed(dep: Deployment, busy: str, mark: int) -> float:
    """Seconds from a short request's layer-0 signal to its bytes in the decode cache (its write is
    small: copied when posted), with a 256 MiB request as ``busy`` says (IDLE: none). Both
    requests are admitted before anything is signalled."""
    big_step, dep.step = dep.step + 1, dep.step + 2
    small_step = dep.step
    gens = tuple(dep.dec.generations)
    ids = []
    if busy != IDLE:
        blocks = tuple(range(BIG_BLOCKS))
        ids.append(f"big{mark}")
        dep.sched.submit(
            CacheInfo(ids[-1], 0, big_step, BIG_BLOCKS * TOKENS, blocks, blocks, dep.peer, "shm", dst_generations=gens)
        )
    ids.append(f"probe{mark}")
    one = (PROBE_BLOCK,)
    dep.sched.submit(CacheInfo(ids[-1], 1, small_step, TOKENS, one, one, dep.peer, "shm", dst_generations=gens))
    dep.wait_admitted(len(ids))
    src, dst = dep.src.raw()[0, :, PROBE_BLOCK], dep.dst.raw()[0, :, PROBE_BLOCK]
    src[:] = mark % 251 + 1
    dst[:] = 0
    first_src, first_dst = dep.src.raw()[0, 0, 0], dep.dst.raw()[0, 0, 0]  # the large request's first block
    first_src[:], first_dst[:] = mark % 251 + 1, 0
    if busy != IDLE:
        for layer in range(LAYERS):
            dep.worker.layer_ready(
                big_step, layer, [SlotChunk(0, 0, BIG_BLOCKS * TOKENS, big_step)] if layer == 0 else ()
            )
    if busy == MOVING:
        _until(lambda: np.array_equal(first_dst, first_src), "the large request's first block never landed")
    t = time.perf_counter()
    dep.worker.layer_ready(small_step, 0, [SlotChunk(1, 0, TOKENS, small_step)])
    _until(lambda: np.array_equal(dst, src), "the short request's layer 0 never landed")
    landed = time.perf_counter() - t
    for layer in range(1, LAYERS):
        dep.worker.layer_ready(small_step, layer)
    for rid in ids:
        out = dep.sched.wait(rid, 60.0)
        if not out.ok:
            raise RuntimeError(f"{rid}: {out.results}")
        dep.dec.wait(rid, 60.0)
    return landed


def _until(done: Callable[[], bool], failure: str) -> None:
    """Wait for ``done`` (checked every ~0.1 ms: a spinning check would take one of this host's two
    cores from the daemons' threads), at most 10 s."""
    deadline = time.perf_counter() + 10.0
    while not done():
        if time.perf_counter() > deadline:
            raise RuntimeError(failure)
        time.sleep(20e-6)


def bench_inflight(samples: int) -> list[dict[str, Any]]:
    """p99 of a layer signal to its bytes landing: idle, while 256 MiB move, and right behind that
    request's signals, in turn."""
    dep = Deployment("shm")
    try:
        signal_to_landed(dep, MOVING, 0)  # warm-up
        times: dict[str, list[float]] = {IDLE: [], MOVING: [], TOGETHER: []}
        for i in range(samples):
            for k, busy in enumerate(times):
                times[busy].append(signal_to_landed(dep, busy, 3 * i + k + 1))
    finally:
        dep.close()
    row: dict[str, Any] = {"inflight": True, "samples": samples}
    for busy, xs in times.items():
        row[f"{busy}_p99_ms"] = float(np.percentile(xs, 99)) * 1e3
        row[f"{busy}_p50_ms"] = statistics.median(xs) * 1e3
    print(
        "  signal -> landed: "
        + "; ".join(f"{b} p50 {row[f'{b}_p50_ms']:.2f} p99 {row[f'{b}_p99_ms']:.2f} ms" for b in times),
        file=sys.stderr,
    )
    return [row]


# -- groups of different sizes ----------------------------------------------------------------

MAP_BLOCKS = 256  # blocks per request in the map rows (the model's whole KV: every head)
MAP_SHAPES = ((2, 2), (2, 4), (4, 2))  # (prefill ranks, decode ranks); the first is the baseline


class MapDeployment:
    """A barrier service, ``p`` prefill ranks and ``d`` decode ranks (HEADS heads in all)."""

    def __init__(self, p: int, d: int, transport: str) -> None:
        self.run_dir, self.config, self.cluster = start(transport, p, d, MAP_BLOCKS * REQUESTS)
        pg, dg = self.config.groups
        pshape, dshape = KVShape.from_config(self.config, p), KVShape.from_config(self.config, d)
        self.src = [HostKVCache.create(pshape) for _ in range(p)]
        self.dst = [HostKVCache.create(dshape) for _ in range(d)]
        for cache in self.src:
            cache.raw()[:] = 3
        self.creds = credentials(self.config)
        self.dec = DecodeEngine([self.config.endpoint(dg, r) for r in range(d)], credentials=self.creds)
        self.dec.register(self.dst)
        self.workers = [PrefillWorker(self.config.endpoint(pg, r), credentials=self.creds) for r in range(p)]
        for worker, cache in zip(self.workers, self.src, strict=True):
            worker.register(cache)
        self.sched = PrefillScheduler([self.config.endpoint(pg, r) for r in range(p)], credentials=self.creds)
        self.transport, self.step, self.seq = transport, 0, 0

    def seconds(self) -> float:
        """REQUESTS requests of MAP_BLOCKS blocks, from the first cache_info to the last result."""
        self.step += 1
        ids = []
        t = time.perf_counter()
        gens = tuple(self.dec.generations)
        for slot in range(REQUESTS):
            self.seq += 1
            ids.append(rid := f"m{self.seq}")
            blocks = tuple(range(slot * MAP_BLOCKS, (slot + 1) * MAP_BLOCKS))
            info = CacheInfo(
                rid, slot, self.step, MAP_BLOCKS * TOKENS, blocks, blocks, "decode", self.transport,
                dst_generations=gens,
            )  # fmt: skip
            self.sched.submit(info)
        slots = [SlotChunk(slot, 0, MAP_BLOCKS * TOKENS, self.step) for slot in range(REQUESTS)]
        for layer in range(LAYERS):
            for worker in self.workers:
                worker.layer_ready(self.step, layer, slots if layer == 0 else ())
        for rid in ids:
            out = self.sched.wait(rid, 60.0)
            if not out.ok:
                raise RuntimeError(f"{rid}: {out.results}")
        elapsed = time.perf_counter() - t
        for rid in ids:
            if not self.dec.wait(rid, 60.0).ready:
                raise RuntimeError(f"{rid}: not ready at decode")
        return elapsed

    def close(self) -> None:
        for c in (*self.workers, self.sched, self.dec):
            c.close()
        self.cluster.stop()
        for cache in self.src + self.dst:
            cache.close()
            cache.unlink()
        shutil.rmtree(self.run_dir, ignore_errors=True)


def bench_maps(transport: str, repeat: int) -> list[dict[str, Any]]:
    """Each map against 2 -> 2 on the same bytes, the deployments measured in turn."""
    deps = []
    try:
        for p, d in MAP_SHAPES:
            deps.append(MapDeployment(p, d, transport))
        times: list[list[float]] = [[] for _ in deps]
        for dep in deps:
            dep.seconds()  # warm-up, untimed
        for _ in range(repeat):
            for i, dep in enumerate(deps):
                times[i].append(dep.seconds())
    finally:
        for dep in deps:
            dep.close()
    total = REQUESTS * MAP_BLOCKS * BLOCK * 2 * LAYERS  # every head of the model, K and V
    rates = [total / statistics.median(t) / 1e9 for t in times]
    rows = []
    for (p, d), rate in zip(MAP_SHAPES, rates, strict=True):
        rows.append({"transport": transport, "map": f"{p}->{d}", "gbps": rate, "ratio": rate / rates[0]})
        print(f"  {transport:5s} {p}->{d}  {rate:6.2f} GB/s  {rate / rates[0]:5.2f}x of 2->2", file=sys.stderr)
    return rows


# -- driver ------------------------------------------------------------------------------------


def bench(transport: str, sizes: list[int], repeat: int) -> list[dict[str, Any]]:
    dep = Deployment(transport)
    src = dep.src
    src.raw()[:] = 3
    side = HostKVCache.create(SHAPE)  # raw shm's destination
    side.raw()[:] = 1
    raw_nixl = RawNixl(src, TransportConfig()) if transport == "rdma" else None
    rows = []
    try:
        for size in sizes:
            run_blocks = size // BLOCK
            work = plan(run_blocks, seed=size)
            raw_runs, per_request, ours = [], [], []
            dep.run(work)  # warm-up, untimed: first use of peers, pages, code paths
            for _ in range(repeat):
                raw_runs.append(raw_nixl.run(work) if raw_nixl else raw_shm(work, run_blocks, src, side))
                if raw_nixl:  # NIXL both ways: a transfer per layer, and one per request
                    per_request.append(raw_nixl.run(work, per_request=True))
                ours.append(dep.run(work))
            raw, kvx = statistics.median(raw_runs), statistics.median(ours)
            how = "per layer"
            if per_request and statistics.median(per_request) > raw:  # the better raw way is the baseline
                raw, how = statistics.median(per_request), "per request"
            rows.append({"transport": transport, "run": size, "raw": raw, "kvxferd": kvx, "ratio": kvx / raw})
            print(
                f"  {transport:5s} {_size(size):>7s}  raw {raw:6.2f} GB/s{f' ({how})' if raw_nixl else ''}   "
                f"kvxferd {kvx:6.2f} GB/s   {kvx / raw:5.2f}x",
                file=sys.stderr,
                flush=True,
            )
        one = [(sb[:1], db[:1]) for sb, db in plan(1, seed=0)][:1]
        dep.seconds(one)  # warm-up
        dep.held_ms.clear()
        inline, ahead = [], []
        for _ in range(max(repeat, 20)):  # alternating, so both see the same machine
            inline.append(dep.seconds(one))
            ahead.append(dep.seconds(one, admitted_first=True))
        rows.append(
            {
                "transport": transport,
                "fixed_ms": statistics.median(inline) * 1e3,
                "admitted_first_ms": statistics.median(ahead) * 1e3,
                "held_ms": statistics.median(dep.held_ms),
            }
        )
    finally:
        if raw_nixl is not None:
            raw_nixl.close()
        side.close()
        side.unlink()
        dep.close()
    return rows


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transports", default="shm,rdma", help="comma-separated: shm, rdma")
    parser.add_argument("--sizes", default="16,64,256,1024,4096", help="run sizes in KiB, comma-separated")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions of each side (median is shown)")
    parser.add_argument(
        "--maps", default="yes", choices=("yes", "no", "only"), help="groups of different sizes: rows too, none, only"
    )
    parser.add_argument("--short", default="yes", choices=("yes", "no", "only"), help="short prompts: too, none, only")
    parser.add_argument("--nixl-target", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.nixl_target:
        nixl_target()
        return
    sizes = [int(s) << 10 for s in args.sizes.split(",")]
    print(
        f"{REQUESTS} requests x {LAYERS} layers x K,V x {PER_REQUEST} blocks of {BLOCK >> 10} KiB = "
        f"{TOTAL >> 20} MiB per measurement; median of {args.repeat}",
        file=sys.stderr,
    )
    rows = []
    if args.short != "no":
        rows += bench_short(args.repeat)
        rows += bench_inflight(max(args.repeat * 20, 100))  # (p99 of 50 would be their largest but one)
    for transport in args.transports.split(",") if args.short != "only" else []:
        if args.maps != "only":
            rows += bench(transport.strip(), sizes, args.repeat)
        if args.maps != "no":
            rows += bench_maps(transport.strip(), args.repeat)
    print(f"\n{'transport':9s} {'run':>7s} {'raw GB/s':>9s} {'kvxferd GB/s':>13s} {'ratio':>6s} {'target':>7s}")
    for r in rows:
        if "fixed_ms" in r or "map" in r or "short" in r or "inflight" in r:
            continue
        goal = TARGETS[r["transport"]]
        mark = "ok" if r["ratio"] >= goal else "BELOW"
        print(
            f"{r['transport']:9s} {_size(r['run']):>7s} {r['raw']:9.2f} {r['kvxferd']:13.2f} {r['ratio']:5.2f}x "
            f"{goal:>5.1f}x {mark}"
        )
    for r in (r for r in rows if "short" in r):
        print(
            f"\nshort prompts (shm, {LAYERS} layers, one block): one request alone, cache_info to decode's KVReady "
            f"{r['ready_ms']:.2f} ms against {r['bare_ready_ms']:.2f} ms bare: "
            f"{r['ready_ms'] / r['bare_ready_ms']:.1f}x "
            f"(target <= 3x); to prefill's ok result {r['one_ms']:.2f} ms against {r['bare_ms']:.2f} ms bare: "
            f"{r['one_ms'] / r['bare_ms']:.1f}x\n"
            f"steps of 8 one-block requests: {r['rate']:.0f} requests/s against {r['bare_rate']:.0f} bare: "
            f"{r['rate'] / r['bare_rate']:.2f}x (target >= 0.4x)\n"
            f"64-token prompts, steps of 8 streamed ({STREAM_DEPTH} in flight at most): {r['steps64']:.0f} steps/s "
            f"sustained against {r['bare_steps64']:.0f} in one process with no daemon: "
            f"{r['steps64'] / r['bare_steps64']:.2f}x\n"
            "CPU time per request, every thread of each daemon: one alone "
            + ", ".join(f"{n} {us:.0f} us" for n, us in r["cpu_us_one"].items())
            + "; in steps of 8 "
            + ", ".join(f"{n} {us:.0f} us" for n, us in r["cpu_us_eight"].items())
        )
    for r in (r for r in rows if "inflight" in r):
        moving, together = r["moving_p99_ms"] / r["idle_p99_ms"], r["together_p99_ms"] / r["idle_p99_ms"]
        print(
            f"a short request's layer signal to its bytes at decode, p99 of {r['samples']}: "
            f"{r['moving_p99_ms']:.2f} ms "
            f"while a 256 MiB request moves, {r['idle_p99_ms']:.2f} ms idle: {moving:.1f}x (target <= 2x); "
            f"sent right behind that request's {LAYERS} layer signals: {r['together_p99_ms']:.2f} ms, {together:.1f}x"
        )
    maps = [r for r in rows if "map" in r]
    if maps:
        total = REQUESTS * MAP_BLOCKS * BLOCK * 2 * LAYERS
        print(f"\ngroups of different sizes: {total >> 20} MiB (every head) per measurement, against 2->2")
        for r in maps:
            mark = "" if r["map"] == "2->2" else (" ok" if r["ratio"] >= 0.9 else " BELOW")
            print(f"{r['transport']:9s} {r['map']:>5s} {r['gbps']:7.2f} GB/s {r['ratio']:5.2f}x  0.9x{mark}")
    for r in rows:
        if "fixed_ms" in r:
            print(
                f"{r['transport']}: one request of one block ({LAYERS} layers) alone, cache_info to result: "
                f"{r['fixed_ms']:.2f} ms (median): the fixed cost the rows above amortise\n"
                f"{'':{len(r['transport'])}s}  its first write waited {r['held_ms']:.2f} ms for the admission round "
                f"(median; the daemon's own clock: admission minus job recovery)\n"
                f"{'':{len(r['transport'])}s}  the same request already admitted when its layers come: "
                f"{r['admitted_first_ms']:.2f} ms, {r['fixed_ms'] / r['admitted_first_ms']:.2f}x"
            )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
