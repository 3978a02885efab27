"""A deterministic simulation of one prefill group and its decode ranks: pure cores, a clock, faults.

A *scenario* is what the engines do: the model worker's stream of layer
signals and the scheduler's stream of cache_infos and aborts. Every rank gets
the worker stream as it is and its own copy of the scheduler stream, which is
where a scenario makes ranks disagree: a cache_info with one field changed on
one rank (a scheduler bug), one a rank must refuse, an abort that overtakes its
cache_info on some ranks, late repeats of messages of instances that ended.
Request ids are reused with new instances.

The simulation is a discrete-event one (:class:`GroupSim`): every message is
an event at a time, every core's deadline is an event at its time, and they
run in time order, so a timer fires *between* deliveries whenever it falls
due. Each rank's worker and scheduler streams come at their own pace (a rank
may be slow: :class:`Timing`), control messages take a random latency (in
order per connection), writes complete in any order. :class:`Faults` are
events too: the barrier service restarts (the new one knows nothing; each word
on its way to the old one is lost or not; ranks hear of it from the Ack of
their next heartbeat and announce their open words again), a rank dies
(its process and whatever it held are gone; it starts again later and joins
the running group), a rank is drained (SIGTERM: it refuses new work, then
forces what is left after ``shutdown_s``), a rank stops (SIGSTOP) and, when it
runs again, reads what waited before it runs its timers, as the daemon does.

It also models memory: a source block of a layer is *written* once the layer
signal of the step that computed the block's last token has reached the rank,
and every write is checked against that, against the request's block map, and
against the admissions the rank has received. Decode ranks run the pure decode
core, so what each decode engine is told is checked too.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

from kvxferd.core import BarrierState, Problem, RankCore, RankSettings, ToBarrier, ToEngine, ToPeer, ToRank, Write
from kvxferd.core.barrier import ALIVE_BEATS
from kvxferd.core.blocks import blocks_needed
from kvxferd.core.decode import Confirm, DecodeCore, Deliver
from kvxferd.core.ledger import as_failed
from kvxferd.core.rankmap import Group, rank_map
from kvxferd.protocol import (
    STARTUP_KEY,
    Abort,
    Ack,
    Admitted,
    Arrive,
    CacheInfo,
    Digest,
    Diverged,
    ErrorCode,
    Expired,
    Hello,
    Key,
    KVReady,
    LayerSignal,
    Message,
    Received,
    Release,
    SlotChunk,
    Status,
    TransferResult,
)

GROUP = "prefill"
DECODE, PEER = "decode", "decode-{rank}"  # the decode group, as cache_infos name it
BLOCK_BYTES = 64
FINGERPRINT = "sim-config"
GENERATION = "g1"  # every decode rank's one registration

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
        PEER,
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


@dataclass(frozen=True)
class Timing:
    """How fast things happen, in seconds of the simulation's clock (each a random share of it)."""

    latency_s: float = 0.002  # a control message, at most; in order per connection
    signal_gap_s: float = 0.004  # between two of a worker's layer signals, at most
    sched_gap_s: float = 0.008  # between two of a scheduler's messages, at most
    write_s: float = 0.003  # a write, at most
    slow: tuple[float, ...] = ()  # per rank: its worker runs this many times slower (missing: 1)
    heartbeat_s: float = 0.05
    #: a process's wake-up: what it reads within this long is planned together (RankCore.hold, as the
    #: daemon does for each poll wake-up), so its writes are planned late; 0: each message at once
    batch_s: float = 0.0

    def pace(self, rank: int) -> float:
        return self.slow[rank] if rank < len(self.slow) else 1.0


@dataclass(frozen=True)
class Faults:
    """Process faults, each an event at a time of the simulation's clock."""

    restarts: tuple[float, ...] = ()  # the barrier service restarts
    deaths: tuple[tuple[int, float, float], ...] = ()  # (rank, SIGKILL at, starts again after)
    drains: tuple[tuple[int, float, float], ...] = ()  # (rank, SIGTERM at, starts again after it exits)
    stalls: tuple[tuple[int, float, float], ...] = ()  # (rank, SIGSTOP at, SIGCONT after)

    @property
    def harmless(self) -> bool:
        """Only faults nothing may fail for (a restarted barrier service loses nothing recoverable)."""
        return not (self.deaths or self.drains or self.stalls)


class Runs:
    """A prefill core driven as the shell drives it: in an open wake-up, the worker's signals after
    layer 0 read in a row from one step go to the core together (``on_layers``), before anything
    else reaches it. Every other attribute is the core's own."""

    #: the core's calls that take the run first (what returns effects)
    TAKE_FIRST = frozenset(
        {"handle", "on_cache_info", "on_verdict", "on_abort", "on_timer", "flush", "reannounce", "stalled", "close",
         "write_done"}
    )  # fmt: skip

    def __init__(self, core: RankCore, clock: Callable[[], float]) -> None:
        self.inner, self.clock = core, clock
        self.run: tuple[int, list[int]] | None = None

    def signal(self, msg: LayerSignal, now: float, holding: bool) -> list[Any]:
        if holding and msg.layer > 0:
            if self.run is not None and self.run[0] == msg.step:
                self.run[1].append(msg.layer)
                return []
            effects = self.take()
            self.run = (msg.step, [msg.layer])
            return effects
        return self.take() + self.inner.handle(msg, now)

    def take(self) -> list[Any]:
        run, self.run = self.run, None
        return [] if run is None else self.inner.on_layers(run[0], run[1], self.clock())

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in self.TAKE_FIRST:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return self.take() + attr(*args, **kwargs)

        return call


@dataclass(eq=False)
class Process:
    """One run of a rank's daemon: a rank killed or drained starts again as a new process."""

    rank: int
    n: int
    core: RankCore  # (a Runs)
    state: str = "starting"  # starting -> serving [-> draining] -> gone
    epoch: str | None = None  # the barrier service run its last Ack named
    writes: dict[int, Write] = field(default_factory=dict)
    ready_layers: set[tuple[int, int]] = field(default_factory=set)  # (step, layer) delivered
    admitted: set[Key] = field(default_factory=set)  # instances this process received Admitted for
    results: dict[Key, list[TransferResult]] = field(default_factory=lambda: defaultdict(list))
    #: ok results told once the decode rank confirms how its engine was told (as the notice ledger)
    held: dict[Key, ToEngine] = field(default_factory=dict)
    #: per ok result held: the decode ranks still to confirm, and the first failure one told
    confirming: dict[Key, tuple[set[int], Received | None]] = field(default_factory=dict)
    arrivals: dict[Key, Digest] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    unresolved: int = 0  # notices to a decode group nobody resolves (a diverged peer): dropped
    stalled_until: float = 0.0
    last_said: float = 0.0  # when it last sent the barrier service anything
    stop_at: float | None = None  # draining: when what is left is forced
    holding: bool = False  # a wake-up's batch is open: writes are planned at its flush
    back_after: float = 0.0  # draining: how long after it exits the next process starts

    @property
    def alive(self) -> bool:
        return self.state != "gone"


def identity(rank: int) -> bytes:
    """How prefill rank ``rank`` connects to its decode rank (the decode core keys repeats by it)."""
    return f"{GROUP}:{rank}".encode()


class GroupSim:
    """Every rank's processes, the barrier service and the decode ranks, on one clock."""

    def __init__(
        self,
        scenario: Scenario,
        world_size: int,
        rng: random.Random,
        *,
        timing: Timing | None = None,
        faults: Faults | None = None,
        quiesce: bool = True,
        decode_world: int = 0,
        **settings: float,
    ) -> None:
        assert len(scenario.schedulers) == world_size
        self.sc, self.rng, self.world = scenario, rng, world_size
        #: the decode group: as large as the prefill group, or smaller (then each decode rank has
        #: several writers, each writing its heads into a slice of every block: the rank map)
        self.dworld = decode_world or world_size
        heads = max(world_size, self.dworld)  # every rank of both groups holds a head: all write
        rmap = rank_map(Group(GROUP, world_size), Group(DECODE, self.dworld), heads)
        self.targets = {r: tuple(piece.decode for piece in rmap.writes_of(r)) for r in range(world_size)}
        self.writers = {d: rmap.writers_of(d) for d in range(self.dworld)}
        self.timing = timing or Timing()
        self.faults = faults or Faults()
        self.quiesce = quiesce  # a verdict never comes while any rank still writes (no deadline cut it short)
        self.barrier_timeout_s = float(settings.pop("barrier_timeout_s", 30.0))
        self.shutdown_s = float(settings.pop("shutdown_s", 5.0))
        self.settings = settings
        self.now = 0.0
        self._queue: list[tuple[float, int, str, tuple[object, ...]]] = []
        self._seq = 0
        self._busy = 0  # queued events other than heartbeats
        self._last: dict[tuple[str, int], float] = {}  # connection -> its last delivery (kept in order)
        self._waiting: list[list[Message]] = [[] for _ in range(world_size)]  # scheduler messages for a restart
        self._asleep: list[tuple[int, int]] = []  # heartbeats skipped while nothing happens
        self._due: dict[object, float] = {}  # each current process, and the barrier -> its next deadline
        self._dirty: set[object] = set()  # those that acted since: their deadline is recomputed
        self.epochs = 0
        #: the barrier service's journal: (when, verdict) of every final verdict, as it writes them
        self.journal: list[tuple[float, Release | Diverged | Expired]] = []
        self.barrier = self._new_barrier()
        self.procs = [self._process(r, 0, "serving") for r in range(world_size)]
        self.history = list(self.procs)  # every process that ever ran, in order of start
        for p in self.procs:
            self._route(self.barrier.hello(self._hello(p), 0.0), None)
        self.decoders = [DecodeCore(d, {identity(w): GROUP for w in self.writers[d]}) for d in range(self.dworld)]
        for d in self.decoders:
            d.registered(GENERATION, 0.0)
        #: per decode rank, what its engine was told, by instance
        self.told: list[dict[Key, list[KVReady | TransferResult]]] = [defaultdict(list) for _ in range(self.dworld)]
        self.decode: dict[tuple[int, int, int], int] = {}  # (rank, layer, dst block) -> src block written there
        self.notices: dict[Key, list[tuple[int, KVReady | TransferResult]]] = defaultdict(list)
        #: id of a notice -> the process that sent it (None: the barrier relayed it for an absent one)
        self.sources: dict[int, Process | None] = {}
        self.written: set[Key] = set()  # instances any rank posted a write for
        self.barrier_problems: list[Problem] = []
        self.overdue: list[tuple[int, int, float]] = []  # (rank, process, when) a request's deadline passed
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
        t = self.timing
        for r in range(world_size):
            if scenario.worker:
                self._at(rng.uniform(0, t.signal_gap_s) * t.pace(r), "worker", r, 0)
            if scenario.schedulers[r]:
                self._at(rng.uniform(0, t.sched_gap_s), "scheduler", r, 0)
            self._at(rng.uniform(0, t.heartbeat_s), "heartbeat", r, 0)
        f = self.faults
        for when in f.restarts:
            self._at(when, "restart")
        for rank, when, back in f.deaths:
            self._at(when, "die", rank, back)
        for rank, when, back in f.drains:
            self._at(when, "term", rank, back)
        for rank, when, length in f.stalls:
            self._at(when, "stall", rank, length)

    def __repr__(self) -> str:
        return f"GroupSim(world={self.world}, {self.timing}, {self.faults}, {len(self.sc.plans)} requests)"

    # -- the clock ---------------------------------------------------------------

    def run(self, limit: int = 2_000_000) -> None:
        for _ in range(limit):
            if not self.step():
                return
        raise AssertionError("simulation did not settle")

    def step(self) -> bool:
        """Run the next event or timer, whichever is due first; False once nothing is left."""
        when_timer, owner = self._next_timer()
        if when_timer == float("inf") and self._busy == 0:
            return False
        when_event = self._queue[0][0] if self._queue else float("inf")
        if when_timer <= when_event:
            self.now = max(self.now, when_timer)
            self._fire(owner)
            return True
        when, seq, kind, args = heapq.heappop(self._queue)
        if kind != "heartbeat":
            self._busy -= 1
        self.now = max(self.now, when)
        getattr(self, f"_on_{kind}")(seq, *args)
        return True

    def _at(self, when: float, kind: str, *args: object, seq: int | None = None) -> None:
        if seq is None:
            seq = self._seq = self._seq + 1
        if kind != "heartbeat":
            self._busy += 1
            if self._asleep:  # something happens again: the heartbeats resume, as if they never paused
                asleep, self._asleep = self._asleep, []
                for r, n in asleep:
                    if self.procs[r].n == n and self.procs[r].alive:
                        self._route(self.barrier.hello(self._hello(self.procs[r]), self.now), r)
                    self._at(self.now + self.rng.uniform(0, self.timing.heartbeat_s), "heartbeat", r, n)
        heapq.heappush(self._queue, (when, seq, kind, args))

    def _send(self, connection: tuple[str, int], kind: str, *args: object) -> None:
        """A message over a connection: a random latency, delivered in the order sent."""
        if connection[0] == "b":
            self.procs[connection[1]].last_said = self.now
        when = max(self._last.get(connection, 0.0), self.now + self.rng.uniform(0, self.timing.latency_s))
        self._last[connection] = when
        self._at(when, kind, *args)

    def _deferred(self, p: Process, seq: int, kind: str, *args: object) -> bool:
        """An event for a stopped process waits until it runs again, in the order it came."""
        if p.stalled_until <= self.now:
            return False
        self._at(p.stalled_until, kind, *args, seq=seq)
        return True

    def _next_timer(self) -> tuple[float, object]:
        """The earliest deadline of any process or the barrier (each recomputed only after it acted)."""
        due = self._due
        for owner in self._dirty:
            due[owner] = self._deadline_of(owner)
        self._dirty.clear()
        owner = min(due, key=due.__getitem__)
        return due[owner], owner

    def _deadline_of(self, owner: object) -> float:
        if owner is self.barrier:
            due = self.barrier.next_deadline()
            return float("inf") if due is None else due
        assert isinstance(owner, Process)
        if not owner.alive:
            return float("inf")
        due = owner.core.next_deadline()
        if owner.stop_at is not None:
            due = owner.stop_at if due is None else min(due, owner.stop_at)
        if due is None:
            return float("inf")
        return max(due, owner.stalled_until + 1e-9)  # back from a stop: what waited is read first

    def _fire(self, owner: object) -> None:
        if owner is self.barrier:
            self._route(self.barrier.on_timer(self.now), None)
            return
        assert isinstance(owner, Process)
        if owner.stop_at is not None and self.now >= owner.stop_at:
            self._force(owner)
            return
        due = owner.core.life.next_deadline()
        if due is not None and due <= self.now:
            self.overdue.append((owner.rank, owner.n, self.now))
        self.apply(owner, owner.core.on_timer(self.now))

    # -- events ------------------------------------------------------------------

    def _on_worker(self, seq: int, r: int, i: int) -> None:
        t = self.timing
        if i + 1 < len(self.sc.worker):
            self._at(self.now + self.rng.uniform(0, t.signal_gap_s) * t.pace(r), "worker", r, i + 1)
        p = self.procs[r]
        if p.state in ("serving", "draining") and not self._deferred(p, seq, "signal", r, p.n, self.sc.worker[i]):
            self._signal(p, self.sc.worker[i])
        # a signal for a process that is starting or gone is lost (its worker registers again)

    def _on_signal(self, seq: int, r: int, n: int, msg: LayerSignal) -> None:
        p = self.procs[r]
        if p.n == n and p.alive and not self._deferred(p, seq, "signal", r, n, msg):
            self._signal(p, msg)

    def _signal(self, p: Process, msg: LayerSignal) -> None:
        p.ready_layers.add((msg.step, msg.layer))
        self._wake(p)
        self.apply(p, cast(Runs, p.core).signal(msg, self.now, p.holding))

    def _wake(self, p: Process) -> None:
        """A message reaches ``p``: with batching on, it joins the open wake-up or opens one, whose
        writes are planned when it ends (within ``batch_s``)."""
        if self.timing.batch_s <= 0 or p.holding:
            return
        p.holding = True
        p.core.hold()
        self._at(self.now + self.rng.uniform(0, self.timing.batch_s), "flush", p.rank, p.n)

    def _on_flush(self, seq: int, r: int, n: int) -> None:
        p = self.procs[r]
        if p.n != n or not p.alive or self._deferred(p, seq, "flush", r, n):
            return
        p.holding = False
        self.apply(p, p.core.flush(self.now))

    def _on_scheduler(self, seq: int, r: int, i: int) -> None:
        if i + 1 < len(self.sc.schedulers[r]):
            self._at(self.now + self.rng.uniform(0, self.timing.sched_gap_s), "scheduler", r, i + 1)
        self._waiting[r].append(self.sc.schedulers[r][i])  # queued in the scheduler's socket until served
        self._serve_scheduler(r)

    def _serve_scheduler(self, r: int) -> None:
        p = self.procs[r]
        while self._waiting[r] and p.state in ("serving", "draining") and p.stalled_until <= self.now:
            msg = self._waiting[r].pop(0)
            if isinstance(msg, CacheInfo) and p.state == "draining":
                refusal = (ErrorCode.UNAVAILABLE, "the prefill daemon is shutting down")
                self._wake(p)
                self.apply(p, p.core.on_cache_info(msg, self.now, refusal))
            else:
                self._wake(p)
                self.apply(p, p.core.handle(msg, self.now))
        if p.stalled_until > self.now and self._waiting[r]:
            self._at(p.stalled_until, "serve", r)

    def _on_serve(self, seq: int, r: int) -> None:
        self._serve_scheduler(r)

    def _on_to_barrier(self, seq: int, r: int, msg: Message, epoch: int) -> None:
        if epoch != self.epochs and self.rng.random() < 0.5:
            return  # on its way to a service that died: lost with it
        self._route(self.barrier.handle(msg, self.now), r)

    def _on_to_rank(self, seq: int, r: int, n: int, msg: Message) -> None:
        p = self.procs[r]
        if p.n != n or not p.alive or self._deferred(p, seq, "to_rank", r, n, msg):
            return
        if isinstance(msg, Ack):
            epoch = msg.ref.partition(" ")[2]
            restarted = p.epoch is not None and epoch != p.epoch
            p.epoch = epoch
            if restarted and p.state != "starting":  # the link sees a new run: say every open word again
                for eff in p.core.reannounce(self.now):
                    assert isinstance(eff, ToBarrier), eff
                    self._send(("b", r), "to_barrier", r, eff.message, self.epochs)
            return
        if getattr(msg, "key", None) == STARTUP_KEY:
            if p.state == "starting":
                self._started(p, msg)
            return
        if p.state == "starting":
            return  # a daemon waiting at the start-up barrier ignores the rest
        if isinstance(msg, Problem):  # the service did not know the group: say Hello, hear the new run
            self._send(("b", r), "to_barrier", r, self._hello(p), self.epochs)
            return
        if isinstance(msg, Admitted):
            p.admitted.add((msg.key, msg.instance))
        self._wake(p)
        self.apply(p, p.core.handle(msg, self.now))

    def _on_done(self, seq: int, r: int, n: int, wid: int) -> None:
        p = self.procs[r]
        if p.n == n and p.alive and wid in p.writes and not self._deferred(p, seq, "done", r, n, wid):
            self.complete_write(p, wid)

    def _on_to_decode(self, seq: int, d: int, sender: bytes, msg: KVReady | TransferResult) -> None:
        self._to_decode_engine(d, self.decoders[d].notice(sender, msg, self.now))

    def _to_decode_engine(self, d: int, effects: list) -> None:
        """What decode rank ``d``'s core decided: notices handed to its engine, confirmations sent
        to the prefill rank each names (a notice gathered from several writers confirms each)."""
        decoder = self.decoders[d]
        confirms: list[Confirm] = []
        for eff in effects:
            if isinstance(eff, Confirm):  # a repeat: confirmed as the first was told
                confirms.append(eff)
            elif isinstance(eff, Deliver):
                key = eff.notice.key
                # (a stopped writer's writes in flight are the one exception: the barrier service
                # speaks for it once it counts it stopped; see the README on SIGSTOP)
                busy = [
                    w
                    for w in self.writers[d]
                    if self.procs[w].stalled_until <= self.now
                    for x in self.procs[w].writes.values()
                    if key in x.requests
                ]
                assert not busy, f"decode rank {d}'s engine told {key} ended while ranks {busy} still write into it"
                self.told[d][key].append(eff.notice)
                if id(eff.notice) not in self.sources:  # gathered from several writers (or the barrier's word)
                    sole = isinstance(eff.notice, KVReady) and len(eff.confirm) == len(self.writers[d])
                    self.sources[id(eff.notice)] = self.procs[self.writers[d][0]] if sole else None
                confirms += [e for e in decoder.delivered(eff, self.now) if isinstance(e, Confirm)]
        for confirm in confirms:  # to whichever process of that rank runs now
            r = int(confirm.sender.decode().rpartition(":")[2])
            self._send(("c", r), "confirmed", r, confirm.message)

    def _on_confirmed(self, seq: int, r: int, received: Received) -> None:
        """Decode rank ``r`` confirmed a notice: the ok result its prefill rank held goes now, as
        the decode engine was told (NoticeLedger.confirmed does the same in the daemon)."""
        p = self.procs[r]
        if not p.alive or self._deferred(p, seq, "confirmed", r, received):
            return
        then = p.held.get(received.key)
        if then is None:
            return  # a repeat, or a notice of an earlier process of this rank
        waiting, failure = p.confirming[received.key]
        waiting.discard(received.rank)  # (a larger decode group: every decode rank written confirms)
        if received.status is not Status.OK and failure is None:
            failure = received
        p.confirming[received.key] = (waiting, failure)
        if waiting:
            return
        del p.held[received.key], p.confirming[received.key]
        if failure is not None:
            then = as_failed(then, failure.reason, ErrorCode(failure.code or ErrorCode.UNAVAILABLE.value))
        self._report(p, then)
        self._exit_if_idle(p)

    def _on_verdict_to_decode(self, seq: int, d: int, msg: Release | Diverged | Expired) -> None:
        effects = self.decoders[d].writer_gone(msg, self.now)
        for eff in effects:
            if isinstance(eff, Deliver) and len(eff.confirm) == 0:
                self.sources[id(eff.notice)] = None  # the barrier spoke for every writer
        self._to_decode_engine(d, effects)

    def _on_heartbeat(self, seq: int, r: int, n: int) -> None:
        p = self.procs[r]
        if p.n != n or not p.alive:
            return
        if p.stalled_until > self.now:
            self._at(p.stalled_until, "heartbeat", r, n)  # back from a stop: the heartbeat goes first
            return
        if self._idle() and p.state == "serving":
            self._asleep.append((r, n))  # nothing happens that a heartbeat could matter to: skip time
            return
        if p.state != "starting":
            self._send(("b", r), "to_barrier", r, self._hello(p), self.epochs)
        self._at(self.now + self.timing.heartbeat_s, "heartbeat", r, n)

    def _idle(self) -> bool:
        """Nothing in flight, no round open, no verdict remembered (the service watches heartbeats
        for those too), and every process knows the service's current run: a heartbeat could
        change nothing until something else happens."""
        sizes = self.barrier.sizes()
        if self._busy or sizes["open"] or sizes["ended"]:
            return False
        return all(p.epoch == str(self.epochs) for p in self.procs if p.alive)

    def _on_restart(self, seq: int) -> None:
        """The barrier service dies and a new one starts: what it held is gone."""
        self.epochs += 1
        self._due.pop(self.barrier, None)
        self._dirty.discard(self.barrier)
        self.barrier = self._new_barrier()
        # the new one reads back its predecessor's journal: the verdicts younger than its memory,
        # then the words of keys they did not end (as Journal.load orders them)
        self.journal = [(t, v) for t, v in self.journal if self.now - t < self.barrier.remember_s]
        verdict_types = (Release, Diverged, Expired)
        for t, v in sorted(self.journal, key=lambda e: not isinstance(e[1], verdict_types)):
            self.barrier.recall(v, self.now - t, self.now)

    def _on_die(self, seq: int, r: int, back: float) -> None:
        p = self.procs[r]
        if p.alive:
            self._gone(p, back)

    def _on_term(self, seq: int, r: int, back: float) -> None:
        p = self.procs[r]
        if p.state == "serving":
            p.state, p.stop_at, p.back_after = "draining", self.now + self.shutdown_s, back
            self._dirty.add(p)
            self._exit_if_idle(p)

    def _on_stall(self, seq: int, r: int, length: float) -> None:
        p = self.procs[r]
        if p.alive:
            p.stalled_until = max(p.stalled_until, self.now + length)
            self._dirty.add(p)
            self._at(p.stalled_until, "resume", r, p.n, seq=-1)  # before what waited for it

    def _on_resume(self, seq: int, r: int, n: int) -> None:
        """The process runs again: as the daemon's on_stall, before it reads anything that waited,
        a stop longer than a heartbeat stops every request still writing (see RankCore.stalled)."""
        p = self.procs[r]
        if p.n != n or not p.alive or p.stalled_until > self.now:
            return  # stopped longer (a later resume comes), or gone
        if self.now - p.last_said >= ALIVE_BEATS * self.timing.heartbeat_s:  # as the daemon's on_stall
            self.apply(p, p.core.stalled(f"rank {r} said nothing for a while", self.now))

    def _on_revive(self, seq: int, r: int) -> None:
        """A new process of rank ``r``: it says Hello as starting and arrives at the start-up key;
        the running group lets it join (and sends it every verdict the service remembers)."""
        old = self.procs[r]
        self._due.pop(old, None)
        self._dirty.discard(old)
        p = self.procs[r] = self._process(r, old.n + 1, "starting")
        self.history.append(p)
        self._send(("b", r), "to_barrier", r, self._hello(p), self.epochs)
        arrive = Arrive(GROUP, STARTUP_KEY, 0, r, Digest(0, 0, 0, FINGERPRINT), 60.0)
        self._send(("b", r), "to_barrier", r, arrive, self.epochs)
        self._at(self.now + self.timing.heartbeat_s, "heartbeat", r, p.n)
        # a daemon waits for its start-up verdict a little past the round's timeout, then exits 1
        # and is started again (its arrival may have died with a barrier service that restarted)
        self._at(self.now + self.barrier_timeout_s + 0.5, "startup_deadline", r, p.n)

    def _on_startup_deadline(self, seq: int, r: int, n: int) -> None:
        p = self.procs[r]
        if p.n == n and p.state == "starting":
            self._gone(p, 0.1)

    # -- processes ---------------------------------------------------------------

    def _new_barrier(self) -> BarrierState:
        alive_s = ALIVE_BEATS * self.timing.heartbeat_s
        barrier = BarrierState(
            timeout_s=self.barrier_timeout_s,
            epoch=str(self.epochs),
            alive_s=alive_s,
            decode_of={PEER: DECODE},
            groups={GROUP: self.world, DECODE: self.dworld},  # from the config, as the service
            targets={(GROUP, DECODE): self.targets},
            remember_s=float(self.settings.get("pending_timeout_s", 30.0))
            + float(self.settings.get("verdict_timeout_s", 60.0)),
        )
        for d in range(self.dworld):  # the decode group (its heartbeats are not simulated)
            barrier.hello(Hello(DECODE, d, self.dworld, "decode", FINGERPRINT), self.now)
        self._dirty.add(barrier)
        return barrier

    def _process(self, r: int, n: int, state: str) -> Process:
        sc = self.sc
        settings = RankSettings(
            GROUP, r, self.world, sc.num_layers, sc.num_blocks, sc.block_tokens, BLOCK_BYTES, **self.settings
        )  # type: ignore[arg-type]
        p = Process(r, n, cast(RankCore, Runs(RankCore(settings), lambda: self.now)), state)
        self._dirty.add(p)
        return p

    def _hello(self, p: Process) -> Hello:
        return Hello(GROUP, p.rank, self.world, "prefill", FINGERPRINT if p.state != "starting" else "")

    def _started(self, p: Process, verdict: Message) -> None:
        if isinstance(verdict, Release):
            p.state = "serving"
            self._serve_scheduler(p.rank)
        else:  # the start-up barrier failed (a cold start nobody else joined): it exits; it is started again
            assert isinstance(verdict, (Expired, Diverged))
            self._gone(p, 0.1)

    def _gone(self, p: Process, back: float) -> None:
        """The process ends (killed, or exited): what it held goes with it; a new one starts later."""
        p.state, p.stop_at = "gone", None
        p.writes.clear()  # its transports are gone: nothing more of it lands
        self._dirty.add(p)
        self._at(self.now + back, "revive", p.rank)

    def _force(self, p: Process) -> None:
        """The drain deadline passed: stop the transports, end what is left, exit."""
        p.writes.clear()
        effects = p.core.close("the prefill daemon is shutting down (drain deadline passed)", self.now, report=False)
        assert not [e for e in effects if isinstance(e, (ToEngine, ToPeer))], "an exiting process reported alone"
        self.apply(p, effects)
        self._gone(p, p.back_after)

    def _exit_if_idle(self, p: Process) -> None:
        if p.state == "draining" and p.core.sizes()["requests"] == 0 and not p.held:
            self._gone(p, p.back_after)

    # -- effects -----------------------------------------------------------------

    def _route(self, effects: list, sender: int | None) -> None:
        self._dirty.add(self.barrier)
        self.journal += [(self.now, v) for v in self.barrier.take_journal()]  # written before sent
        for eff in effects:
            if isinstance(eff, Problem):  # the service refused a word: its sender hears an Error
                if eff.code is ErrorCode.NOT_REGISTERED and sender is not None:
                    self._send(("r", sender), "to_rank", sender, self.procs[sender].n, eff)
                else:
                    self.barrier_problems.append(eff)
                continue
            assert isinstance(eff, ToRank), eff
            if eff.group == DECODE:  # a verdict for a decode rank whose prefill writer is absent
                self._send(("bd", eff.rank), "verdict_to_decode", eff.rank, eff.message)
                continue
            target = self.procs[eff.rank]
            if target.alive:  # an identity nobody holds now: the ROUTER drops it
                self._send(("r", eff.rank), "to_rank", eff.rank, target.n, eff.message)

    def apply(self, p: Process, effects: list) -> None:
        r = p.rank
        self._dirty.add(p)
        for eff in effects:
            if isinstance(eff, Write):
                told = [k for k in eff.requests if any(self.told[d].get(k) for d in self.targets[r])]
                assert not told, f"rank {r} writes for {told} after its decode rank's engine was told they ended"
                self.check_write(p, eff)
                p.writes[eff.write_id] = eff
                self.written.update(eff.requests)
                self._at(self.now + self.rng.uniform(0, self.timing.write_s), "done", r, p.n, eff.write_id)
            elif isinstance(eff, ToBarrier):
                if isinstance(eff.message, Arrive):
                    key = (eff.message.key, eff.message.instance)
                    assert key not in p.arrivals, f"rank {r} arrived twice for {key}"
                    p.arrivals[key] = eff.message.digest
                self._send(("b", r), "to_barrier", r, eff.message, self.epochs)
            elif isinstance(eff, ToEngine):
                self._report(p, eff)
            elif isinstance(eff, ToPeer) and eff.peer != PEER:
                # a cache_info that named another decode group (a divergence): the shell resolves no
                # such group, so the notice goes nowhere; this group's ranks hear it from the barrier
                assert eff.then is None and not isinstance(eff.message, KVReady), f"rank {r}: {eff}"
                p.unresolved += 1
            elif isinstance(eff, ToPeer):
                if eff.then is not None:
                    assert eff.then.result.key not in p.held, f"rank {r} told {eff.then.result.key} twice"
                    assert eff.then.result.status is Status.OK, f"rank {r} held back a failure: {eff}"
                    p.held[eff.then.result.key] = eff.then
                    p.confirming[eff.then.result.key] = (set(self.targets[r]), None)
                key = eff.message.key
                mine = [w.write_id for w in p.writes.values() if key in w.requests]
                assert not mine, f"rank {r} told decode {key} ended while its writes {mine} are in flight"
                if self.quiesce:
                    busy = [q.rank for q in self.procs for w in q.writes.values() if key in w.requests]
                    assert not busy, f"decode told {key} ended while ranks {busy} still write into it"
                if isinstance(eff.message, KVReady):
                    self.check_in_place(key)
                self.notices[key].append((r, eff.message))
                for d in self.targets[r]:  # (the shell gives each decode rank its own rank number)
                    notice = eff.message if d == r else replace(eff.message, rank=d)
                    self.sources[id(notice)] = p
                    self._send(("d", r), "to_decode", d, identity(r), notice)
            elif isinstance(eff, Problem):
                p.problems.append(eff)
            else:
                raise AssertionError(f"unexpected effect {eff!r}")
        self._exit_if_idle(p)

    def _report(self, p: Process, eff: ToEngine) -> None:
        key = eff.result.key
        p.results[key].append(eff.result)
        assert len(p.results[key]) == 1, f"rank {p.rank} ended {key} twice: {p.results[key]}"
        assert p.core.holds(key) == [], f"rank {p.rank} still holds {key} in {p.core.holds(key)}"

    def complete_write(self, p: Process, wid: int, error: str | None = None) -> None:
        write = p.writes.pop(wid)
        if error is None:
            for layer, run in itertools.product(write.layers, write.runs):
                for i in range(run.length):
                    where = (p.rank, layer, run.dst + i)
                    assert where not in self.decode, f"rank {p.rank} wrote layer {layer} block {run.dst + i} twice"
                    self.decode[where] = run.src + i
        self.apply(p, p.core.write_done(wid, self.now, error, "shm", GENERATION))

    # -- checks -----------------------------------------------------------------

    def check_write(self, p: Process, write: Write) -> None:
        r = p.rank
        for key in write.requests:
            assert key in p.admitted, f"rank {r} wrote for {key} before the barrier admitted it"
            assert not self.sc.plans[key].tainted, f"rank {r} wrote for {key}, which the ranks disagree on"
        for run in write.runs:
            for i in range(run.length):
                key, b = self.src_owner[run.src + i]
                plan = self.sc.plans[key]
                assert plan.dst[b] == run.dst + i, f"{key} block {b} sent to {run.dst + i}, belongs at {plan.dst[b]}"
                step = self.block_step.get((key, b))
                assert step is not None, f"rank {r} sent block {b} of {key}, which no step completed"
                for layer in write.layers:
                    assert (step, layer) in p.ready_layers, (
                        f"rank {r} sent layer {layer} of {key} block {b} before step {step} wrote it"
                    )

    def check_in_place(self, key: Key) -> None:
        """A KVReady may only be sent once every rank's data is in the decode cache."""
        plan = self.sc.plans[key]
        for r in range(self.world):
            for layer in range(self.sc.num_layers):
                for b, dst in enumerate(plan.dst):
                    got = self.decode.get((r, layer, dst))
                    assert got == plan.src[b], f"KVReady for {key} but rank {r} layer {layer} block {dst} holds {got}"

    def survivors(self) -> list[int]:
        """Ranks whose first process ran to the end."""
        return [r for r in range(self.world) if self.procs[r].n == 0 and self.procs[r].alive]

    @staticmethod
    def notice_status(msg: KVReady | TransferResult) -> Status:
        return Status.OK if isinstance(msg, KVReady) else msg.status
