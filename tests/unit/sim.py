"""A deterministic simulation of one prefill group: N pure rank cores and a barrier state.

A *scenario* is what the engine does: the model worker's stream of layer
signals and the scheduler's stream of cache_infos and aborts. Every rank gets
the worker stream as it is and its own copy of the scheduler stream, which is
where a scenario makes ranks disagree: a cache_info with one field changed on
one rank (a scheduler bug), one a rank must refuse, an abort that overtakes its
cache_info on some ranks, late repeats of messages of instances that ended.
Request ids are reused with new instances. The simulation interleaves the
streams differently on each rank (driven by a ``random.Random``), completes
each rank's writes in any order, and delivers barrier verdicts whenever it
likes. It may also restart the barrier service (``restarts`` times): the new
one knows nothing, each word on its way to the old one is lost or not, and
each rank announces its open words again at a moment of its own.

It also models memory: a source block of a layer is *written* once the layer
signal of the step that computed the block's last token has reached the rank,
and every write is checked against that, against the request's block map, and
against the admissions the rank has received.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field, replace

from kvxferd.core import BarrierState, Problem, RankCore, RankSettings, ToBarrier, ToEngine, ToPeer, ToRank, Write
from kvxferd.core.blocks import blocks_needed
from kvxferd.protocol import (
    Abort,
    Ack,
    Admitted,
    Arrive,
    CacheInfo,
    Hello,
    KVReady,
    LayerSignal,
    Message,
    SlotChunk,
    Status,
    TransferResult,
)

GROUP = "prefill"
BLOCK_BYTES = 64
Key = tuple[str, int]

#: cache_info fields a scenario may change on one rank (ranks then disagree at admission)
DIVERGENT_FIELDS = ("num_tokens", "src_blocks", "dst_blocks", "slot", "step", "peer", "transport")
#: ways a scenario makes one rank refuse a cache_info
REFUSALS = ("bad_layout", "out_of_range")


@dataclass
class RequestPlan:
    rid: str
    instance: int
    slot: int
    num_tokens: int
    src: list[int]
    dst: list[int]
    chunks: list[tuple[int, int, int]] = field(default_factory=list)  # (step, offset, count) as scheduled
    first_step: int = 0
    aborted: bool = False
    diverge: tuple[int, str] | None = None  # (rank, field) changed in that rank's cache_info
    refuse: tuple[int, str] | None = None  # (rank, how) that rank must refuse
    early: set[int] = field(default_factory=set)  # ranks whose abort comes before the cache_info

    @property
    def key(self) -> Key:
        return (self.rid, self.instance)

    @property
    def tainted(self) -> bool:
        """Ranks cannot agree on this instance: nothing may be written for it."""
        return self.diverge is not None or self.refuse is not None


@dataclass
class Scenario:
    num_layers: int
    block_tokens: int
    num_blocks: int
    worker: list[LayerSignal]
    schedulers: list[list[Message]]  # one stream per rank
    plans: dict[Key, RequestPlan]


def _cache_info(plan: RequestPlan) -> CacheInfo:
    return CacheInfo(
        plan.rid,
        plan.slot,
        plan.first_step,
        plan.num_tokens,
        tuple(plan.src),
        tuple(plan.dst),
        "decode-{rank}",
        "auto",
        plan.instance,
    )


def _changed(info: CacheInfo, what: str, block_tokens: int, num_blocks: int, fresh: int) -> CacheInfo:
    """``info`` as one rank's buggy scheduler would send it."""
    n = info.num_tokens
    if what == "num_tokens":
        need = blocks_needed(n, block_tokens)
        same_blocks = [t for t in range((need - 1) * block_tokens + 1, need * block_tokens + 1) if t != n]
        if same_blocks:
            return replace(info, num_tokens=same_blocks[0])
        what = "dst_blocks"
    if what == "src_blocks" and num_blocks > 1:
        return replace(info, src_blocks=((info.src_blocks[0] + 1) % num_blocks, *info.src_blocks[1:]))
    if what in ("src_blocks", "dst_blocks"):
        return replace(info, dst_blocks=(*info.dst_blocks[:-1], fresh))
    if what == "slot":
        return replace(info, slot=info.slot + 1000)
    if what == "step":
        return replace(info, step=info.step + 100_000)
    if what == "peer":
        return replace(info, peer="decode-elsewhere-{rank}")
    if what == "transport":
        return replace(info, transport="shm")
    if what == "bad_layout":
        return replace(info, num_tokens=n + block_tokens)
    assert what == "out_of_range", what
    return replace(info, src_blocks=(num_blocks + 7, *info.src_blocks[1:]))


def build_scenario(
    rng: random.Random,
    *,
    num_layers: int,
    block_tokens: int,
    num_slots: int,
    num_steps: int,
    world: int = 2,
    abort_rate: float = 0.15,
    max_tokens: int = 40,
    divergence_rate: float = 0.0,
    refusal_rate: float = 0.0,
    reuse_rate: float = 0.0,
    early_abort_rate: float = 0.0,
    late_rate: float = 0.0,
) -> Scenario:
    """Plan steps like a continuous-batching scheduler with chunked prefill and slot reuse.

    An aborted request stops being scheduled after some step (possibly before
    its first one), and its slot is reused afterwards. The common scheduler
    stream has each request's cache_info in order of first step, and each abort
    after its cache_info and before the cache_info of the slot's next request;
    each rank's copy then gets the per-rank changes described in the module.
    """
    plans: dict[Key, RequestPlan] = {}
    occupant: dict[int, RequestPlan | None] = dict.fromkeys(range(num_slots))
    free_after: dict[int, int] = dict.fromkeys(range(num_slots), 0)  # a slot is reusable after this step
    stop_after: dict[Key, int] = {}  # request to abort -> last step the worker runs it in
    worker: list[LayerSignal] = []
    events: list[tuple[int, int, RequestPlan]] = []  # (step, 0 = cache_info | 1 = abort, request)
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
                rid, instance = f"r{len(plans)}", 0
                if plans and rng.random() < reuse_rate:  # an id used before, with a new instance
                    rid = rng.choice(list(plans.values())).rid
                    instance = 1 + max(p.instance for p in plans.values() if p.rid == rid)
                src = list(range(next_src, next_src + need))
                plan = RequestPlan(rid, instance, slot, num_tokens, src, dst, first_step=step)
                next_src += need
                plans[plan.key] = plan
                events.append((step, 0, plan))
                occupant[slot] = plan
                if rng.random() < abort_rate:
                    stop_after[plan.key] = step + rng.randint(-1, 3)  # step - 1: aborted before it ran
            if plan.key in stop_after and step > stop_after[plan.key]:
                plan.aborted = True
                events.append((max(stop_after[plan.key], plan.first_step), 1, plan))
                occupant[slot] = None
                free_after[slot] = step
                continue
            done = plan.chunks[-1][1] + plan.chunks[-1][2] if plan.chunks else 0
            if plan.chunks and rng.random() < 0.2:
                continue  # a chunked request skips a step now and then
            count = plan.num_tokens - done if rng.random() < 0.5 else rng.randint(1, plan.num_tokens - done)
            plan.chunks.append((step, done, count))
            table.append(SlotChunk(slot, done, count, plan.first_step))
            if done + count == plan.num_tokens:
                occupant[slot] = None
                free_after[slot] = step
        worker.append(LayerSignal(step, 0, tuple(table)))
        worker.extend(LayerSignal(step, layer) for layer in range(1, num_layers))
    for plan in occupant.values():  # the run ends: abort whatever is unfinished
        if plan is not None:
            plan.aborted = True
            events.append((num_steps, 1, plan))
    num_blocks = max(next_src, 1)

    for plan in plans.values():
        if rng.random() < divergence_rate:
            plan.diverge = (rng.randrange(world), rng.choice(DIVERGENT_FIELDS))
        elif rng.random() < refusal_rate:
            plan.refuse = (rng.randrange(world), rng.choice(REFUSALS))
        if plan.aborted:
            plan.early = {r for r in range(world) if rng.random() < early_abort_rate}
    ordered = sorted(events, key=lambda e: (e[0], e[1]))
    late: list[tuple[int, Message]] = []  # (rank or -1 for all, message) appended to the streams
    for _step, kind, plan in ordered:
        if rng.random() < late_rate:  # a late repeat of this message, after everything else
            late.append((-1, Abort(plan.rid, "client cancelled", plan.instance) if kind else _cache_info(plan)))
    schedulers: list[list[Message]] = []
    for r in range(world):
        out: list[Message] = []
        for _step, kind, plan in ordered:
            abort = Abort(plan.rid, "client cancelled", plan.instance)
            if kind == 1:
                if r not in plan.early:
                    out.append(abort)
                continue
            if r in plan.early:
                out.append(abort)  # overtakes its cache_info on this rank
            info = _cache_info(plan)
            for change in (plan.diverge, plan.refuse):
                if change is not None and change[0] == r:
                    info = _changed(info, change[1], block_tokens, num_blocks, 10**6 + len(out))
            out.append(info)
        for who, msg in late:
            if who in (-1, r):
                out.append(msg if not isinstance(msg, CacheInfo) else _per_rank(out, msg))
        schedulers.append(out)
    return Scenario(num_layers, block_tokens, num_blocks, worker, schedulers, plans)


def _per_rank(stream: list[Message], msg: CacheInfo) -> CacheInfo:
    """The cache_info this rank got first for the instance (a late repeat repeats it exactly)."""
    return next(m for m in stream if isinstance(m, CacheInfo) and m.key == msg.key)


@dataclass
class RankSim:
    core: RankCore
    worker: list[LayerSignal]
    scheduler: list[Message]
    writes: dict[int, Write] = field(default_factory=dict)
    verdicts: list[Message] = field(default_factory=list)
    to_barrier: list[Message] = field(default_factory=list)
    ready_layers: set[tuple[int, int]] = field(default_factory=set)  # (step, layer) delivered
    admitted: set[Key] = field(default_factory=set)  # instances this rank received Admitted for
    results: dict[Key, list[TransferResult]] = field(default_factory=lambda: defaultdict(list))
    arrivals: dict[Key, object] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    reannounce: bool = False  # the barrier restarted; this rank has not announced its words again yet


class GroupSim:
    def __init__(
        self,
        scenario: Scenario,
        world_size: int,
        rng: random.Random,
        *,
        quiesce: bool = True,
        restarts: int = 0,
        **settings: float,
    ) -> None:
        assert len(scenario.schedulers) == world_size
        self.sc = scenario
        self.rng = rng
        self.quiesce = quiesce
        self.now = 0.0
        self.barrier_timeout_s = float(settings.pop("barrier_timeout_s", 30.0))
        self.barrier = BarrierState(timeout_s=self.barrier_timeout_s)
        self.restarts = restarts  # barrier restarts still to come
        self.epochs = 0
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
                list(scenario.schedulers[r]),
            )
            for r in range(world_size)
        ]
        for r in range(world_size):
            self.barrier.hello(Hello(GROUP, r, world_size, "prefill"), 0.0)
        # decode memory: (rank, layer, dst block) -> src block written there (confirmed writes only)
        self.decode: dict[tuple[int, int, int], int] = {}
        self.notices: dict[Key, list[tuple[int, KVReady | TransferResult]]] = defaultdict(list)
        self.written: set[Key] = set()  # instances any rank posted a write for
        self.barrier_problems: list[Problem] = []
        self.block_step: dict[tuple[Key, int], int] = {}  # (request, block index) -> step completing it
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
                    self.block_step.setdefault((plan.key, b), step)
        self.src_owner = {s: (p.key, i) for p in scenario.plans.values() for i, s in enumerate(p.src)}

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
        if sim.reannounce:
            out.append("reannounce")
        return out

    def step(self) -> bool:
        live = [(r, c) for r in range(len(self.ranks)) for c in self.choices(r)]
        if not live:
            return False
        if self.restarts and self.rng.random() < 0.02:
            self.restart_barrier()
            return True
        r, what = self.rng.choice(live)
        self.deliver(r, what)
        return True

    def restart_barrier(self) -> None:
        """The barrier service dies and a new one starts: what it held is gone."""
        self.restarts -= 1
        self.epochs += 1
        self.barrier = BarrierState(timeout_s=self.barrier_timeout_s, epoch=str(self.epochs))
        world = len(self.ranks)
        for r, sim in enumerate(self.ranks):
            sim.to_barrier = [m for m in sim.to_barrier if self.rng.random() < 0.5]  # read by the dead one, or not
            # the heartbeat reaches the new service; its Ack (a new epoch) comes after what the old one sent
            for eff in self.barrier.hello(Hello(GROUP, r, world, "prefill"), self.now):
                self.route_barrier(eff)

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
            verdict = sim.verdicts.pop(0)
            if isinstance(verdict, Ack):  # the link sees a new epoch: the rank announces its words again
                sim.reannounce = True  # (only the new service's Acks are routed here)
                return
            if isinstance(verdict, Admitted):
                sim.admitted.add((verdict.key, verdict.instance))
            self.apply(r, sim.core.handle(verdict, self.now))
        elif what == "reannounce":
            sim.reannounce = False
            for eff in sim.core.reannounce(self.now):
                assert isinstance(eff, ToBarrier), eff
                sim.to_barrier.append(eff.message)
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
        if isinstance(eff, Problem):  # the service refused a word (the rank would log its Error)
            self.barrier_problems.append(eff)
            return
        assert isinstance(eff, ToRank), eff
        self.ranks[eff.rank].verdicts.append(eff.message)

    def apply(self, r: int, effects: list) -> None:
        sim = self.ranks[r]
        for eff in effects:
            if isinstance(eff, Write):
                self.check_write(r, eff)
                sim.writes[eff.write_id] = eff
                self.written.update(eff.requests)
            elif isinstance(eff, ToBarrier):
                if isinstance(eff.message, Arrive):
                    key = (eff.message.key, eff.message.instance)
                    assert key not in sim.arrivals, f"rank {r} arrived twice for {key}"
                    sim.arrivals[key] = eff.message.digest
                sim.to_barrier.append(eff.message)
            elif isinstance(eff, ToEngine):
                key = eff.result.key
                sim.results[key].append(eff.result)
                assert len(sim.results[key]) == 1, f"rank {r} ended {key} twice: {sim.results[key]}"
                assert sim.core.holds(key) == [], f"rank {r} still holds {key} in {sim.core.holds(key)}"
            elif isinstance(eff, ToPeer):
                key = eff.message.key
                self.notices[key].append((r, eff.message))
                busy = [q for q, other in enumerate(self.ranks) for w in other.writes.values() if key in w.requests]
                assert not (busy and self.quiesce), f"decode told {key} ended while ranks {busy} still write into it"
                if isinstance(eff.message, KVReady):
                    self.check_in_place(key)
            elif isinstance(eff, Problem):
                sim.problems.append(eff)
            else:
                raise AssertionError(f"unexpected effect {eff!r}")

    def settle_timers(self, limit: int = 10_000) -> None:
        """Let the deadlines pass in the order they fall due (every rank's and the barrier's), running
        everything that follows from each, until none is left."""
        for _ in range(limit):
            pending = [rank.core.next_deadline() for rank in self.ranks] + [self.barrier.next_deadline()]
            due = [t for t in pending if t is not None]
            if not due:
                return
            self.now = max(self.now, min(due)) + 1e-6
            for r, sim in enumerate(self.ranks):
                self.apply(r, sim.core.on_timer(self.now))
            for eff in self.barrier.on_timer(self.now):
                self.route_barrier(eff)
            self.run()
        raise AssertionError("deadlines keep coming")

    # -- checks -----------------------------------------------------------------

    def check_write(self, r: int, write: Write) -> None:
        sim = self.ranks[r]
        for key in write.requests:
            assert key in sim.admitted, f"rank {r} wrote for {key} before the barrier admitted it"
            assert not self.sc.plans[key].tainted, f"rank {r} wrote for {key}, which the ranks disagree on"
        for run in write.runs:
            for i in range(run.length):
                key, b = self.src_owner[run.src + i]
                plan = self.sc.plans[key]
                assert plan.dst[b] == run.dst + i, f"{key} block {b} sent to {run.dst + i}, belongs at {plan.dst[b]}"
                step = self.block_step.get((key, b))
                assert step is not None, f"rank {r} sent block {b} of {key}, which no step completed"
                assert (step, write.layer) in sim.ready_layers, (
                    f"rank {r} sent layer {write.layer} of {key} block {b} before step {step} wrote it"
                )

    def check_in_place(self, key: Key) -> None:
        """A KVReady may only be sent once every rank's data is in the decode cache."""
        plan = self.sc.plans[key]
        for r in range(len(self.ranks)):
            for layer in range(self.sc.num_layers):
                for b, dst in enumerate(plan.dst):
                    got = self.decode.get((r, layer, dst))
                    assert got == plan.src[b], f"KVReady for {key} but rank {r} layer {layer} block {dst} holds {got}"

    def notice_status(self, msg: KVReady | TransferResult) -> Status:
        return Status.OK if isinstance(msg, KVReady) else msg.status
