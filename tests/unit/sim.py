"""A deterministic simulation of one prefill group: N pure rank cores and a barrier state.

A *scenario* is what the engine does: the model worker's stream of layer
signals and the scheduler's stream of cache_infos and aborts. Every rank gets
both streams in the same order; the simulation interleaves them differently
on each rank (driven by a ``random.Random``), completes each rank's writes in
any order, and delivers barrier verdicts whenever it likes.

It also models memory: a source block of a layer is *written* once the layer
signal of the step that computed the block's last token has reached the rank,
and every write is checked against that, and against the request's block map.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

from kvxferd.core import BarrierState, PostWrite, Problem, RankCore, RankSettings, ToBarrier, ToEngine, ToPeer, ToRank
from kvxferd.core.blocks import blocks_needed
from kvxferd.protocol import Abort, CacheInfo, Hello, KVReady, LayerSignal, Message, SlotChunk, TransferResult

GROUP = "prefill"
BLOCK_BYTES = 64


@dataclass
class RequestPlan:
    rid: str
    slot: int
    num_tokens: int
    src: list[int]
    dst: list[int]
    chunks: list[tuple[int, int, int]] = field(default_factory=list)  # (step, offset, count) as scheduled
    aborted: bool = False


@dataclass
class Scenario:
    num_layers: int
    block_tokens: int
    num_blocks: int
    worker: list[LayerSignal]
    scheduler: list[Message]
    plans: dict[str, RequestPlan]

    def info(self, rid: str) -> CacheInfo:
        return next(m for m in self.scheduler if isinstance(m, CacheInfo) and m.request_id == rid)


def build_scenario(
    rng: random.Random,
    *,
    num_layers: int,
    block_tokens: int,
    num_slots: int,
    num_steps: int,
    abort_rate: float = 0.15,
    max_tokens: int = 40,
) -> Scenario:
    """Plan steps like a continuous-batching scheduler with chunked prefill and slot reuse.

    An aborted request stops being scheduled after some step (possibly before
    its first one), and its slot is reused afterwards. The scheduler stream has
    each request's cache_info in order of first step, and each abort after its
    cache_info and before the cache_info of the slot's next request.
    """
    plans: dict[str, RequestPlan] = {}
    occupant: dict[int, RequestPlan | None] = dict.fromkeys(range(num_slots))
    free_after: dict[int, int] = dict.fromkeys(range(num_slots), 0)  # a slot is reusable after this step
    stop_after: dict[str, int] = {}  # request to abort -> last step the worker runs it in
    worker: list[LayerSignal] = []
    events: list[tuple[int, int, RequestPlan]] = []  # (step, 0 = cache_info | 1 = abort, request)
    first_step: dict[str, int] = {}
    next_src, next_dst = 0, 0
    for step in range(1, num_steps + 1):
        table: list[SlotChunk] = []
        for slot in range(num_slots):
            plan = occupant[slot]
            if plan is None:
                if step <= free_after[slot] or rng.random() < 0.3:
                    continue
                num_tokens = rng.randint(1, max_tokens)
                need = blocks_needed(num_tokens, block_tokens)
                dst = []
                for _ in range(need):  # unique, mostly consecutive: runs coalesce sometimes
                    next_dst += 2 if rng.random() < 0.2 else 1
                    dst.append(next_dst)
                plan = RequestPlan(f"r{len(plans)}", slot, num_tokens, list(range(next_src, next_src + need)), dst)
                next_src += need
                plans[plan.rid] = plan
                first_step[plan.rid] = step
                events.append((step, 0, plan))
                occupant[slot] = plan
                if rng.random() < abort_rate:
                    stop_after[plan.rid] = step + rng.randint(-1, 3)  # step - 1: aborted before it ran
            if plan.rid in stop_after and step > stop_after[plan.rid]:
                plan.aborted = True
                events.append((max(stop_after[plan.rid], first_step[plan.rid]), 1, plan))
                occupant[slot] = None
                free_after[slot] = step
                continue
            done = plan.chunks[-1][1] + plan.chunks[-1][2] if plan.chunks else 0
            if plan.chunks and rng.random() < 0.2:
                continue  # a chunked request skips a step now and then
            count = plan.num_tokens - done if rng.random() < 0.5 else rng.randint(1, plan.num_tokens - done)
            plan.chunks.append((step, done, count))
            table.append(SlotChunk(slot, done, count, first_step[plan.rid]))
            if done + count == plan.num_tokens:
                occupant[slot] = None
                free_after[slot] = step
        worker.append(LayerSignal(step, 0, tuple(table)))
        worker.extend(LayerSignal(step, layer) for layer in range(1, num_layers))
    for plan in occupant.values():  # the run ends: abort whatever is unfinished
        if plan is not None:
            plan.aborted = True
            events.append((num_steps, 1, plan))
    scheduler: list[Message] = []
    for _step, kind, plan in sorted(events, key=lambda e: (e[0], e[1])):
        if kind == 0:
            scheduler.append(
                CacheInfo(
                    plan.rid,
                    plan.slot,
                    first_step[plan.rid],
                    plan.num_tokens,
                    tuple(plan.src),
                    tuple(plan.dst),
                    "decode-{rank}",
                )
            )
        else:
            scheduler.append(Abort(plan.rid, "client cancelled"))
    return Scenario(num_layers, block_tokens, max(next_src, 1), worker, scheduler, plans)


@dataclass
class RankSim:
    core: RankCore
    worker: list[LayerSignal]
    scheduler: list[Message]
    writes: dict[int, PostWrite] = field(default_factory=dict)
    verdicts: list[Message] = field(default_factory=list)
    to_barrier: list[Message] = field(default_factory=list)
    ready_layers: set[tuple[int, int]] = field(default_factory=set)  # (step, layer) delivered
    results: dict[str, list[TransferResult]] = field(default_factory=lambda: defaultdict(list))
    arrivals: dict[str, object] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


class GroupSim:
    def __init__(
        self, scenario: Scenario, world_size: int, rng: random.Random, *, quiesce: bool = True, **settings: float
    ) -> None:
        self.sc = scenario
        self.rng = rng
        self.quiesce = quiesce
        self.now = 0.0
        self.barrier = BarrierState(timeout_s=float(settings.pop("barrier_timeout_s", 30.0)))
        self.ranks = [
            RankSim(
                RankCore(
                    RankSettings(
                        GROUP,
                        r,
                        world_size,
                        scenario.num_layers,
                        scenario.num_blocks,
                        scenario.block_tokens,
                        BLOCK_BYTES,
                        **settings,
                    )
                ),  # type: ignore[arg-type]
                list(scenario.worker),
                list(scenario.scheduler),
            )
            for r in range(world_size)
        ]
        for r in range(world_size):
            self.barrier.hello(Hello(GROUP, r, world_size, "prefill"))
        # decode memory: (rank, layer, dst block) -> src block written there (confirmed writes only)
        self.decode: dict[tuple[int, int, int], int] = {}
        self.notices: dict[str, list[tuple[int, object]]] = defaultdict(list)
        self.block_step: dict[tuple[str, int], int] = {}  # (request, block index) -> step completing it
        for plan in scenario.plans.values():
            for step, offset, count in plan.chunks:
                end = offset + count
                first = 0 if offset == 0 else offset // scenario.block_tokens
                last = (
                    blocks_needed(end, scenario.block_tokens)
                    if end == plan.num_tokens
                    else end // scenario.block_tokens
                )
                for b in range(first, last):
                    self.block_step.setdefault((plan.rid, b), step)
        self.src_owner = {s: (p.rid, i) for p in scenario.plans.values() for i, s in enumerate(p.src)}
        self.dropped_writes: list[int] = []

    # -- driving ----------------------------------------------------------------

    def choices(self, r: int) -> list[str]:
        sim = self.ranks[r]
        out = []
        if sim.worker:
            out.append("worker")
        if sim.scheduler:
            out.append("scheduler")
        if sim.writes:
            out.append("write")
        if sim.verdicts:
            out.append("verdict")
        if sim.to_barrier:
            out.append("barrier")
        return out

    def step(self) -> bool:
        live = [(r, c) for r in range(len(self.ranks)) for c in self.choices(r)]
        if not live:
            return False
        r, what = self.rng.choice(live)
        self.deliver(r, what)
        return True

    def run(self, limit: int = 200_000) -> None:
        for _ in range(limit):
            if not self.step():
                return
        raise AssertionError("simulation did not settle")

    def deliver(self, r: int, what: str) -> None:
        sim = self.ranks[r]
        self.now += 1e-4
        if what == "worker":
            msg = sim.worker.pop(0)
            sim.ready_layers.add((msg.step, msg.layer))
            self.apply(r, sim.core.handle(msg, self.now))
        elif what == "scheduler":
            self.apply(r, sim.core.handle(sim.scheduler.pop(0), self.now))
        elif what == "write":
            wid = self.rng.choice(list(sim.writes))
            self.complete_write(r, wid)
        elif what == "verdict":
            self.apply(r, sim.core.handle(sim.verdicts.pop(0), self.now))
        else:
            for eff in self.barrier.handle(sim.to_barrier.pop(0), self.now):
                self.route_barrier(eff)

    def complete_write(self, r: int, wid: int, error: str | None = None) -> None:
        sim = self.ranks[r]
        write = sim.writes.pop(wid)
        if error is None:
            for run in write.runs:
                for i in range(run.length):
                    where = (r, write.layer, run.dst + i)
                    assert where not in self.decode, f"rank {r} wrote layer {write.layer} block {run.dst + i} twice"
                    self.decode[where] = run.src + i
        self.apply(r, sim.core.write_done(wid, self.now, error))

    def route_barrier(self, eff: object) -> None:
        assert isinstance(eff, ToRank), eff
        self.ranks[eff.rank].verdicts.append(eff.message)

    def apply(self, r: int, effects: list) -> None:
        sim = self.ranks[r]
        for eff in effects:
            if isinstance(eff, PostWrite):
                self.check_write(r, eff)
                sim.writes[eff.write_id] = eff
            elif isinstance(eff, ToBarrier):
                if eff.message.__class__.__name__ == "Arrive":
                    assert eff.message.key not in sim.arrivals, f"rank {r} arrived twice for {eff.message.key}"
                    sim.arrivals[eff.message.key] = eff.message.digest
                sim.to_barrier.append(eff.message)
            elif isinstance(eff, ToEngine):
                rid = eff.result.request_id
                sim.results[rid].append(eff.result)
                assert len(sim.results[rid]) == 1, f"rank {r} ended {rid} twice: {sim.results[rid]}"
                assert sim.core.holds(rid) == [], f"rank {r} still holds {rid} in {sim.core.holds(rid)}"
            elif isinstance(eff, ToPeer):
                rid = eff.message.request_id
                self.notices[rid].append((r, eff.message))
                busy = [q for q, other in enumerate(self.ranks) for w in other.writes.values() if rid in w.requests]
                assert not (busy and self.quiesce), f"decode told {rid} ended while ranks {busy} still write into it"
                if isinstance(eff.message, KVReady):
                    self.check_in_place(rid)
            elif isinstance(eff, Problem):
                sim.problems.append(eff)
            else:
                raise AssertionError(f"unexpected effect {eff!r}")

    def settle_timers(self, horizon: float = 1000.0) -> None:
        """Let every deadline pass, then run everything that follows from it."""
        self.now += horizon
        for r, sim in enumerate(self.ranks):
            self.apply(r, sim.core.on_timer(self.now))
        for eff in self.barrier.on_timer(self.now):
            self.route_barrier(eff)
        self.run()

    # -- checks -----------------------------------------------------------------

    def check_write(self, r: int, write: PostWrite) -> None:
        sim = self.ranks[r]
        for run in write.runs:
            for i in range(run.length):
                rid, b = self.src_owner[run.src + i]
                plan = self.sc.plans[rid]
                assert plan.dst[b] == run.dst + i, f"{rid} block {b} sent to {run.dst + i}, belongs at {plan.dst[b]}"
                step = self.block_step.get((rid, b))
                assert step is not None, f"rank {r} sent block {b} of {rid}, which no step completed"
                assert (step, write.layer) in sim.ready_layers, (
                    f"rank {r} sent layer {write.layer} of {rid} block {b} before step {step} wrote it"
                )

    def check_in_place(self, rid: str) -> None:
        """A KVReady may only be sent once every rank's data is in the decode cache."""
        plan = self.sc.plans[rid]
        for r in range(len(self.ranks)):
            for layer in range(self.sc.num_layers):
                for b, dst in enumerate(plan.dst):
                    got = self.decode.get((r, layer, dst))
                    assert got == plan.src[b], f"KVReady for {rid} but rank {r} layer {layer} block {dst} holds {got}"
