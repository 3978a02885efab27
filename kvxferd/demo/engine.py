"""A simulated prefill engine and decode engine, driving real daemons, checking every byte.

Theory of operation
-------------------
One loop plays a continuous-batching prefill engine (each layer of a step
takes ``layer_s`` of simulated compute, spent handling notices): requests take a slot and
source blocks, run in chunks under a per-step token budget (long prompts span
several steps: chunked prefill), and free their slot after their last chunk,
so slots are reused. For every layer of a step it writes the tokens the step
computes into each rank's cache, then sends that rank the layer signal. The
scheduler sends a request's cache_info to each rank at a random point of the
step: before the layer-0 signal, after some layer, or after the step, a
different point per rank.

Each token row of KV head ``h`` (the model's numbering) of block ``b`` of
layer ``l``, K or V, of request ``i`` holds one 64-bit value derived from
``(h, i, l, kv, b)``; no two requests share a value, so whatever a decode
block held before cannot pass for it. A prefill rank writes the heads it
holds; the groups may differ in size (the config's rank map then slices
heads), and each decode rank is checked against the heads it holds. Once
every decode rank reported a request ready, its blocks on every decode rank
are compared with the values (all rows of full blocks, the valid rows of the last one): a block
sent before all its tokens were written, a head written to the wrong place,
or one not written at all, fails. Blocks return to the pools only once every
decode rank reported the request.
"""

from __future__ import annotations

import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvxferd.client import DecodeEngine, PrefillScheduler, PrefillWorker, credentials
from kvxferd.config import Config, GroupConfig
from kvxferd.core.rankmap import Group, held
from kvxferd.errors import DaemonError
from kvxferd.kvcache import HostKVCache, KVShape
from kvxferd.protocol import CacheInfo, SlotChunk

MASK = (1 << 64) - 1
MAX_SLOTS = 8
STEP_TOKENS = 1024  # token budget of one forward step
CHUNK_TOKENS = 512  # most tokens one request computes in one step


@dataclass
class DemoRequest:
    index: int
    rid: str
    num_tokens: int
    slot: int = -1
    first_step: int = -1
    src: list[int] = field(default_factory=list)
    dst: list[int] = field(default_factory=list)
    done_tokens: int = 0
    chunks: int = 0
    started_at: float | None = None  # its first forward step
    last_signal_at: float | None = None
    ready_at: float | None = None
    verified: bool = False
    prefill_ok: bool | None = None
    decode_done: bool = False
    failure: str | None = None
    transports: set[str] = field(default_factory=set)
    lost: str = ""  # given up on (see DemoEngine.lost_s): the sides that never decided
    nbytes: int = 0
    expect: np.ndarray[Any, Any] | None = None  # [head, layer, kv, block] -> value of every row

    @property
    def finished(self) -> bool:
        return self.prefill_ok is not None and self.decode_done


class BlockPool:
    def __init__(self, num_blocks: int, rng: random.Random | None = None) -> None:
        ids = list(range(num_blocks))
        if rng is not None:  # fragment the free list a little, in runs of 4
            runs = [ids[i : i + 4] for i in range(0, num_blocks, 4)]
            rng.shuffle(runs)
            ids = [b for run in runs for b in run]
        self.free: deque[int] = deque(ids)

    def take(self, n: int) -> list[int] | None:
        if n > len(self.free):
            return None
        return [self.free.popleft() for _ in range(n)]

    def give(self, blocks: list[int]) -> None:
        self.free.extend(blocks)


def expected_values(index: int, heads: int, layers: int, nblocks: int) -> np.ndarray[Any, Any]:
    """``[head, layer, kv, block]``: the 64-bit value every row of that head of that block must hold."""
    rank = np.arange(heads, dtype=np.uint64)[:, None, None, None] << np.uint64(56)
    layer = np.arange(layers, dtype=np.uint64)[None, :, None, None] << np.uint64(40)
    kv = np.arange(2, dtype=np.uint64)[None, None, :, None] << np.uint64(32)
    block = np.arange(nblocks, dtype=np.uint64)[None, None, None, :] * np.uint64(0xBF58476D1CE4E5B9)
    base = np.uint64(((index + 1) * 0x9E3779B97F4A7C15) & MASK)
    out: np.ndarray[Any, Any] = base ^ rank ^ layer ^ kv ^ block
    return out


def u64_view(cache: HostKVCache) -> np.ndarray[Any, Any]:
    """``[layer, kv, block, head, token, words]`` as 64-bit words (a view: a token-major cache's
    tokens and heads are swapped back)."""
    s = cache.shape
    if s.planes != 2:
        raise DaemonError("the demo engine writes split caches (kv.layout: split), not packed ones")
    row = s.head_dim * s.itemsize
    if row % 8:
        raise DaemonError(f"the demo needs head_dim * itemsize to be a multiple of 8 bytes, got {row}")
    flat = np.frombuffer(cache.segment.buffer, dtype=np.uint64, count=s.nbytes // 8)
    if s.order == "tokens":
        return flat.reshape(s.num_layers, 2, s.num_blocks, s.block_tokens, s.kv_heads, row // 8).swapaxes(3, 4)
    return flat.reshape(s.num_layers, 2, s.num_blocks, s.kv_heads, s.block_tokens, row // 8)


class DemoEngine:
    def __init__(
        self, config: Config, prefill: GroupConfig, decode: GroupConfig, *, seed: int, transport: str, layer_s: float
    ) -> None:
        if prefill.memory != "host" or decode.memory != "host":
            raise DaemonError("the demo runs host-memory caches (set memory: host on both groups)")
        self.config, self.world, self.dworld = config, prefill.world_size, decode.world_size
        self.transport = transport
        self.layer_s = layer_s
        self.rng = random.Random(seed)
        self.shape = KVShape.from_config(config, self.world)
        dshape = KVShape.from_config(config, self.dworld)
        self.bt = self.shape.block_tokens
        self.layers = self.shape.num_layers
        self.heads = config.kv.kv_heads
        #: the model's heads [first, end) each rank holds, prefill then decode
        self.pheads = [self._held(prefill, r) for r in range(self.world)]
        self.dheads = [self._held(decode, r) for r in range(self.dworld)]
        self.peer = decode.name
        self.pcaches = [HostKVCache.create(self.shape) for _ in range(self.world)]
        self.dcaches = [HostKVCache.create(dshape) for _ in range(self.dworld)]
        self.pviews = [u64_view(c) for c in self.pcaches]
        self.dviews = [u64_view(c) for c in self.dcaches]
        self.src_pool = BlockPool(self.shape.num_blocks)
        self.dst_pool = BlockPool(self.shape.num_blocks, self.rng)
        creds = credentials(config)
        self.workers = [PrefillWorker(config.endpoint(prefill, r), credentials=creds) for r in range(self.world)]
        self.sched = PrefillScheduler([config.endpoint(prefill, r) for r in range(self.world)], credentials=creds)
        self.decode = DecodeEngine([config.endpoint(decode, r) for r in range(self.dworld)], credentials=creds)
        self.requests: list[DemoRequest] = []
        self.by_id: dict[str, DemoRequest] = {}
        self.step = 0
        self.errors: Counter[str] = Counter()
        #: a started request no notice decided within this long is given up ("lost") and its blocks
        #: are reused (None: wait for every notice, as the demo does)
        self.lost_s: float | None = None

    def _held(self, group: GroupConfig, rank: int) -> tuple[int, int]:
        if self.config.kv.replicated:
            return 0, self.heads
        return held(Group(group.name, group.world_size), self.heads, rank)

    def close(self) -> None:
        for w in self.workers:
            w.close()
        self.sched.close()
        self.decode.close()
        for c in self.pcaches + self.dcaches:
            c.close()
            c.unlink()

    # -- set-up -------------------------------------------------------------------------

    def register(self, timeout_s: float = 10.0) -> None:
        """Decode first: it must be able to receive before prefill sends."""
        self.decode.register(self.dcaches, timeout_s)
        for worker, cache in zip(self.workers, self.pcaches, strict=True):
            worker.register(cache, timeout_s)

    def plan(self, count: int) -> None:
        """A model-like mix: mostly short prompts, some long ones that need several chunks."""
        cap = self.shape.num_blocks * self.bt // 4  # keep several requests in flight
        for i in range(count):
            if self.rng.random() < 0.7:
                n = self.rng.randint(1, min(512, cap))
            else:
                n = self.rng.randint(min(513, cap), min(2048, cap))
            req = DemoRequest(i, f"demo-{i}", n)
            self.requests.append(req)
            self.by_id[req.rid] = req

    # -- the loop -----------------------------------------------------------------------

    def run(self, deadline: float, on_progress: Any, check: Any) -> None:
        waiting = deque(self.requests)
        active: list[DemoRequest] = []  # holding a slot, chunks still to compute
        slots = list(range(MAX_SLOTS))
        done = 0
        last_check = 0.0
        while done < len(self.requests):
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError
            if now - last_check > 0.5:
                check()
                last_check = now
                done += self._give_up(now, on_progress)
            self._admit(waiting, active, slots)
            table = self._schedule(active)
            if table:
                self.step += 1
                done += self._run_step(table, on_progress)
                for req in [r for r in active if r.done_tokens == r.num_tokens]:
                    active.remove(req)
                    slots.append(req.slot)  # the slot is reused by a later request
            done += self._collect(0.0 if table else 0.05, on_progress)

    def _admit(self, waiting: deque[DemoRequest], active: list[DemoRequest], slots: list[int]) -> None:
        """Give waiting requests a slot and blocks on both sides, while there are some."""
        while waiting and slots:
            req = waiting[0]
            need = -(-req.num_tokens // self.bt)
            src = self.src_pool.take(need)
            if src is None:
                return
            dst = self.dst_pool.take(need)
            if dst is None:
                self.src_pool.give(src)
                return
            waiting.popleft()
            req.src, req.dst, req.slot = src, dst, slots.pop(0)
            req.expect = expected_values(req.index, self.heads, self.layers, need)
            active.append(req)

    def _schedule(self, active: list[DemoRequest]) -> list[tuple[DemoRequest, int, int]]:
        """The next step's slot table: (request, token offset, token count) under the token budget."""
        budget, table = STEP_TOKENS, []
        for req in active:
            count = min(req.num_tokens - req.done_tokens, CHUNK_TOKENS, budget)
            if count <= 0:
                break
            table.append((req, req.done_tokens, count))
            budget -= count
        return table

    def _run_step(self, table: list[tuple[DemoRequest, int, int]], on_progress: Any) -> int:
        """Compute one forward step; returns how many requests finished meanwhile."""
        finished = 0
        started = [req for req, off, _ in table if off == 0]
        for req in started:
            req.first_step = self.step
            req.started_at = time.monotonic()
        infos = {req.rid: self._cache_info(req) for req in started}
        # where each rank gets each new cache_info: -1 before layer 0, l after layer l, L after the step
        when = {(r, rid): self.rng.randint(-1, self.layers) for r in range(self.world) for rid in infos}
        slots = tuple(SlotChunk(req.slot, off, n, req.first_step) for req, off, n in table)
        for rank in range(self.world):
            self._send_infos(rank, infos, when, -1)
        for layer in range(self.layers):
            for rank in range(self.world):
                for req, off, n in table:
                    self._compute(rank, req, layer, off, n)
                self.workers[rank].layer_ready(self.step, layer, slots if layer == 0 else ())
                self._send_infos(rank, infos, when, layer)
            # The layer's compute time: take notices meanwhile (so they are timed when they come).
            finished += self._collect(0.0, on_progress)
            until = time.monotonic() + self.layer_s
            while (left := until - time.monotonic()) > 0:
                finished += self._collect(left, on_progress)
        for rank in range(self.world):
            self._send_infos(rank, infos, when, self.layers)
        now = time.monotonic()
        for req, off, n in table:
            req.done_tokens = off + n
            req.chunks += 1
            if req.done_tokens == req.num_tokens:
                req.last_signal_at = now
        return finished

    def _cache_info(self, req: DemoRequest) -> CacheInfo:
        # req.dst is reserved in the decode ranks' current registrations: say which
        gens = tuple(self.decode.generations)
        return CacheInfo(
            req.rid, req.slot, req.first_step, req.num_tokens, tuple(req.src), tuple(req.dst), self.peer,
            self.transport, dst_generations=gens,
        )  # fmt: skip

    def _send_infos(self, rank: int, infos: dict[str, CacheInfo], when: dict[tuple[int, str], int], at: int) -> None:
        for rid, info in infos.items():
            if when[(rank, rid)] == at:
                self.sched.submit(info, ranks=[rank])

    def _compute(self, rank: int, req: DemoRequest, layer: int, off: int, n: int) -> None:
        """Write the rows of tokens off..off+n-1 of one layer (K and V) on one rank."""
        assert req.expect is not None
        view, bt = self.pviews[rank], self.bt
        first, last = off // bt, (off + n - 1) // bt
        src = np.asarray(req.src[first : last + 1])
        lo, hi = off - first * bt, off + n - last * bt  # rows written in the first and the last block
        h0, h1 = self.pheads[rank]
        for kv in (0, 1):
            vals = req.expect[h0:h1, layer, kv, first : last + 1].T  # [block, head]
            if first == last:
                view[layer, kv, src[0], :, lo:hi] = vals[0, :, None, None]
                continue
            view[layer, kv, src[0], :, lo:] = vals[0, :, None, None]
            view[layer, kv, src[-1], :, :hi] = vals[-1, :, None, None]
            if last - first > 1:
                view[layer, kv, src[1:-1]] = vals[1:-1, :, None, None]

    # -- events ---------------------------------------------------------------------------------

    def _collect(self, timeout_s: float, on_progress: Any) -> int:
        finished = 0
        for out in self.sched.collect(timeout_s):
            req = self.by_id.get(out.request_id)
            if req is None or req.prefill_ok is not None:
                continue  # forgotten, or given up on: a late decision changes nothing
            results = out.results
            req.prefill_ok = out.ok
            req.transports = {r.transport for r in results.values()}
            req.nbytes = sum(r.bytes for r in results.values())
            if not req.prefill_ok:
                said = [f"rank {k}: {r.status.value}: {r.reason}" for k, r in sorted(results.items())]
                req.failure = "; ".join(said + [f"rank {k}: {why}" for k, why in sorted(out.gone.items())])
            self.src_pool.give(req.src)
            finished += self._maybe_finished(req, on_progress)
        for outcome in self.decode.collect(0.0):
            req = self.by_id.get(outcome.request_id)
            if req is None or req.decode_done:
                continue
            if outcome.ready and req.ready_at is None:
                req.ready_at = time.monotonic()
                req.verified = self._verify(req)
            if outcome.reusable and not req.decode_done:
                req.decode_done = True
                if not outcome.ready and req.failure is None:
                    req.failure = "; ".join(f"decode rank {k}: {v}" for k, v in sorted(outcome.reasons.items()))
                self.dst_pool.give(req.dst)
                finished += self._maybe_finished(req, on_progress)
        for _, err in [*self.sched.errors, *self.decode.errors]:
            self.errors[f"{err.code.value}: {err.detail}"] += 1
        self.sched.errors.clear()
        self.decode.errors.clear()
        return finished

    def _give_up(self, now: float, on_progress: Any) -> int:
        """End the started requests still undecided ``lost_s`` after they started (see ``lost_s``)."""
        if self.lost_s is None:
            return 0
        finished = 0
        for req in self.requests:
            if req.started_at is None or req.finished or now - req.started_at < self.lost_s:
                continue
            missing = []
            if req.prefill_ok is None:
                missing.append("prefill")
                req.prefill_ok = False
                self.src_pool.give(req.src)
            if not req.decode_done:
                missing.append("decode")
                req.decode_done = True
                self.dst_pool.give(req.dst)
            req.lost = " and ".join(missing)
            lost = f"lost: no decision from {req.lost} within {self.lost_s:g}s"
            req.failure = f"{req.failure}; {lost}" if req.failure else lost
            finished += self._maybe_finished(req, on_progress)
        return finished

    def _maybe_finished(self, req: DemoRequest, on_progress: Any) -> int:
        if req.finished:
            on_progress(req)
            return 1
        return 0

    def _verify(self, req: DemoRequest) -> bool:
        """Compare every decode rank's blocks of ``req`` with the values prefill wrote."""
        assert req.expect is not None
        nb, bt = len(req.dst), self.bt
        dst = np.asarray(req.dst)
        tail = req.num_tokens - (nb - 1) * bt  # valid rows of the last block
        for rank, view in enumerate(self.dviews):
            h0, h1 = self.dheads[rank]
            want = req.expect[h0:h1].transpose(1, 2, 3, 0)  # [layer, kv, block, head]
            got = view[:, :, dst[:-1]]  # every row of the full blocks
            if not np.array_equal(got, np.broadcast_to(want[:, :, :-1, :, None, None], got.shape)):
                return False
            last = view[:, :, dst[-1], :, :tail]  # the valid rows of the last block
            if not np.array_equal(last, np.broadcast_to(want[:, :, -1, :, None, None], last.shape)):
                return False
        return True
