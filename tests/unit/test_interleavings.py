"""Property: any interleaving of the same streams gives every rank the same jobs and outcomes.

For 2 to 8 ranks, hypothesis draws a scenario (chunked and unchunked requests,
slot reuse, aborts) and a per-rank interleaving of the worker stream, the
scheduler stream, write completions (in any order) and barrier verdicts.
"""

from __future__ import annotations

import os
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvxferd.protocol import Status
from tests.unit.sim import BLOCK_BYTES, GroupSim, build_scenario

EXAMPLES = int(os.environ.get("KVXFERD_PROPERTY_EXAMPLES", "500"))


@st.composite
def cases(draw: st.DrawFn) -> tuple[GroupSim, int]:
    world = draw(st.integers(2, 8))
    seed = draw(st.integers(0, 2**32 - 1))
    scenario = build_scenario(
        random.Random(seed),
        num_layers=draw(st.integers(1, 4)),
        block_tokens=draw(st.sampled_from([1, 3, 4, 16])),
        num_slots=draw(st.sampled_from([2, 3, 4, 5, 1])),
        num_steps=draw(st.sampled_from([6, 8, 10, 12, 3, 1])),
        abort_rate=draw(st.sampled_from([0.0, 0.2, 0.5])),
    )
    interleave = draw(st.integers(0, 2**32 - 1))
    return GroupSim(scenario, world, random.Random(interleave)), world


@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(cases())
def test_every_interleaving_gives_every_rank_the_same_outcome(case: tuple[GroupSim, int]) -> None:
    sim, world = case
    sim.run()
    # Nothing may be waiting on a deadline for a request that all ranks could finish.
    for r, rank in enumerate(sim.ranks):
        live = rank.core.snapshot(sim.now)
        assert all(sim.sc.plans[x["request_id"]].aborted for x in live), f"rank {r} stuck: {live}"
    sim.settle_timers()

    for rid, plan in sim.sc.plans.items():
        results = [rank.results.get(rid, []) for rank in sim.ranks]
        # each request ends exactly once on every rank ...
        assert all(len(rs) == 1 for rs in results), f"{rid}: {results}"
        statuses = {rs[0].status for rs in results}
        # ... with the same status everywhere
        assert len(statuses) == 1, f"{rid}: ranks disagree: {results}"
        if not plan.aborted:
            # every rank arrived with the same digest, and the barrier released it
            digests = [rank.arrivals.get(rid) for rank in sim.ranks]
            assert None not in digests and len(set(digests)) == 1, f"{rid}: {digests}"
            assert statuses == {Status.OK}, f"{rid}: {results}"
            expected = len(plan.dst) * sim.sc.num_layers * BLOCK_BYTES * 2  # K and V
            assert all(rs[0].bytes == expected for rs in results), (expected, results)
        # the decode side hears about it from every rank, once
        assert sorted(r for r, _ in sim.notices[rid]) == list(range(world)), (rid, sim.notices[rid])

    for r, rank in enumerate(sim.ranks):
        assert set(rank.core.sizes().values()) == {0}, f"rank {r} tables not empty: {rank.core.sizes()}"
        assert not rank.writes
        unexpected = [p for p in rank.problems if p.code.value not in ("stale_signal",)]
        assert not unexpected, f"rank {r}: {unexpected}"
    assert sim.barrier.sizes()["open"] == 0
