"""Property: any interleaving, any timing and the process faults end every instance once, the same everywhere.

For 2 to 8 prefill ranks, and a decode group of the same size, a smaller one
(several prefill ranks write into each decode rank) or a larger one (each
prefill rank writes into several, and is ok only once each confirmed), as the
rank map of groups of different sizes says, hypothesis draws a scenario (chunked and unchunked requests,
slot reuse, aborts, ids reused with new instances; on some ranks a cache_info
with one field changed, one that must be refused, an abort that overtakes its
cache_info, late repeats of messages of ended instances), a timing (message
latencies, each worker's and scheduler's pace, a rank that is much slower than
the others, write times) and faults: the barrier service restarts, a rank is
killed and starts again, a rank is drained (SIGTERM), a rank is stopped
(SIGSTOP) for a while. The simulation (:mod:`tests.unit.sim`) runs it on one
clock, so deadlines fire between deliveries whenever they fall due.
Invariants, always:

* no process ends an instance twice, and every report of an instance, from
  any process of any rank, has one status;
* every rank whose first process ran to the end ends every instance once;
* every decode engine is told each instance at most once, and exactly once,
  with that status, when its prefill ranks ran to the end, and never while
  one of its writers may still write;
* no byte is written for an instance before the rank was admitted, none at
  all for one the ranks disagree on; no decode rank is told while its prefill
  rank still writes into it; a KVReady only once every rank's bytes are in place;
* every table is empty at the end.

And when nothing can legitimately fail (no rank killed, drained or stopped,
none slow; the barrier may restart): every instance all ranks could finish
ends ok with the right bytes, and nothing waits on a deadline once the streams
are done.

``KVXFERD_PROPERTY_EXAMPLES`` sets the number of examples of the default run
(500, fixed seed); the ``slow`` run draws 10,000 with a new seed each time and
prints it (``KVXFERD_PROPERTY_SEED`` replays one).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from kvxferd.protocol import ErrorCode, KVReady, Status, TransferResult
from tests.unit.sim import BLOCK_BYTES, Faults, GroupSim, Timing, build_scenario

EXAMPLES = int(os.environ.get("KVXFERD_PROPERTY_EXAMPLES", "500"))
SLOW_EXAMPLES = 10_000

#: problems a scenario's own mistakes may cause (the refusals and repeats it plants)
PLANTED = {ErrorCode.STALE_SIGNAL, ErrorCode.DUPLICATE_REQUEST, ErrorCode.BAD_LAYOUT, ErrorCode.OUT_OF_RANGE}

#: the deadlines of every process (and the barrier's round timeout), against which timing and faults
#: are drawn: the defaults' proportions, and a rank's verdict deadline barely past the round timeout
DEADLINES = (
    {"pending_timeout_s": 2.0, "progress_timeout_s": 2.0, "verdict_timeout_s": 4.0, "barrier_timeout_s": 2.0},
    {"pending_timeout_s": 1.0, "progress_timeout_s": 1.0, "verdict_timeout_s": 1.2, "barrier_timeout_s": 1.0},
)
SHUTDOWN_S = 0.3


@dataclass(frozen=True)
class Case:
    """Everything one example drew: printed when it fails, and enough to run it again."""

    world: int
    scenario: dict[str, float]  # build_scenario's arguments, its seed first
    timing: Timing
    faults: Faults
    interleave: int  # the seed of the simulation's own choices
    deadlines: int = 0  # which of DEADLINES
    dworld: int = 0  # the decode group's size (0: the prefill group's); smaller: several writers each, larger:
    # each prefill rank writes into several

    def sim(self) -> GroupSim:
        args = dict(self.scenario)
        scenario = build_scenario(random.Random(int(args.pop("seed"))), world=self.world, **args)  # type: ignore[arg-type]
        calm = self.faults.harmless and all(f == 1.0 for f in self.timing.slow)
        return GroupSim(
            scenario,
            self.world,
            random.Random(self.interleave),
            timing=self.timing,
            faults=self.faults,
            quiesce=calm,
            decode_world=self.dworld,
            shutdown_s=SHUTDOWN_S,
            **DEADLINES[self.deadlines],
        )


@st.composite
def cases(draw: st.DrawFn) -> Case:
    world = draw(st.integers(2, 8))
    rates = st.sampled_from([0.0, 0.1, 0.3])
    scenario = {
        "seed": draw(st.integers(0, 2**32 - 1)),
        "num_layers": draw(st.integers(1, 4)),
        "block_tokens": draw(st.sampled_from([1, 3, 4, 16])),
        "num_slots": draw(st.sampled_from([2, 3, 4, 5, 1])),
        "num_steps": draw(st.sampled_from([6, 8, 10, 12, 3, 1])),
        "abort_rate": draw(st.sampled_from([0.0, 0.2, 0.5])),
        "divergence_rate": draw(rates),
        "refusal_rate": draw(rates),
        "reuse_rate": draw(rates),
        "early_abort_rate": draw(st.sampled_from([0.0, 0.3, 1.0])),
        "late_rate": draw(rates),
    }
    deadlines = draw(st.sampled_from(range(len(DEADLINES))))
    round_s = DEADLINES[deadlines]["barrier_timeout_s"]
    slow = draw(st.sampled_from([1.0, 1.0, 1.0, 8.0, 20.0, 40.0]))
    timing = Timing(
        latency_s=draw(st.sampled_from([0.0005, 0.002, 0.01])),
        signal_gap_s=draw(st.sampled_from([0.001, 0.004, 0.02])),
        sched_gap_s=draw(st.sampled_from([0.001, 0.008, 0.03])),
        write_s=draw(st.sampled_from([0.0005, 0.003, 0.02])),
        slow=tuple(slow if r == world - 1 else 1.0 for r in range(world)),
        batch_s=draw(st.sampled_from([0.0, 0.0, 0.001, 0.005])),
    )
    # faults fall within the run: about as long as the slowest worker's stream
    steps = int(scenario["num_steps"]) * int(scenario["num_layers"])
    horizon = steps * timing.signal_gap_s / 2 * slow + 0.05
    at = st.floats(0.0, horizon, allow_nan=False)
    rank = st.integers(0, world - 1)
    # restarts at random, or in a burst, each within a round's timeout of the one before
    if draw(st.booleans()):
        restarts = tuple(sorted(draw(st.lists(at, max_size=3))))
    else:
        spacing = draw(st.lists(st.floats(0.2, 1.0), min_size=1, max_size=3))
        first = draw(at)
        restarts = tuple(first + sum(spacing[:i]) * round_s for i in range(len(spacing)))
    faults = Faults(
        restarts=restarts,
        deaths=tuple(draw(st.lists(st.tuples(rank, at, st.floats(0.05, 1.0)), max_size=1))),
        drains=tuple(draw(st.lists(st.tuples(rank, at, st.floats(0.05, 1.0)), max_size=1))),
        stalls=tuple(draw(st.lists(st.tuples(rank, at, st.floats(0.01, 0.6)), max_size=2))),
    )
    faults = draw(st.sampled_from([Faults(), Faults(restarts=faults.restarts), faults]))
    # a decode group of the same size, a smaller one (several writers per decode rank) or a larger one
    # (a prefill rank writing into several decode ranks): issue 24
    smaller = [d for d in range(1, world) if world % d == 0]
    larger = [d for d in range(world + 1, 9) if d % world == 0]
    dworld = draw(st.sampled_from([world, *smaller, *larger]))
    return Case(world, scenario, timing, faults, draw(st.integers(0, 2**32 - 1)), deadlines, dworld)


def lone(res: TransferResult | None) -> bool:
    """Whether ``res`` is an ending its rank decided alone: it carries a ``code`` (a refusal, a
    forced stop, a new process that cannot vouch for a release, a decode rank that told its
    engine otherwise). The group's ending is every other result: one status and one reason."""
    return res is not None and bool(res.code)


def check(case: Case) -> None:
    sim = case.sim()
    sim.run()
    world, plans = sim.world, sim.sc.plans
    calm = sim.faults.harmless and all(f == 1.0 for f in sim.timing.slow)
    # nothing ends on a deadline of its own when nothing could make it late
    assert not (calm and sim.overdue), f"a request's deadline passed in a calm run: {sim.overdue}"
    survivors = sim.survivors()
    for key, plan in plans.items():
        reports = [(p, res) for p in sim.history for res in p.results.get(key, [])]
        # every report of an instance has one status and one reason, the group's ...
        group = {(res.status, res.reason) for p, res in reports if not lone(res)}
        assert len(group) <= 1, f"{key}: ranks disagree: {[(p.rank, p.n, res) for p, res in reports]}"
        status = next(iter(group))[0] if group else None
        # ... but for an ending a process decided alone (see lone): never ok unless the group's is
        for p, res in reports:
            assert res.status is not Status.OK or status in (Status.OK, None), f"{key}: {p.rank}.{p.n} {res}"
            # ok on a prefill rank only if its decode rank's engine was told ready (issue 23, item 8)
            for there in sim.targets[p.rank]:  # every decode rank it wrote into
                told_there = sim.told[there].get(key, [])
                assert res.status is not Status.OK or [type(m) for m in told_there] == [KVReady], (
                    key,
                    there,
                    told_there,
                )
        # every rank that ran to the end reported it once
        for r in survivors:
            assert len(sim.procs[r].results.get(key, [])) == 1, f"{key}: rank {r}: {sim.procs[r].results.get(key)}"
        for d in range(sim.dworld):
            told = sim.told[d].get(key, [])
            assert len(told) <= 1, f"{key}: decode rank {d} told twice: {told}"
            # a decode rank whose prefill rank died hears from the barrier service instead (which
            # recalls its verdicts after a restart of its own)
            assert len(told) == 1, f"{key}: decode rank {d} never told ({sim.notices[key]})"
            for msg in told:
                said, source = sim.notice_status(msg), sim.sources[id(msg)]
                # relayed by the barrier for an absent writer: a release it cannot vouch for fails
                alone = source is None or lone(msg if isinstance(msg, TransferResult) else None)
                assert said is status or (alone and said is not Status.OK) or status is None, (key, status, told)
        if plan.tainted:
            assert key not in sim.written, f"{key}: bytes written although the ranks disagree"
            assert status in (Status.FAILED, Status.ABORTED, None), (key, reports)
            assert plan.aborted or status is not Status.ABORTED, (key, reports)
        elif calm and plan.aborted:
            assert status in (Status.OK, Status.ABORTED), (key, reports)
        elif calm:
            # every rank arrived with the same digest, and the barrier released it
            digests = [sim.procs[r].arrivals.get(key) for r in range(world)]
            assert None not in digests and len(set(digests)) == 1, f"{key}: {digests}"
            assert status is Status.OK, f"{key}: {reports}"
            expected = len(plan.dst) * sim.sc.num_layers * BLOCK_BYTES * 2  # K and V
            assert all(res.bytes == expected for _, res in reports), (expected, reports)

    for p in sim.procs:
        if p.alive:
            assert set(p.core.sizes().values()) == {0}, f"rank {p.rank} tables not empty: {p.core.sizes()}"
            assert not p.writes
    for p in sim.history if calm else ():
        unexpected = [x for x in p.problems if x.code not in PLANTED]
        assert not unexpected, f"rank {p.rank}: {unexpected}"
    assert sim.barrier.sizes()["open"] == 0
    assert all(not d.held for d in sim.decoders)
    assert not sim.barrier_problems, sim.barrier_problems


def _run(examples: int, fixed_seed: int) -> None:
    @seed(fixed_seed)  # reproducible
    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(cases())
    def prop(case: Case) -> None:
        check(case)

    prop()


def test_every_interleaving_ends_every_instance_once_the_same_everywhere() -> None:
    _run(EXAMPLES, 8)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_every_interleaving_ends_every_instance_once_the_same_everywhere_many_examples() -> None:
    drawn = int(os.environ.get("KVXFERD_PROPERTY_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\nproperty seed {drawn} (KVXFERD_PROPERTY_SEED={drawn} replays it)")
    _run(SLOW_EXAMPLES, drawn)


#: found by the property above (its default run) before the fix: rank 0 arrived at once, rank 1
#: (twenty times slower) arrived over a second later; the barrier service restarted twice, each new
#: one reopening the round with a fresh timeout when the ranks said their words again, but rank 0's
#: deadline for a verdict kept counting from its first arrival: it ended the request failed on its
#: own ("no verdict ... within 1.2s") and the reopened round then released it, ok on rank 1.
VERDICT_AFTER_RESTART = Case(
    world=2,
    scenario={
        "seed": 0, "num_layers": 1, "block_tokens": 1, "num_slots": 3, "num_steps": 6, "abort_rate": 0.0,
        "divergence_rate": 0.0, "refusal_rate": 0.0, "reuse_rate": 0.0, "early_abort_rate": 0.0, "late_rate": 0.0,
    },
    timing=Timing(latency_s=0.0005, signal_gap_s=0.02, sched_gap_s=0.001, write_s=0.0005, slow=(1.0, 20.0)),
    faults=Faults(restarts=(0.0, 1.0)),
    interleave=0,
    deadlines=1,
)  # fmt: skip


def test_a_word_said_again_to_a_restarted_service_waits_a_whole_verdict_deadline_again() -> None:
    check(VERDICT_AFTER_RESTART)
