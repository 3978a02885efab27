"""Scenario tests of one prefill rank's pure core (fake clock, no I/O)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from kvxferd.core import BarrierState, PostWrite, Problem, RankCore, RankSettings, Run, ToBarrier, ToEngine, ToPeer
from kvxferd.protocol import (
    Abort,
    Arrive,
    CacheInfo,
    Diverged,
    ErrorCode,
    Expired,
    Hello,
    KVReady,
    LayerSignal,
    Release,
    SlotChunk,
    Status,
    TransferResult,
    Withdraw,
)
from tests.unit.sim import GroupSim, build_scenario

LAYERS = 3
SETTINGS = RankSettings(
    group="prefill",
    rank=0,
    world_size=2,
    num_layers=LAYERS,
    num_blocks=64,
    block_tokens=16,
    block_bytes=1024,
    pending_timeout_s=5.0,
    progress_timeout_s=7.0,
    verdict_timeout_s=11.0,
)


def core(rank: int = 0, **overrides: object) -> RankCore:
    return RankCore(replace(SETTINGS, rank=rank, **overrides))  # type: ignore[arg-type]


def info(rid: str, slot: int, step: int, tokens: int, src: list[int], dst: list[int], peer: str = "d") -> CacheInfo:
    return CacheInfo(rid, slot, step, tokens, tuple(src), tuple(dst), peer)


def layers(step: int, *slots: SlotChunk) -> list[LayerSignal]:
    return [LayerSignal(step, 0, slots), *(LayerSignal(step, layer) for layer in range(1, LAYERS))]


def of(effects: list, kind: type) -> list:
    return [e for e in effects if isinstance(e, kind)]


def feed(c: RankCore, msgs: list, now: float = 0.0, complete: bool = True) -> list:
    """Deliver messages; complete every write at once when ``complete``."""
    out: list = []
    for msg in msgs:
        effects = c.handle(msg, now)
        out += effects
        if complete:
            for w in of(effects, PostWrite):
                out += c.write_done(w.write_id, now)
    return out


# -- the published deadlock ----------------------------------------------------------------------


def test_published_deadlock_ranks_see_cache_info_before_and_after_layer0_yet_agree() -> None:
    """Requests A (slot 3) and B (slot 5) run in one step. Rank 0 has both cache_infos before
    the layer-0 signal, rank 1 gets them after it. Count-based barriers deadlocked here: rank 0
    batched [A, B], rank 1 did [A] then [B]. Per-request arrivals must match instead."""
    a = info("A", 3, 1, 40, [0, 1, 2], [10, 11, 12])
    b = info("B", 5, 1, 20, [3, 4], [13, 14])
    step = layers(1, SlotChunk(3, 0, 40, 1), SlotChunk(5, 0, 20, 1))
    r0, r1 = core(0), core(1)
    out0 = feed(r0, [a, b, *step])
    out1 = feed(r1, [*step, a, b])

    # rank 0 wrote each layer of A and B together; rank 1 wrote them request by request
    assert [w.requests for w in of(out0, PostWrite)] == [("A", "B")] * LAYERS
    assert [w.requests for w in of(out1, PostWrite)] == [("A",)] * LAYERS + [("B",)] * LAYERS
    # ... yet both produced the same single-request arrivals
    arrivals0 = {t.message.key: t.message.digest for t in of(out0, ToBarrier)}
    arrivals1 = {t.message.key: t.message.digest for t in of(out1, ToBarrier)}
    assert set(arrivals0) == {"A", "B"}
    assert arrivals0 == arrivals1

    barrier = BarrierState()
    for r in (0, 1):
        barrier.hello(Hello("prefill", r, 2, "prefill"))
    verdicts = []
    for t in of(out0, ToBarrier) + of(out1, ToBarrier):
        verdicts += barrier.handle(t.message, 1.0)
    assert {(v.rank, v.message.key) for v in verdicts} == {(0, "A"), (0, "B"), (1, "A"), (1, "B")}
    results = []
    for v in verdicts:
        results += of([r0, r1][v.rank].handle(v.message, 1.0), ToEngine)
    assert sorted((r.result.request_id, r.result.rank, r.result.status) for r in results) == [
        ("A", 0, Status.OK),
        ("A", 1, Status.OK),
        ("B", 0, Status.OK),
        ("B", 1, Status.OK),
    ]
    assert set(r0.sizes().values()) == set(r1.sizes().values()) == {0}


def test_pipelining_a_step_of_eight_requests_posts_one_write_per_layer() -> None:
    c = core()
    infos = [info(f"r{i}", i, 1, 32, [2 * i, 2 * i + 1], [40 - 2 * i, 41 - 2 * i]) for i in range(8)]
    out = feed(c, [*infos, *layers(1, *(SlotChunk(i, 0, 32, 1) for i in range(8)))], complete=False)
    writes = of(out, PostWrite)
    assert [w.layer for w in writes] == list(range(LAYERS))
    for w in writes:
        assert w.requests == tuple(f"r{i}" for i in range(8))
        assert sum(r.length for r in w.runs) == 16
        assert w.nbytes == 16 * 1024 * 2


def test_runs_coalesce_within_and_across_requests() -> None:
    c = core()
    msgs = [
        info("a", 0, 1, 48, [5, 6, 7], [20, 21, 30]),
        info("b", 1, 1, 32, [8, 9], [31, 32]),
        *layers(1, SlotChunk(0, 0, 48, 1), SlotChunk(1, 0, 32, 1)),
    ]
    w = of(feed(c, msgs, complete=False), PostWrite)[0]
    assert w.runs == (Run(5, 20, 2), Run(7, 30, 3))


# -- recovery order, chunks, identity ------------------------------------------------------------


def test_later_layers_that_arrive_before_recovery_are_posted_at_recovery() -> None:
    c = core()
    out = feed(c, layers(1, SlotChunk(2, 0, 16, 1)), complete=False)
    assert not of(out, PostWrite)
    assert c.sizes()["parked_signals"] == 1
    out = c.handle(info("x", 2, 1, 16, [1], [9]), 0.0)
    assert [w.layer for w in of(out, PostWrite)] == list(range(LAYERS))


def test_chunked_prefill_sends_each_chunks_completed_blocks_and_finishes_after_the_last() -> None:
    c = core()
    x = info("x", 4, 10, 40, [1, 2, 3], [7, 8, 9])  # 40 tokens: blocks of 16, 16, 8
    out = feed(c, [x, *layers(10, SlotChunk(4, 0, 20, 10))])  # tokens 0..19: block 0 complete
    assert {r for w in of(out, PostWrite) for r in w.runs} == {Run(1, 7, 1)}
    assert not of(out, ToBarrier)
    out = feed(c, layers(11, SlotChunk(4, 20, 10, 10)))  # tokens 20..29: no new block complete
    assert not of(out, PostWrite) and not of(out, ToBarrier)
    out = feed(c, layers(12, SlotChunk(4, 30, 10, 10)))  # final chunk: blocks 1 and 2
    assert {r for w in of(out, PostWrite) for r in w.runs} == {Run(2, 8, 2)}
    (arrive,) = of(out, ToBarrier)
    assert arrive.message.digest.blocks == 3
    assert arrive.message.digest.bytes == 3 * LAYERS * 1024 * 2


def test_chunks_parked_before_the_cache_info_are_all_claimed_at_recovery() -> None:
    c = core()
    feed(c, [*layers(10, SlotChunk(4, 0, 16, 10)), *layers(11, SlotChunk(4, 16, 16, 10))])
    assert c.sizes()["parked_signals"] == 2
    out = feed(c, [info("x", 4, 10, 32, [1, 2], [7, 8])])
    # both chunks' blocks of a layer leave in one write, merged into one run
    assert [(w.layer, w.runs) for w in of(out, PostWrite)] == [(layer, (Run(1, 7, 2),)) for layer in range(LAYERS)]
    assert len(of(out, ToBarrier)) == 1
    assert c.sizes()["parked_signals"] == 0


def test_slot_reuse_never_hands_a_new_requests_chunk_to_the_old_one() -> None:
    """Old request o (slot 2, began step 1) is aborted by the scheduler, but the worker reused
    slot 2 before the abort reached this rank. The new request's second chunk starts at the token
    the old one expects next; identity (slot, start_step), not the offset, decides."""
    c = core()
    feed(c, [info("o", 2, 1, 64, [0, 1, 2, 3], [10, 11, 12, 13]), *layers(1, SlotChunk(2, 0, 16, 1))])
    out = feed(c, [*layers(3, SlotChunk(2, 0, 16, 3)), *layers(4, SlotChunk(2, 16, 16, 3))])
    assert not of(out, PostWrite), "chunks of the slot's new occupant must wait for its own cache_info"
    assert c.sizes()["parked_signals"] == 2
    out = feed(c, [Abort("o", "preempted"), info("n", 2, 3, 32, [5, 6], [20, 21])])
    assert {r for w in of(out, PostWrite) for r in w.runs} == {Run(5, 20, 2)}
    assert [t.message.key for t in of(out, ToBarrier)] == ["o", "n"]
    assert isinstance(of(out, ToBarrier)[0].message, Withdraw)


def test_a_chunk_with_a_gap_fails_its_request_with_a_reason() -> None:
    c = core()
    feed(c, [info("x", 1, 1, 64, [0, 1, 2, 3], [4, 5, 6, 7]), *layers(1, SlotChunk(1, 0, 16, 1))])
    out = feed(c, layers(2, SlotChunk(1, 32, 16, 1)))
    (problem,) = of(out, Problem)
    assert problem.code is ErrorCode.BAD_LAYOUT and "previous one ended at 16" in problem.detail
    (withdraw,) = of(out, ToBarrier)
    assert withdraw.message.status is Status.FAILED and "token 32" in withdraw.message.reason


def test_a_repeated_layer_signal_posts_nothing_twice() -> None:
    c = core()
    out = feed(c, [info("x", 0, 1, 16, [1], [2]), LayerSignal(1, 0, (SlotChunk(0, 0, 16, 1),))], complete=False)
    out += c.handle(LayerSignal(1, 1), 0.0) + c.handle(LayerSignal(1, 1), 0.0)
    assert [w.layer for w in of(out, PostWrite)] == [0, 1]


def test_step_ids_must_increase_and_unknown_later_layers_are_refused() -> None:
    c = core()
    feed(c, layers(5, SlotChunk(0, 0, 16, 5)))
    (p,) = c.handle(LayerSignal(5, 0, (SlotChunk(1, 0, 16, 5),)), 0.0)
    assert p.code is ErrorCode.STALE_SIGNAL and "must increase" in p.detail
    (p,) = c.handle(LayerSignal(9, 1), 0.0)
    assert p.code is ErrorCode.STALE_SIGNAL and "before that step's layer-0" in p.detail
    (p,) = c.handle(LayerSignal(9, LAYERS), 0.0)
    assert p.code is ErrorCode.OUT_OF_RANGE


# -- refusals and bounds ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("msg", "code"),
    [
        (info("x", 0, 1, 40, [1, 2], [3, 4]), ErrorCode.BAD_LAYOUT),  # 40 tokens need 3 blocks
        (info("x", 0, 1, 16, [64], [3]), ErrorCode.OUT_OF_RANGE),
    ],
)
def test_bad_cache_info_is_refused_with_a_result_and_a_withdrawal(msg: CacheInfo, code: ErrorCode) -> None:
    c = core()
    out = c.handle(msg, 0.0)
    assert [type(e) for e in out] == [Problem, ToEngine, ToBarrier]
    assert out[0].code is code and out[0].reply
    assert out[1].result.status is Status.FAILED and out[1].result.reason == out[0].detail
    assert isinstance(out[2].message, Withdraw)
    assert set(c.sizes().values()) == {0}


def test_close_ends_everything_as_failed_and_empties_every_table() -> None:
    c = core()
    feed(c, [info("a", 0, 1, 16, [1], [2]), LayerSignal(1, 0, (SlotChunk(0, 0, 16, 1),))], complete=False)
    c.handle(info("b", 1, 2, 16, [3], [4]), 0.0)
    out = c.close("daemon shutting down", 1.0)
    results = sorted((e.result.request_id, e.result.status, e.result.reason) for e in of(out, ToEngine))
    assert results == [("a", Status.FAILED, "daemon shutting down"), ("b", Status.FAILED, "daemon shutting down")]
    assert len(of(out, ToPeer)) == 2
    assert set(c.sizes().values()) == {0}


def test_duplicate_and_slot_busy_cache_infos() -> None:
    c = core()
    c.handle(info("x", 0, 1, 16, [1], [2]), 0.0)
    (p,) = c.handle(info("x", 0, 1, 16, [1], [2]), 0.0)
    assert p.code is ErrorCode.DUPLICATE_REQUEST
    out = c.handle(info("y", 0, 1, 16, [1], [2]), 0.0)
    assert out[0].code is ErrorCode.SLOT_BUSY and "already belongs to request x" in out[0].detail
    assert c.sizes()["requests"] == 1


def test_request_table_bound_is_an_explicit_failure() -> None:
    c = core(max_requests=2)
    c.handle(info("a", 0, 1, 16, [1], [2]), 0.0)
    c.handle(info("b", 1, 1, 16, [1], [2]), 0.0)
    out = c.handle(info("c", 2, 1, 16, [1], [2]), 0.0)
    assert out[0].code is ErrorCode.TABLE_FULL and "2 requests" in out[0].detail
    assert out[1].result.status is Status.FAILED


def test_signal_bound_drops_loudly() -> None:
    c = core(max_pending_signals=1)
    out = c.handle(LayerSignal(1, 0, (SlotChunk(0, 0, 16, 1), SlotChunk(1, 0, 16, 1))), 0.0)
    (p,) = of(out, Problem)
    assert p.code is ErrorCode.TABLE_FULL and "slot 1 of step 1" in p.detail and p.reply
    assert c.sizes()["parked_signals"] == 1


def test_step_bound_drops_loudly() -> None:
    c = core(max_steps=2)
    c.handle(LayerSignal(1, 0, (SlotChunk(0, 0, 16, 1),)), 0.0)
    c.handle(LayerSignal(2, 0, ()), 0.0)  # an empty step opens no record
    c.handle(LayerSignal(3, 0, (SlotChunk(5, 0, 16, 3),)), 0.0)
    (p,) = c.handle(LayerSignal(4, 0, (SlotChunk(6, 0, 16, 4),)), 0.0)
    assert p.code is ErrorCode.TABLE_FULL and "step table full (2 steps" in p.detail
    assert c.sizes()["steps"] == 2


# -- stopping: aborts, write failures, verdicts ------------------------------------------------------


def test_abort_waits_for_inflight_writes_before_withdrawing() -> None:
    c = core()
    out = feed(c, [info("x", 0, 1, 16, [1], [2]), LayerSignal(1, 0, (SlotChunk(0, 0, 16, 1),))], complete=False)
    (w,) = of(out, PostWrite)
    assert c.handle(Abort("x", "user gone"), 1.0) == []  # draining: the write is still in flight
    out = c.write_done(w.write_id, 2.0)
    (t,) = of(out, ToBarrier)
    assert t.message == Withdraw("prefill", "x", 0, Status.ABORTED, "user gone")
    out = c.handle(Diverged("prefill", "x", ()), 3.0)
    (res,) = of(out, ToEngine)
    assert res.result.status is Status.FAILED  # no rank reported an abort in the (empty) views


def test_abort_of_unknown_request_is_answered() -> None:
    (p,) = core().handle(Abort("nope"), 0.0)
    assert p.code is ErrorCode.UNKNOWN_REQUEST and p.reply


def test_write_failure_fails_the_request_on_every_rank_through_the_barrier() -> None:
    ranks = [core(0), core(1)]
    barrier = BarrierState()
    for r in (0, 1):
        barrier.hello(Hello("prefill", r, 2, "prefill"))
    x = info("x", 0, 1, 16, [1], [2])
    sig = LayerSignal(1, 0, (SlotChunk(0, 0, 16, 1),))
    words = []
    for r, c in enumerate(ranks):
        out = c.handle(x, 0.0) + c.handle(sig, 0.0)
        (w,) = of(out, PostWrite)
        out = c.write_done(w.write_id, 0.1, error="peer gone" if r == 1 else None)
        words += [t.message for t in of(out, ToBarrier)]
        for layer in range(1, LAYERS):
            for w in of(c.handle(LayerSignal(1, layer), 0.2), PostWrite):
                words += [t.message for t in of(c.write_done(w.write_id, 0.3), ToBarrier)]
    assert [type(m) for m in words] == [Arrive, Withdraw]
    verdicts = [v for m in words for v in barrier.handle(m, 1.0)]
    assert all(isinstance(v.message, Diverged) for v in verdicts)
    results = [of(ranks[v.rank].handle(v.message, 1.0), ToEngine)[0].result for v in verdicts]
    assert [r.status for r in results] == [Status.FAILED, Status.FAILED]
    assert all("rank 1 failed (write of layer 0 to d failed: peer gone)" in r.reason for r in results)


def test_a_verdict_while_active_stops_new_writes_and_waits_for_inflight_ones() -> None:
    c = core()
    out = feed(c, [info("x", 0, 1, 16, [1], [2]), LayerSignal(1, 0, (SlotChunk(0, 0, 16, 1),))], complete=False)
    (w,) = of(out, PostWrite)
    assert c.handle(Expired("prefill", "x", (1,), 30.0), 1.0) == []
    assert not of(c.handle(LayerSignal(1, 1), 1.1), PostWrite)
    out = c.write_done(w.write_id, 1.2)
    (res,) = of(out, ToEngine)
    assert res.result.status is Status.FAILED and "ranks [1]" in res.result.reason
    (peer,) = of(out, ToPeer)
    assert peer.message == res.result
    assert not of(out, ToBarrier)  # the barrier already settled the key
    assert set(c.sizes().values()) == {0}


def test_release_reports_ok_to_engine_and_kv_ready_to_decode_peer() -> None:
    c = core()
    out = feed(c, [info("x", 0, 1, 16, [1], [2], peer="ipc://dec-{rank}"), *layers(1, SlotChunk(0, 0, 16, 1))])
    (t,) = of(out, ToBarrier)
    out = c.handle(Release("prefill", "x", t.message.digest), 0.5)
    assert out == [
        ToEngine(TransferResult("x", Status.OK, "", 0, LAYERS * 2048, "auto", 0.0, 0.0, 500.0)),
        ToPeer("ipc://dec-{rank}", KVReady("x", 0, LAYERS * 2048)),
    ]


# -- deadlines ---------------------------------------------------------------------------------------


def test_next_deadline_and_timeouts_name_what_was_missing() -> None:
    c = core()
    assert c.next_deadline() is None
    c.handle(info("a", 0, 1, 16, [1], [2]), 0.0)  # waits for its layer-0 signal
    feed(c, [LayerSignal(2, 0, (SlotChunk(3, 0, 16, 2),))], now=1.0)  # a signal nobody claims
    feed(c, [info("b", 4, 3, 32, [5, 6], [7, 8]), LayerSignal(3, 0, (SlotChunk(4, 0, 16, 3),))], now=2.0)
    assert c.next_deadline() == 5.0
    assert c.on_timer(4.99) == []
    out = c.on_timer(5.0)
    (w,) = of(out, ToBarrier)
    assert w.message.status is Status.FAILED and "no layer-0 signal for slot 0 of step 1 within 5s" in w.message.reason
    out = c.on_timer(6.0)
    (p,) = of(out, Problem)
    assert p.code is ErrorCode.STALE_SIGNAL and not p.reply and "slot 3 of step 2" in p.detail
    assert c.next_deadline() == 9.0  # b's progress deadline (7 s after its last write completed at 2.0)
    (w,) = of(c.on_timer(9.0), ToBarrier)
    assert "waiting for the chunk at token 16 of 32 (slot 4, after step 3)" in w.message.reason
    assert c.next_deadline() == 16.0  # a's verdict deadline (5 + 11)
    out = c.on_timer(16.0)
    (res,) = of(out, ToEngine)
    assert res.result.request_id == "a" and "no verdict from the barrier service within 11s" in res.result.reason
    c.on_timer(100.0)
    assert set(c.sizes().values()) == {0}


def test_writes_that_never_confirm_are_given_up_after_the_drain_deadline() -> None:
    c = core()
    feed(c, [info("x", 0, 1, 16, [1], [2]), LayerSignal(1, 0, (SlotChunk(0, 0, 16, 1),))], complete=False)
    assert c.on_timer(7.0) == []  # progress deadline: stop, but the write is still in flight -> drain
    out = c.on_timer(14.0)  # drain deadline
    assert [type(e) for e in out] == [Problem, ToBarrier]
    assert "1 writes of request x unconfirmed" in out[0].detail
    assert c.sizes()["writes"] == 0


# -- a few fixed seeds of the interleaving simulation, readable when they fail -------------------------


@pytest.mark.parametrize("seed", range(5))
def test_simulated_group_with_timeouts_ends_every_request(seed: int) -> None:
    """Deadlines fire while work is still queued: everything still ends exactly once, agreeing."""
    rng = random.Random(seed)
    sc = build_scenario(rng, num_layers=2, block_tokens=4, num_slots=3, num_steps=8, abort_rate=0.3)
    # Deadlines can end a request while a slow rank still writes (that is what they are for), so
    # the simulation's "nobody writes any more" check is off here.
    sim = GroupSim(
        sc,
        3,
        rng,
        quiesce=False,
        pending_timeout_s=0.002,
        progress_timeout_s=0.003,
        verdict_timeout_s=0.01,
        barrier_timeout_s=0.005,
    )
    for _ in range(100_000):
        for r, rank in enumerate(sim.ranks):
            sim.apply(r, rank.core.on_timer(sim.now))
        for eff in sim.barrier.on_timer(sim.now):
            sim.route_barrier(eff)
        if not sim.step():
            break
    sim.settle_timers()
    for rid in sc.plans:
        results = [rank.results[rid] for rank in sim.ranks]
        assert all(len(rs) == 1 for rs in results), (rid, results)
    for rank in sim.ranks:
        assert set(rank.core.sizes().values()) == {0}
