"""Scenario tests of one prefill rank's pure core (fake clock, no I/O)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from kvxferd.core import BarrierState, Problem, RankCore, RankSettings, Run, ToBarrier, ToEngine, ToPeer, Write
from kvxferd.core.request import terms_of
from kvxferd.core.writes import JOINED_BYTES
from kvxferd.protocol import (
    Abort,
    Admit,
    Admitted,
    Arrive,
    CacheInfo,
    Digest,
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
from kvxferd.protocol.fields import MAX_TEXT
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


def info(
    rid: str, slot: int, step: int, tokens: int, src: list[int], dst: list[int], peer: str = "d", instance: int = 0
) -> CacheInfo:
    return CacheInfo(rid, slot, step, tokens, tuple(src), tuple(dst), peer, "auto", instance)


def layers(step: int, *slots: SlotChunk) -> list[LayerSignal]:
    return [LayerSignal(step, 0, slots), *(LayerSignal(step, layer) for layer in range(1, LAYERS))]


def of(effects: list, kind: type) -> list:
    """The effects of ``kind``; for ToEngine, with the ok results a ToPeer holds back until its
    decode rank confirms (as the engine hears them once it does)."""
    if kind is ToEngine:
        return [e.then if isinstance(e, ToPeer) else e for e in effects if isinstance(e, ToEngine) or _then(e)]
    return [e for e in effects if isinstance(e, kind)]


def _then(effect: object) -> bool:
    return isinstance(effect, ToPeer) and effect.then is not None


def messages(effects: list, kind: type) -> list:
    """The barrier messages of one kind among ``effects``."""
    return [e.message for e in of(effects, ToBarrier) if isinstance(e.message, kind)]


def feed(c: RankCore, msgs: list, now: float = 0.0, complete: bool = True, admit: bool = True) -> list:
    """Deliver messages; answer every admission at once when ``admit`` (a barrier that agrees),
    and complete every write at once when ``complete``. Returns every effect, in order."""
    out: list = []
    for msg in msgs:
        queue = c.handle(msg, now)
        while queue:
            eff = queue.pop(0)
            out.append(eff)
            if admit and isinstance(eff, ToBarrier) and isinstance(eff.message, Admit):
                a = eff.message
                queue += c.handle(Admitted(a.group, a.key, a.instance), now)
            elif complete and isinstance(eff, Write):
                queue += c.write_done(eff.write_id, now)
    return out


def quiet(*cores: RankCore) -> None:
    """Let every deadline of these cores pass (memories of endings included)."""
    for c in cores:
        for _ in range(10):
            when = c.next_deadline()
            if when is None:
                break
            c.on_timer(when)
        assert c.next_deadline() is None


def barrier(world: int = 2) -> BarrierState:
    b = BarrierState(timeout_s=10.0)
    for r in range(world):
        b.hello(Hello("prefill", r, world, "prefill"), 0.0)
    return b


def relay(b: BarrierState, ranks: list[RankCore], effects: dict[int, list], now: float = 1.0) -> dict[int, list]:
    """Carry every rank's barrier messages to ``b`` and its verdicts back, until quiet; complete
    every write at once. Returns each rank's effects (the ones given and everything that followed)."""
    out = {r: list(effs) for r, effs in effects.items()}
    todo = [(r, e) for r, effs in effects.items() for e in effs]
    while todo:
        r, eff = todo.pop(0)
        new: list[tuple[int, object]] = []
        if isinstance(eff, ToBarrier):
            for v in b.handle(eff.message, now):
                new += [(v.rank, x) for x in ranks[v.rank].handle(v.message, now)]
        elif isinstance(eff, Write):
            new += [(r, x) for x in ranks[r].write_done(eff.write_id, now)]
        for q, x in new:
            out.setdefault(q, []).append(x)
            todo.append((q, x))
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
    # rank 0 holds both admissions when the step comes; rank 1 is admitted request by request
    out0 = feed(r0, [a, b], admit=False)
    out0 += feed(r0, [Admitted("prefill", "A", 0), Admitted("prefill", "B", 0), *step])
    out1 = feed(r1, [*step, a, b])

    # rank 0 wrote each layer of A and B together; rank 1 wrote them request by request, each
    # request's layers (all ready when it was admitted) in one write
    assert [w.requests for w in of(out0, Write)] == [(("A", 0), ("B", 0))] * LAYERS
    assert [(w.requests, w.layers) for w in of(out1, Write)] == [
        ((("A", 0),), tuple(range(LAYERS))),
        ((("B", 0),), tuple(range(LAYERS))),
    ]
    # ... yet both produced the same single-request arrivals
    arrivals0 = {m.key: m.digest for m in messages(out0, Arrive)}
    arrivals1 = {m.key: m.digest for m in messages(out1, Arrive)}
    assert set(arrivals0) == {"A", "B"}
    assert arrivals0 == arrivals1

    bar = barrier()
    verdicts = []
    for m in messages(out0, Admit) + messages(out1, Admit) + messages(out0, Arrive) + messages(out1, Arrive):
        verdicts += bar.handle(m, 1.0)
    results = []
    for v in verdicts:
        results += of([r0, r1][v.rank].handle(v.message, 1.0), ToEngine)
    assert sorted((r.result.request_id, r.result.rank, r.result.status) for r in results) == [
        ("A", 0, Status.OK),
        ("A", 1, Status.OK),
        ("B", 0, Status.OK),
        ("B", 1, Status.OK),
    ]
    quiet(r0, r1)
    assert set(r0.sizes().values()) == set(r1.sizes().values()) == {0}


def test_pipelining_a_step_of_eight_requests_posts_one_write_per_layer() -> None:
    c = core()
    infos = [info(f"r{i}", i, 1, 32, [2 * i, 2 * i + 1], [40 - 2 * i, 41 - 2 * i]) for i in range(8)]
    out = feed(c, [*infos, *layers(1, *(SlotChunk(i, 0, 32, 1) for i in range(8)))], complete=False)
    writes = of(out, Write)
    assert [w.layers for w in writes] == [(layer,) for layer in range(LAYERS)]  # each as it came
    for w in writes:
        assert w.requests == tuple((f"r{i}", 0) for i in range(8))
        assert sum(r.length for r in w.runs) == 16
        assert w.nbytes == 16 * 1024 * 2


def test_layer_signals_taken_together_end_as_one_at_a_time() -> None:
    """The shell hands a worker's run of signals after layer 0 to ``on_layers`` at once: the same
    effects, problems included (a layer past the model's, a step not begun, a step done with), as
    one ``on_layer`` each, in a wake-up (hold ... flush) and outside one."""
    runs = [(1, [1, 2]), (1, [LAYERS, 2]), (2, [1]), (9, [1, LAYERS + 5]), (1, [2])]
    for held in (True, False):
        cores = [core(), core()]
        outs: list[list] = [[], []]
        for c, out in zip(cores, outs, strict=True):
            out += feed(c, [info("a", 0, 1, 32, [0, 1], [5, 6]), LayerSignal(1, 0, (SlotChunk(0, 0, 32, 1),))])
            out += feed(c, [info("b", 1, 2, 16, [2], [7]), LayerSignal(2, 0, (SlotChunk(1, 0, 16, 2),))])
            if held:
                c.hold()
        for step, run in runs:
            outs[0] += cores[0].on_layers(step, run, 1.0)
            for layer in run:
                outs[1] += cores[1].on_layer(LayerSignal(step, layer), 1.0)
        if held:
            outs[0] += cores[0].flush(1.0)
            outs[1] += cores[1].flush(1.0)
        assert [e for e in outs[0] if not isinstance(e, Write)] == [e for e in outs[1] if not isinstance(e, Write)]
        if held:  # the same writes, planned at the flush
            assert [type(e).__name__ for e in outs[0]] == [type(e).__name__ for e in outs[1]]
            assert [(w.layers, w.runs, w.requests) for w in of(outs[0], Write)] == [
                (w.layers, w.runs, w.requests) for w in of(outs[1], Write)
            ]
        else:  # planned at once: fewer writes, the same (layer, run) of each request
            assert _covered(of(outs[0], Write)) == _covered(of(outs[1], Write))
        codes = [e.code for e in of(outs[0], Problem)]
        assert codes.count(ErrorCode.OUT_OF_RANGE) == 2 and codes.count(ErrorCode.STALE_SIGNAL) == 1
        assert of(outs[0], Write), "the runs wrote something"


def _covered(writes: list[Write]) -> list[tuple[int, object]]:
    return sorted(((layer, run) for w in writes for layer in w.layers for run in w.runs), key=repr)


def test_a_step_admitted_verdict_by_verdict_in_one_wake_up_is_one_write() -> None:
    """The barrier's Admitted come one per request; read in one wake-up (hold ... flush), the
    eight requests' blocks go together (before, one request after another), and so do the layers
    ready: one write, not 8 x LAYERS."""
    c = core()
    infos = [info(f"r{i}", i, 1, 16, [i], [40 + i]) for i in range(8)]
    out = feed(c, [*infos, *layers(1, *(SlotChunk(i, 0, 16, 1) for i in range(8)))], admit=False)
    assert not of(out, Write)
    c.hold()
    for i in range(8):
        assert c.handle(Admitted("prefill", f"r{i}", 0), 1.0) == []  # planned at the flush
    writes = of(c.flush(1.0), Write)
    assert [w.layers for w in writes] == [tuple(range(LAYERS))]  # and the layers ready: one write
    assert all(w.requests == tuple((f"r{i}", 0) for i in range(8)) for w in writes)
    assert all(w.runs == (Run(0, 40, 8),) for w in writes)
    assert c.flush(1.0) == []  # planning is immediate again, and nothing is planned twice


def test_layers_go_together_only_where_their_blocks_are_the_same() -> None:
    c = core()
    a, b = info("a", 0, 1, 16, [1], [9]), info("b", 1, 1, 16, [2], [10])
    feed(c, [a, b], admit=False)
    feed(c, [LayerSignal(1, 0, (SlotChunk(0, 0, 16, 1), SlotChunk(1, 0, 16, 1))), LayerSignal(1, 1)])
    c.hold()
    c.handle(Admitted("prefill", "a", 0), 1.0)
    c.handle(Admitted("prefill", "b", 0), 1.0)
    c.handle(LayerSignal(1, 2), 1.0)
    writes = of(c.flush(1.0), Write)
    assert [(w.layers, w.runs) for w in writes] == [((0, 1, 2), (Run(1, 9, 2),))]
    a2, b2 = info("a2", 0, 2, 16, [3], [11]), info("b2", 1, 2, 16, [5], [12])
    feed(c, [a2, b2], admit=False)
    feed(c, [LayerSignal(2, 0, (SlotChunk(0, 0, 16, 2), SlotChunk(1, 0, 16, 2))), LayerSignal(2, 1)])
    c.hold()
    c.handle(Admitted("prefill", "a2", 0), 2.0)  # a2 has layers 0 and 1 ready ...
    c.handle(LayerSignal(2, 2), 2.0)  # ... and 2, which b2 (admitted next wake-up) will not share
    writes = of(c.flush(2.0), Write)
    assert [(w.layers, w.runs) for w in writes] == [((0, 1, 2), (Run(3, 11, 1),))]
    writes = of(c.handle(Admitted("prefill", "b2", 0), 2.1), Write)
    assert [(w.layers, w.runs) for w in writes] == [((0, 1, 2), (Run(5, 12, 1),))]


def test_layers_are_joined_only_while_the_write_stays_small() -> None:
    """Joining saves a small write's fixed cost; a large one stays a layer (or a few), so that no
    single post holds the loop much longer than a layer's (NIXL may copy inline)."""
    c = core(block_bytes=JOINED_BYTES // 4)  # a block of a layer, K and V: half of JOINED_BYTES
    feed(c, [info("x", 0, 1, 16, [1], [9]), *layers(1, SlotChunk(0, 0, 16, 1))], admit=False)
    writes = of(c.handle(Admitted("prefill", "x", 0), 1.0), Write)
    assert [(w.layers, w.nbytes) for w in writes] == [((2,), JOINED_BYTES // 2), ((0, 1), JOINED_BYTES)]  # small first
    assert sum(c.write_done(w.write_id, 1.1) != [] for w in writes) == 1  # the last one arrives


def test_a_short_request_never_shares_a_write_with_a_large_one() -> None:
    """Requests of a layer share a write up to JOINED_BYTES: a short request signalled with a large
    one's layers goes in a write of its own, posted first, not in the large write's tail (a
    transport copying the large one a slice at a time would hold it back until the end)."""
    c = core(block_bytes=JOINED_BYTES // 8)  # a block of a layer, K and V: a quarter of it
    big = info("big", 0, 1, 16 * 5, [1, 2, 3, 4, 5], [11, 12, 13, 14, 15])
    small, other = info("small", 1, 1, 16, [6], [16]), info("other", 2, 1, 16, [7], [17])
    feed(c, [big, small, other], admit=True)
    chunks = (SlotChunk(0, 0, 80, 1), SlotChunk(1, 0, 16, 1), SlotChunk(2, 0, 16, 1))
    writes = of(feed(c, [LayerSignal(1, 0, chunks)], complete=False), Write)
    assert [(w.requests, w.runs) for w in writes] == [
        ((("small", 0), ("other", 0)), (Run(6, 16, 2),)),  # the short ones together, first
        ((("big", 0),), (Run(1, 11, 5),)),
    ]


def test_a_write_of_several_layers_that_fails_stops_its_requests_once_naming_the_layers() -> None:
    c = core()
    feed(c, [info("x", 0, 1, 16, [1], [9]), *layers(1, SlotChunk(0, 0, 16, 1))], admit=False)
    (w,) = of(c.handle(Admitted("prefill", "x", 0), 1.0), Write)
    out = c.write_done(w.write_id, 1.1, "peer went away")
    (said,) = messages(out, Withdraw)
    assert said.reason == f"write of layers 0..{LAYERS - 1} to d failed: peer went away"


def test_a_failed_write_of_layers_not_side_by_side_names_each_of_them() -> None:
    c = core()
    signals = [LayerSignal(1, 0, (SlotChunk(0, 0, 16, 1),)), LayerSignal(1, 2)]  # layer 1 not yet
    feed(c, [info("x", 0, 1, 16, [1], [9]), *signals], admit=False)
    (w,) = of(c.handle(Admitted("prefill", "x", 0), 1.0), Write)
    assert w.layers == (0, 2)
    (said,) = messages(c.write_done(w.write_id, 1.1, "peer went away"), Withdraw)
    assert said.reason == "write of layers 0,2 to d failed: peer went away"


def test_a_request_that_stops_or_ends_within_a_held_wake_up_plans_nothing() -> None:
    c = core()
    x, y = info("x", 0, 1, 16, [1], [9]), info("y", 1, 1, 16, [2], [10])
    feed(c, [x, y, *layers(1, SlotChunk(0, 0, 16, 1), SlotChunk(1, 0, 16, 1))], admit=False)
    c.hold()
    c.handle(Admitted("prefill", "x", 0), 1.0)
    c.handle(Admitted("prefill", "y", 0), 1.0)
    said = c.handle(Abort("x", "the engine gave up", 0), 1.0)  # nothing of x in flight: withdrawn at once
    assert [type(m).__name__ for m in messages(said, Withdraw)] == ["Withdraw"]
    writes = of(c.flush(1.0), Write)
    assert {k for w in writes for k in w.requests} == {("y", 0)}
    c.hold()
    c.close("the worker registered a new cache", 2.0)  # every request ends while items are held
    c.handle(LayerSignal(2, 0, ()), 2.0)
    assert of(c.flush(2.0), Write) == []


def test_requests_reserved_in_different_decode_registrations_never_share_a_write() -> None:
    """Each write names the decode registration its blocks were reserved in (this rank's entry
    of dst_generations), so the link can refuse to put it into another one."""
    c = core(1)
    msgs = [
        replace(info("a", 0, 1, 16, [1], [20]), dst_generations=("g0", "old")),
        replace(info("b", 1, 1, 16, [2], [21]), dst_generations=("g0", "new")),
        info("c", 2, 1, 16, [3], [22]),  # names none: whatever rank 1 holds
        *layers(1, SlotChunk(0, 0, 16, 1), SlotChunk(1, 0, 16, 1), SlotChunk(2, 0, 16, 1)),
    ]
    writes = of(feed(c, msgs, complete=False), Write)
    assert len(writes) == 3 * LAYERS
    by = {w.generations: w for w in writes if 0 in w.layers}
    assert {g: w.requests for g, w in by.items()} == {
        ("g0", "old"): (("a", 0),),
        ("g0", "new"): (("b", 0),),
        (): (("c", 0),),
    }


def test_runs_coalesce_within_and_across_requests() -> None:
    c = core()
    msgs = [
        info("a", 0, 1, 48, [5, 6, 7], [20, 21, 30]),
        info("b", 1, 1, 32, [8, 9], [31, 32]),
        *layers(1, SlotChunk(0, 0, 48, 1), SlotChunk(1, 0, 32, 1)),
    ]
    w = of(feed(c, msgs, complete=False), Write)[0]
    assert w.runs == (Run(5, 20, 2), Run(7, 30, 3))


# -- no byte before agreement ---------------------------------------------------------------------


def test_nothing_is_written_before_admission_and_everything_ready_is_posted_at_it() -> None:
    c = core()
    x = info("x", 2, 1, 16, [1], [9])
    out = feed(c, [x, *layers(1, SlotChunk(2, 0, 16, 1))], admit=False, complete=False)
    assert messages(out, Admit) == [Admit("prefill", "x", 0, 0, terms_of(x))]
    assert not of(out, Write), "a byte left before every rank held the same cache_info"
    assert c.snapshot(0.0)[0]["waiting_for"].startswith("admission")
    c.handle(info("y", 3, 1, 16, [2], [10]), 0.1)
    # a status query shows the oldest few, and builds no row it does not show (it costs that
    # much however many requests are live: one wake-up reads 256 such queries)
    assert [row["request_id"] for row in c.snapshot(0.2, limit=1)] == ["x"]
    out = c.handle(Admitted("prefill", "x", 0), 0.5)
    assert [w.layers for w in of(out, Write)] == [tuple(range(LAYERS))]  # one write for all
    assert c.handle(Admitted("prefill", "x", 0), 0.6) == []  # a repeat posts nothing twice


def test_admission_before_the_signal_lets_layers_go_as_they_come() -> None:
    c = core()
    feed(c, [info("x", 2, 1, 16, [1], [9])], admit=True)
    out = feed(c, [LayerSignal(1, 0, (SlotChunk(2, 0, 16, 1),))], complete=False)
    assert [w.layers for w in of(out, Write)] == [(0,)]


def test_terms_cover_every_field_ranks_must_agree_on() -> None:
    x = info("x", 2, 1, 16, [1], [9], peer="ipc://d-{rank}")
    base = terms_of(x)
    for changed in (
        replace(x, num_tokens=15),
        replace(x, src_blocks=(2,)),
        replace(x, dst_blocks=(8,)),
        replace(x, slot=3),
        replace(x, step=2),
        replace(x, peer="ipc://e-{rank}"),
        replace(x, transport="shm"),
        replace(x, dst_generations=("a", "b")),
    ):
        assert terms_of(changed) != base, changed


@pytest.mark.parametrize("field", ["dst_blocks", "num_tokens"])
def test_ranks_given_different_cache_infos_write_nothing_and_fail_alike(field: str) -> None:
    """Cases 4 and 5: one rank's scheduler sent other destination blocks, or other token counts
    with the same block count. Both ranks fail at admission, naming the field; nothing was written."""
    x = info("x", 0, 1, 20, [1, 2], [5, 6])
    odd = replace(x, dst_blocks=(5, 7)) if field == "dst_blocks" else replace(x, num_tokens=24)
    ranks = [core(0), core(1)]
    step = layers(1, SlotChunk(0, 0, 20, 1))
    effects = {0: feed(ranks[0], [x, *step], admit=False), 1: feed(ranks[1], [*step, odd], admit=False)}
    out = relay(barrier(), ranks, effects)
    for r in (0, 1):
        assert not of(out[r], Write)
        (res,) = of(out[r], ToEngine)
        assert res.result.status is Status.FAILED
        assert f"disagree on the cache_info: {field} (rank 0: " in res.result.reason
        assert "nothing was written" in res.result.reason
        (notice,) = of(out[r], ToPeer)
        assert notice.message == res.result
    assert of(out[0], ToEngine)[0].result.reason == of(out[1], ToEngine)[0].result.reason


@pytest.mark.parametrize("chunk_first", [True, False])
def test_a_rank_given_fewer_tokens_than_its_chunk_fails_for_the_field_like_every_divergence(chunk_first: bool) -> None:
    """Issue 23, item 7: rank 1's scheduler says 20 tokens where rank 0's says 24 (the same two
    blocks); the worker computes 24. Rank 1's chunk does not fit its own cache_info, but that is the
    divergence showing: both ranks fail at admission naming num_tokens, nothing written."""
    x = info("x", 0, 1, 24, [1, 2], [5, 6])
    odd = replace(x, num_tokens=20)
    ranks = [core(0), core(1)]
    step = layers(1, SlotChunk(0, 0, 24, 1))
    late = [*step, odd] if chunk_first else [odd, *step]
    # rank 1's words reach the barrier first: its admission, and whatever its chunk made it say
    effects = {1: feed(ranks[1], late, admit=False), 0: feed(ranks[0], [x, *step], admit=False)}
    out = relay(barrier(), ranks, effects)
    for r in (0, 1):
        assert not of(out[r], Write)
        (res,) = of(out[r], ToEngine)
        assert res.result.status is Status.FAILED
        assert "disagree on the cache_info: num_tokens (rank 0: 24; rank 1: 20)" in res.result.reason, res.result
    assert of(out[0], ToEngine)[0].result.reason == of(out[1], ToEngine)[0].result.reason


# -- recovery order, chunks, identity ------------------------------------------------------------


def test_later_layers_that_arrive_before_recovery_are_posted_at_recovery() -> None:
    c = core()
    out = feed(c, layers(1, SlotChunk(2, 0, 16, 1)), complete=False)
    assert not of(out, Write)
    assert c.sizes()["parked_signals"] == 1
    out = feed(c, [info("x", 2, 1, 16, [1], [9])], complete=False)
    assert [w.layers for w in of(out, Write)] == [tuple(range(LAYERS))]


def test_chunked_prefill_sends_each_chunks_completed_blocks_and_finishes_after_the_last() -> None:
    c = core()
    x = info("x", 4, 10, 40, [1, 2, 3], [7, 8, 9])  # 40 tokens: blocks of 16, 16, 8
    out = feed(c, [x, *layers(10, SlotChunk(4, 0, 20, 10))])  # tokens 0..19: block 0 complete
    assert {r for w in of(out, Write) for r in w.runs} == {Run(1, 7, 1)}
    assert not messages(out, Arrive)
    out = feed(c, layers(11, SlotChunk(4, 20, 10, 10)))  # tokens 20..29: no new block complete
    assert not of(out, Write) and not messages(out, Arrive)
    out = feed(c, layers(12, SlotChunk(4, 30, 10, 10)))  # final chunk: blocks 1 and 2
    assert {r for w in of(out, Write) for r in w.runs} == {Run(2, 8, 2)}
    (arrive,) = messages(out, Arrive)
    assert arrive.digest.blocks == 3
    assert arrive.digest.bytes == 3 * LAYERS * 1024 * 2


def test_chunks_parked_before_the_cache_info_are_all_claimed_at_recovery() -> None:
    c = core()
    feed(c, [*layers(10, SlotChunk(4, 0, 16, 10)), *layers(11, SlotChunk(4, 16, 16, 10))])
    assert c.sizes()["parked_signals"] == 2
    out = feed(c, [info("x", 4, 10, 32, [1, 2], [7, 8])])
    # both chunks' blocks of a layer leave in one write, merged into one run
    assert [(w.layers, w.runs) for w in of(out, Write)] == [(tuple(range(LAYERS)), (Run(1, 7, 2),))]
    assert len(messages(out, Arrive)) == 1
    assert c.sizes()["parked_signals"] == 0


def test_slot_reuse_never_hands_a_new_requests_chunk_to_the_old_one() -> None:
    """Old request o (slot 2, began step 1) is aborted by the scheduler, but the worker reused
    slot 2 before the abort reached this rank. The new request's second chunk starts at the token
    the old one expects next; identity (slot, start_step), not the offset, decides."""
    c = core()
    feed(c, [info("o", 2, 1, 64, [0, 1, 2, 3], [10, 11, 12, 13]), *layers(1, SlotChunk(2, 0, 16, 1))])
    out = feed(c, [*layers(3, SlotChunk(2, 0, 16, 3)), *layers(4, SlotChunk(2, 16, 16, 3))])
    assert not of(out, Write), "chunks of the slot's new occupant must wait for its own cache_info"
    assert c.sizes()["parked_signals"] == 2
    out = feed(c, [Abort("o", "preempted"), info("n", 2, 3, 32, [5, 6], [20, 21])])
    assert {r for w in of(out, Write) for r in w.runs} == {Run(5, 20, 2)}
    assert [(type(m), m.key) for m in messages(out, Withdraw) + messages(out, Arrive)] == [
        (Withdraw, "o"),
        (Arrive, "n"),
    ]


def test_a_chunk_with_a_gap_fails_its_request_with_a_reason() -> None:
    c = core()
    feed(c, [info("x", 1, 1, 64, [0, 1, 2, 3], [4, 5, 6, 7]), *layers(1, SlotChunk(1, 0, 16, 1))])
    out = feed(c, layers(2, SlotChunk(1, 32, 16, 1)))
    (problem,) = of(out, Problem)
    assert problem.code is ErrorCode.BAD_LAYOUT and "previous one ended at 16" in problem.detail
    (withdraw,) = messages(out, Withdraw)
    assert withdraw.status is Status.FAILED and "token 32" in withdraw.reason


def test_a_repeated_layer_signal_posts_nothing_twice() -> None:
    c = core()
    out = feed(c, [info("x", 0, 1, 16, [1], [2]), LayerSignal(1, 0, (SlotChunk(0, 0, 16, 1),))], complete=False)
    out += c.handle(LayerSignal(1, 1), 0.0) + c.handle(LayerSignal(1, 1), 0.0)
    assert [w.layers for w in of(out, Write)] == [(0,), (1,)]


def test_step_ids_must_increase_and_unknown_later_layers_are_refused() -> None:
    c = core()
    feed(c, layers(5, SlotChunk(0, 0, 16, 5)))
    (p,) = c.handle(LayerSignal(5, 0, (SlotChunk(1, 0, 16, 5),)), 0.0)
    assert p.code is ErrorCode.STALE_SIGNAL and "must increase" in p.detail
    (p,) = c.handle(LayerSignal(9, 1), 0.0)
    assert p.code is ErrorCode.STALE_SIGNAL and "before that step's layer-0" in p.detail
    (p,) = c.handle(LayerSignal(9, LAYERS), 0.0)
    assert p.code is ErrorCode.OUT_OF_RANGE


# -- refusals: an ending like any other ------------------------------------------------------------


@pytest.mark.parametrize(
    ("msg", "code"),
    [
        (info("x", 0, 1, 40, [1, 2], [3, 4]), ErrorCode.BAD_LAYOUT),  # 40 tokens need 3 blocks
        (info("x", 0, 1, 16, [64], [3]), ErrorCode.OUT_OF_RANGE),
    ],
)
def test_a_refused_cache_info_is_told_to_the_engine_the_decode_peer_and_the_barrier(
    msg: CacheInfo, code: ErrorCode
) -> None:
    c = core()
    out = c.handle(msg, 0.0)
    assert [type(e) for e in out] == [Problem, ToEngine, ToPeer, ToBarrier]
    assert out[0].code is code and out[0].reply
    result = out[1].result
    assert result.status is Status.FAILED and result.reason == out[0].detail and result.code == code.value
    assert out[2] == ToPeer("d", result)  # the decode rank learns at once: its blocks can be reused
    assert out[3].message == Withdraw("prefill", "x", 0, 0, Status.FAILED, out[0].detail, peer="d")
    assert c.sizes()["requests"] == 0
    # the verdict that follows (the other ranks learn of the refusal) tells no one here again
    verdict = Diverged("prefill", "x", 0, Status.FAILED, f"rank 0 failed: {out[0].detail}", (), "d")
    assert c.handle(verdict, 1.0) == []
    quiet(c)
    assert set(c.sizes().values()) == {0}


def test_the_signals_of_a_refused_request_are_dropped_not_parked() -> None:
    c = core()
    feed(c, [LayerSignal(1, 0, (SlotChunk(0, 0, 16, 1),))])  # parked before the cache_info came
    assert c.sizes()["parked_signals"] == 1
    c.handle(info("x", 0, 1, 40, [1, 2], [3, 4]), 0.0)  # refused: bad layout
    assert c.sizes()["parked_signals"] == 0
    out = feed(c, layers(2, SlotChunk(0, 16, 16, 1)))  # its next chunk: nothing waits for it
    assert out == [] and c.sizes()["parked_signals"] == 0
    quiet(c)
    assert set(c.sizes().values()) == {0}


def test_refusals_of_the_shell_are_endings_too_but_never_for_a_live_instance() -> None:
    c = core()
    c.handle(info("x", 0, 1, 16, [1], [2]), 0.0)
    refusal = (ErrorCode.UNAVAILABLE, "the prefill daemon is shutting down")
    (p,) = c.on_cache_info(info("x", 0, 1, 16, [1], [2]), 0.0, refusal)  # the live one is untouched
    assert p.code is ErrorCode.DUPLICATE_REQUEST
    out = c.on_cache_info(info("y", 1, 1, 16, [3], [4]), 0.0, refusal)
    assert of(out, ToEngine)[0].result.code == "unavailable"
    assert of(out, ToPeer) and messages(out, Withdraw)


def test_close_withdraws_and_ends_everything_as_failed_and_empties_every_table() -> None:
    c = core()
    feed(c, [info("a", 0, 1, 16, [1], [2]), LayerSignal(1, 0, (SlotChunk(0, 0, 16, 1),))], complete=False)
    c.handle(info("b", 1, 2, 16, [3], [4]), 0.0)
    out = c.close("daemon shutting down", 1.0)
    # worded as the verdict the others report (this rank the only one to withdraw), marked as alone
    results = sorted((e.result.request_id, e.result.status, e.result.reason, e.result.code) for e in of(out, ToEngine))
    said = ("rank 0 failed: daemon shutting down", "unavailable")
    assert results == [("a", Status.FAILED, *said), ("b", Status.FAILED, *said)]
    assert len(of(out, ToPeer)) == 2
    withdrawals = messages(out, Withdraw)
    assert sorted(m.key for m in withdrawals) == ["a", "b"]  # the others fail them too, with the same words
    assert {m.reason for m in withdrawals} == {"daemon shutting down"}
    quiet(c)
    assert set(c.sizes().values()) == {0}


def test_a_process_that_exits_withdraws_what_it_holds_and_tells_nobody_else() -> None:
    # issue 23, item 6: the group's verdict is the one ending; the scheduler sees this rank gone
    c = core()
    feed(c, [info("a", 0, 1, 16, [1], [2]), LayerSignal(1, 0, (SlotChunk(0, 0, 16, 1),))], complete=False)
    c.handle(info("b", 1, 2, 16, [3], [4]), 0.0)
    out = c.close("the prefill daemon is shutting down (a second signal)", 1.0, report=False)
    assert of(out, ToEngine) == [] and of(out, ToPeer) == []
    assert sorted(m.key for m in messages(out, Withdraw)) == ["a", "b"]
    quiet(c)
    assert set(c.sizes().values()) == {0}


def test_duplicate_and_slot_busy_cache_infos() -> None:
    c = core()
    c.handle(info("x", 0, 1, 16, [1], [2]), 0.0)
    (p,) = c.handle(info("x", 0, 1, 16, [1], [2]), 0.0)
    assert p.code is ErrorCode.DUPLICATE_REQUEST and "already in flight" in p.detail
    out = c.handle(info("y", 0, 1, 16, [1], [2]), 0.0)
    assert out[0].code is ErrorCode.SLOT_BUSY and "already belongs to request x" in out[0].detail
    assert of(out, ToPeer), "the refused request's decode blocks must be released too"
    assert c.sizes()["requests"] == 1


def test_request_table_bound_is_an_explicit_failure() -> None:
    c = core(max_requests=2)
    c.handle(info("a", 0, 1, 16, [1], [2]), 0.0)
    c.handle(info("b", 1, 1, 16, [1], [2]), 0.0)
    out = c.handle(info("c", 2, 1, 16, [1], [2]), 0.0)
    assert out[0].code is ErrorCode.TABLE_FULL and "2 requests" in out[0].detail
    assert out[1].result.status is Status.FAILED and out[1].result.code == "table_full"


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


# -- aborts ---------------------------------------------------------------------------------------


def test_abort_waits_for_inflight_writes_before_withdrawing() -> None:
    c = core()
    out = feed(c, [info("x", 0, 1, 16, [1], [2]), LayerSignal(1, 0, (SlotChunk(0, 0, 16, 1),))], complete=False)
    (w,) = of(out, Write)
    assert c.handle(Abort("x", "user gone"), 1.0) == []  # draining: the write is still in flight
    out = c.write_done(w.write_id, 2.0)
    assert messages(out, Withdraw) == [
        Withdraw("prefill", "x", 0, 0, Status.ABORTED, "user gone", admitted=True, peer="d")
    ]
    out = c.handle(Diverged("prefill", "x", 0, Status.ABORTED, "aborted: user gone"), 3.0)
    (res,) = of(out, ToEngine)
    assert (res.result.status, res.result.reason) == (Status.ABORTED, "aborted: user gone")  # the verdict's words


def test_an_abort_before_the_cache_info_is_remembered_and_ends_it_at_once() -> None:
    """Case 3: the abort overtook its cache_info. The cache_info then withdraws as aborted at once
    (no admission, no write), and the layer-0 signal already parked for it is dropped."""
    c = core()
    feed(c, layers(1, SlotChunk(0, 0, 16, 1)))
    assert c.handle(Abort("x", "client cancelled"), 0.0) == []
    assert c.sizes()["aborts"] == 1
    out = c.handle(info("x", 0, 1, 16, [1], [2]), 0.1)
    assert messages(out, Withdraw) == [Withdraw("prefill", "x", 0, 0, Status.ABORTED, "client cancelled", peer="d")]
    assert not messages(out, Admit) and not of(out, Write)
    assert c.sizes()["parked_signals"] == 0 and c.sizes()["aborts"] == 0
    out = c.handle(Diverged("prefill", "x", 0, Status.ABORTED, "aborted: client cancelled"), 0.2)
    (res,) = of(out, ToEngine)
    assert res.result.status is Status.ABORTED
    (notice,) = of(out, ToPeer)
    assert notice.message.status is Status.ABORTED
    quiet(c)
    assert set(c.sizes().values()) == {0}


def test_remembered_aborts_expire_and_are_bounded() -> None:
    c = core(max_requests=2)
    c.handle(Abort("a"), 0.0)
    c.handle(Abort("b"), 0.0)
    (p,) = c.handle(Abort("c"), 0.0)
    assert p.code is ErrorCode.TABLE_FULL and p.reply
    assert c.next_deadline() == pytest.approx(5.0)  # pending_timeout_s
    c.on_timer(5.0)
    assert c.sizes()["aborts"] == 0
    assert messages(feed(c, [info("a", 0, 1, 16, [1], [2])], admit=False), Admit)  # no longer aborted


def test_an_abort_and_a_cache_info_in_either_order_end_the_same_on_every_rank() -> None:
    """Case 2: rank 0 gets cache_info then Abort, rank 1 Abort then cache_info. Both end aborted,
    with the same reason, and both decode ranks are told so."""
    x = info("x", 0, 1, 16, [1], [2])
    ranks = [core(0), core(1)]
    effects = {
        0: feed(ranks[0], [x, Abort("x", "client cancelled")], admit=False),
        1: feed(ranks[1], [Abort("x", "client cancelled"), x], admit=False),
    }
    out = relay(barrier(), ranks, effects)
    endings = [(e.result.status, e.result.reason) for r in (0, 1) for e in of(out[r], ToEngine)]
    assert endings == [(Status.ABORTED, "aborted: client cancelled")] * 2
    notices = [e.message for r in (0, 1) for e in of(out[r], ToPeer)]
    assert [n.status for n in notices] == [Status.ABORTED, Status.ABORTED]


def test_abort_of_an_ended_instance_is_dropped_quietly() -> None:
    c = core()
    out = feed(c, [info("x", 0, 1, 16, [1], [2]), *layers(1, SlotChunk(0, 0, 16, 1))])
    (arrive,) = messages(out, Arrive)
    c.handle(Release("prefill", "x", 0, arrive.digest), 1.0)
    assert c.handle(Abort("x", "too late"), 2.0) == []
    assert c.sizes()["aborts"] == 0


# -- instances: reuse and late messages -------------------------------------------------------------


def test_a_reused_id_starts_clean_and_late_messages_of_the_old_instance_are_dropped() -> None:
    """Case 6: instance 0 of "x" expires; "x" is reused at once as instance 1 and completes. Late
    words about instance 0 (an abort, a repeated verdict, its cache_info again) change nothing."""
    c = core()
    c.handle(info("x", 0, 1, 16, [1], [2]), 0.0)
    expired = Expired("prefill", "x", 0, (1,), 10.0, Status.FAILED, "rank 1 of group prefill did not report")
    (res,) = of(c.handle(expired, 10.0), ToEngine)
    assert res.result.key == ("x", 0) and res.result.status is Status.FAILED
    out = feed(c, [info("x", 1, 2, 16, [3], [4], instance=1), *layers(2, SlotChunk(1, 0, 16, 2))], now=10.5)
    (arrive,) = messages(out, Arrive)
    assert arrive.instance == 1
    assert c.handle(Abort("x", "late", 0), 10.6) == []
    assert c.handle(expired, 10.6) == []
    (p,) = c.handle(info("x", 0, 1, 16, [1], [2]), 10.6)
    assert p.code is ErrorCode.DUPLICATE_REQUEST and "already ended" in p.detail
    out = c.handle(Release("prefill", "x", 1, arrive.digest), 11.0)
    assert [e.result.status for e in of(out, ToEngine)] == [Status.OK]
    assert [e.message for e in of(out, ToPeer)] == [KVReady("x", 0, LAYERS * 2048, 1)]


def test_a_verdict_for_an_instance_never_held_tells_the_decode_peer_and_answers_the_straggler() -> None:
    """This rank never got the cache_info before the barrier gave up on it. Its decode rank is
    told anyway (the peer comes with the verdict); the cache_info that comes late is answered with
    the same ending, and nobody is told twice."""
    c = core(1)
    feed(c, [LayerSignal(1, 0, (SlotChunk(0, 0, 16, 1),))])  # its signal came; its cache_info did not
    expired = Expired("prefill", "x", 0, (1,), 10.0, Status.FAILED, "rank 1 did not report", "ipc://d-{rank}")
    out = c.handle(expired, 10.0)
    assert out == [ToPeer("ipc://d-{rank}", TransferResult("x", Status.FAILED, "rank 1 did not report", 1))]
    out = c.handle(info("x", 0, 1, 16, [1], [2], peer="ipc://d-{rank}"), 11.0)
    assert [type(e) for e in out] == [ToEngine]
    assert (out[0].result.status, out[0].result.reason) == (Status.FAILED, "rank 1 did not report")
    (p,) = c.handle(info("x", 0, 1, 16, [1], [2], peer="ipc://d-{rank}"), 11.0)
    assert p.code is ErrorCode.DUPLICATE_REQUEST
    assert c.sizes()["requests"] == c.sizes()["parked_signals"] == 0  # the signal waits for nothing now

    # the verdict named another decode peer than this rank's cache_info does (the first word the
    # barrier heard came from a rank whose cache_info diverged): the notice went there, so this
    # rank's own peer is told too when the cache_info comes, and the barrier hears its word, so
    # that peer's ranks hear it for every writer (one whose cache_info named the other never tells)
    c = core(1)
    other = replace(expired, key="y", peer="ipc://elsewhere-{rank}")
    assert [e.peer for e in of(c.handle(other, 10.0), ToPeer)] == ["ipc://elsewhere-{rank}"]
    out = c.handle(info("y", 0, 1, 16, [1], [2], peer="ipc://d-{rank}"), 11.0)
    assert [type(e) for e in out] == [ToEngine, ToPeer, ToBarrier]
    assert out[1].peer == "ipc://d-{rank}" and out[2].message.peer == "ipc://d-{rank}"
    assert isinstance(out[2].message, Withdraw) and out[2].message.key == "y"


def test_a_status_snapshot_builds_only_the_rows_it_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A status query costs its limit, not the number of live requests: one wake-up may read 256
    of them, and a loop stalled past its heartbeats fails every request it holds."""
    from kvxferd.core import reporting

    c = core()
    for i in range(5):
        c.handle(info(f"q{i}", i, 1, 16, [i], [10 + i]), 0.1 * i)
    built: list[str] = []
    waits = reporting.waits
    monkeypatch.setattr(reporting, "waits", lambda req: built.append(req.info.request_id) or waits(req))
    assert [row["request_id"] for row in c.snapshot(1.0, limit=2)] == ["q0", "q1"]  # the oldest
    assert sorted(set(built)) == ["q0", "q1"], "rows were built that the reply does not show"
    assert len(c.snapshot(1.0)) == 5


# -- verdicts ---------------------------------------------------------------------------------------


def test_write_failure_fails_the_request_on_every_rank_through_the_barrier() -> None:
    ranks = [core(0), core(1)]
    bar = barrier()
    x = info("x", 0, 1, 16, [1], [2])
    sig = LayerSignal(1, 0, (SlotChunk(0, 0, 16, 1),))
    words = []
    for r, c in enumerate(ranks):
        out = feed(c, [x, sig], complete=False)
        (w,) = of(out, Write)
        out = c.write_done(w.write_id, 0.1, error="peer gone" if r == 1 else None)
        words += messages(out, Withdraw)
        for layer in range(1, LAYERS):
            for w in of(c.handle(LayerSignal(1, layer), 0.2), Write):
                words += messages(c.write_done(w.write_id, 0.3), Arrive)
    for r in (0, 1):
        bar.handle(Admit("prefill", "x", 0, r, terms_of(x)), 0.0)
    assert [type(m) for m in words] == [Arrive, Withdraw]
    verdicts = [v for m in words for v in bar.handle(m, 1.0)]
    assert all(isinstance(v.message, Diverged) for v in verdicts)
    results = [of(ranks[v.rank].handle(v.message, 1.0), ToEngine)[0].result for v in verdicts]
    assert [r.status for r in results] == [Status.FAILED, Status.FAILED]
    assert all(r.reason == "rank 1 failed: write of layer 0 to d failed: peer gone" for r in results)


def test_a_verdict_while_active_stops_new_writes_and_waits_for_inflight_ones() -> None:
    c = core()
    out = feed(c, [info("x", 0, 1, 16, [1], [2]), LayerSignal(1, 0, (SlotChunk(0, 0, 16, 1),))], complete=False)
    (w,) = of(out, Write)
    expired = Expired("prefill", "x", 0, (1,), 30.0, Status.FAILED, "rank 1 of group prefill did not report")
    assert c.handle(expired, 1.0) == []
    assert not of(c.handle(LayerSignal(1, 1), 1.1), Write)
    out = c.write_done(w.write_id, 1.2)
    (res,) = of(out, ToEngine)
    assert res.result.status is Status.FAILED and res.result.reason == expired.reason
    (peer,) = of(out, ToPeer)
    assert peer.message == res.result
    assert not of(out, ToBarrier)  # the barrier already settled the key
    quiet(c)
    assert set(c.sizes().values()) == {0}


def test_release_reports_ok_to_engine_and_kv_ready_to_decode_peer() -> None:
    c = core()
    out = feed(c, [info("x", 0, 1, 16, [1], [2], peer="ipc://dec-{rank}"), *layers(1, SlotChunk(0, 0, 16, 1))])
    (arrive,) = messages(out, Arrive)
    out = c.handle(Release("prefill", "x", 0, arrive.digest), 0.5)
    # the ok result waits for decode's confirmation that its engine was told the KVReady
    ok = TransferResult("x", Status.OK, "", 0, LAYERS * 2048, "auto", 0.0, 0.0, 500.0, 0, "", 0.0)
    assert out == [ToPeer("ipc://dec-{rank}", KVReady("x", 0, LAYERS * 2048, 0), then=ToEngine(ok))]


def test_long_reasons_are_clipped_never_raised() -> None:
    c = core()
    c.handle(info("x", 0, 1, 16, [1], [2]), 0.0)
    out = c.handle(Abort("x", "r" * MAX_TEXT), 0.0)
    (withdraw,) = messages(out, Withdraw)
    assert len(withdraw.reason) <= MAX_TEXT
    long = Diverged("prefill", "x", 0, Status.ABORTED, "aborted: " + "r" * (MAX_TEXT - 9))
    (res,) = of(c.handle(long, 1.0), ToEngine)
    assert len(res.result.reason) <= MAX_TEXT


# -- deadlines ---------------------------------------------------------------------------------------


def test_next_deadline_and_timeouts_name_what_was_missing() -> None:
    c = core()
    assert c.next_deadline() is None
    feed(c, [info("a", 0, 1, 16, [1], [2])])  # admitted; waits for its layer-0 signal
    feed(c, [LayerSignal(2, 0, (SlotChunk(3, 0, 16, 2),))], now=1.0)  # a signal nobody claims
    feed(c, [info("b", 4, 3, 32, [5, 6], [7, 8]), LayerSignal(3, 0, (SlotChunk(4, 0, 16, 3),))], now=2.0)
    assert c.next_deadline() == 5.0
    assert c.on_timer(4.99) == []
    out = c.on_timer(5.0)
    (w,) = messages(out, Withdraw)
    assert w.status is Status.FAILED and "no layer-0 signal for slot 0 of step 1 within 5s" in w.reason
    out = c.on_timer(6.0)
    (p,) = of(out, Problem)
    assert p.code is ErrorCode.STALE_SIGNAL and not p.reply and "slot 3 of step 2" in p.detail
    assert c.next_deadline() == 9.0  # b's progress deadline (7 s after its last write completed at 2.0)
    (w,) = messages(c.on_timer(9.0), Withdraw)
    assert "waiting for the chunk at token 16 of 32 (slot 4, after step 3)" in w.reason
    assert c.next_deadline() == 16.0  # a's verdict deadline (5 + 11)
    out = c.on_timer(16.0)
    (res,) = of(out, ToEngine)
    assert res.result.request_id == "a" and "no verdict from the barrier service within 11s" in res.result.reason
    quiet(c)
    assert set(c.sizes().values()) == {0}


def test_an_admission_the_barrier_never_answers_ends_with_a_withdrawal() -> None:
    c = core()
    out = feed(c, [info("x", 0, 1, 16, [1], [2]), *layers(1, SlotChunk(0, 0, 16, 1))], admit=False)
    assert not of(out, Write)
    assert c.next_deadline() == 11.0  # verdict_timeout_s from the cache_info
    out = c.on_timer(11.0)
    assert [type(e) for e in out] == [ToBarrier, ToEngine, ToPeer]
    assert "no admission verdict from the barrier service within 11s" in out[1].result.reason
    assert c.sizes()["requests"] == 0


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
    """Deadlines fire while work is still queued: everything still ends exactly once."""
    rng = random.Random(seed)
    sc = build_scenario(
        rng, world=3, num_layers=2, block_tokens=4, num_slots=3, num_steps=8, abort_rate=0.3, refusal_rate=0.1
    )
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
    sim.run()
    for key in sc.plans:
        results = [rank.results[key] for rank in sim.procs]
        assert all(len(rs) == 1 for rs in results), (key, results)
    for rank in sim.procs:
        assert set(rank.core.sizes().values()) == {0}


def test_a_step_far_ahead_is_refused_not_adopted_so_real_signals_keep_working() -> None:
    c = core(max_step_gap=100)
    feed(c, layers(5, SlotChunk(0, 0, 16, 5)))
    (p,) = c.handle(LayerSignal(5 + 101, 0, (SlotChunk(1, 0, 16, 5),)), 0.0)
    assert p.code is ErrorCode.OUT_OF_RANGE and "at most 100" in p.detail
    (p,) = c.handle(LayerSignal((1 << 63) - 1, 0, (SlotChunk(1, 0, 16, 5),)), 0.0)
    assert p.code is ErrorCode.OUT_OF_RANGE
    # the next real step is not stale: the far-ahead ones were never adopted
    effects = feed(c, [info("y", 1, 6, 16, [2], [3]), *layers(6, SlotChunk(1, 0, 16, 6))])
    assert not [e for e in of(effects, Problem)]
    assert of(effects, Write)


def test_a_new_worker_starts_a_new_step_window_and_what_was_signalled_before_goes() -> None:
    c = core()
    feed(c, [info("a", 0, 1000, 16, [1], [2]), *layers(1000, SlotChunk(0, 0, 16, 1000))])
    assert c.new_worker() == 0  # the next worker may start anywhere
    assert not of(feed(c, layers(3, SlotChunk(0, 0, 16, 3))), Problem)
    # another connection registers and leaves a step far ahead open (issue 23, item 17); when the
    # real worker registers again, that step goes too
    c.new_worker()
    c.handle(LayerSignal((1 << 63) - 1, 0, (SlotChunk(1, 0, 16, (1 << 63) - 1),)), 0.0)
    assert c.sizes()["steps"] == 1 and c.sizes()["parked_signals"] == 1
    assert c.new_worker() == 1
    assert c.sizes()["steps"] == c.sizes()["parked_signals"] == 0
    assert c.sizes()["deadlines"] == 1  # only request a's wait for its verdict: the signal's went
    assert not of(c.handle(LayerSignal(2, 0, (SlotChunk(2, 0, 16, 2),)), 0.0), Problem)


# -- where results go and what they report -----------------------------------------------------


def test_a_result_goes_to_the_connection_its_cache_info_came_from_with_the_transport_used() -> None:
    c = core(world_size=1)
    effects = c.on_cache_info(info("R", 0, 1, 16, [3], [4]), 0.0, origin=b"scheduler-A")
    assert c.origin_of(("R", 0)) == b"scheduler-A"
    queue = effects + c.handle(Admitted("prefill", "R", 0), 0.0)
    out: list = []
    for signal in layers(1, SlotChunk(0, 0, 16, 1)):
        queue += c.handle(signal, 0.1)
    while queue:
        eff = queue.pop(0)
        out.append(eff)
        if isinstance(eff, Write):
            queue += c.write_done(eff.write_id, 0.2, transport="shm")
        elif isinstance(eff, ToBarrier) and isinstance(eff.message, Arrive):
            queue += c.handle(Release("prefill", "R", 0, eff.message.digest), 0.3)
    (result,) = of(out, ToEngine)
    assert result.origin == b"scheduler-A"
    assert result.result.status is Status.OK and result.result.transport == "shm"
    assert c.origin_of(("R", 0)) is None and c.origins() == {}


def test_a_refused_cache_info_is_answered_to_its_sender() -> None:
    c = core(world_size=1, max_requests=1)
    c.on_cache_info(info("A", 0, 1, 16, [3], [4]), 0.0, origin=b"one")
    out = c.on_cache_info(info("B", 1, 1, 16, [5], [6]), 0.0, origin=b"two")
    (result,) = of(out, ToEngine)
    assert result.origin == b"two" and result.result.code == ErrorCode.TABLE_FULL.value
    assert c.origins() == {("A", 0): b"one"}


def test_after_a_barrier_restart_each_rank_says_its_open_words_again_and_requests_complete() -> None:
    """Three requests when the service dies: A admitted, written and arrived on both ranks (its
    verdict lost), B admitted, written and arrived on rank 0 only (rank 1's Admitted lost), C
    withdrawn by rank 1 (aborted) with no verdict yet. A new service learns all from the ranks."""
    a = info("A", 1, 1, 16, [0], [10])
    b = info("B", 2, 1, 16, [1], [11])
    c = info("C", 3, 1, 16, [2], [12])
    step = layers(1, SlotChunk(1, 0, 16, 1), SlotChunk(2, 0, 16, 1), SlotChunk(3, 0, 16, 1))
    r0, r1 = core(0), core(1)
    feed(r0, [a, b, c], admit=False)
    feed(r1, [a, b, c], admit=False)
    for r in (r0, r1):
        r.handle(Admitted("prefill", "A", 0), 0.0)
    r0.handle(Admitted("prefill", "B", 0), 0.0)
    out0 = feed(r0, step, admit=False)
    out1 = feed(r1, [*step, Abort("C", "client cancelled", 0)], admit=False)
    assert [m.key for m in messages(out0, Arrive)] == ["A", "B"]
    assert [m.key for m in messages(out1, Arrive)] == ["A"]
    assert [m.key for m in messages(out1, Withdraw)] == ["C"]
    assert [w.requests for w in of(out1, Write)] == [(("A", 0),)] * LAYERS  # nothing of B yet

    # the old service is gone with everything it was told; a new one hears the ranks again
    new = barrier()
    said0, said1 = r0.reannounce(1.0), r1.reannounce(1.0)
    words = [(type(e.message).__name__, e.message.key) for e in said0 + said1]
    assert sorted(words[:3]) == [("Admit", "C"), ("Arrive", "A"), ("Arrive", "B")]
    assert sorted(words[3:]) == [("Admit", "B"), ("Arrive", "A"), ("Withdraw", "C")]
    out = relay(new, [r0, r1], {0: said0, 1: said1})
    # rank 1 hears B was admitted (rank 0 arrived for it), writes it, arrives: B is released
    assert [(w.requests, w.layers) for w in of(out[1], Write)] == [((("B", 0),), tuple(range(LAYERS)))]
    results = {(e.result.request_id, q): e.result.status for q in (0, 1) for e in of(out[q], ToEngine)}
    expected = {"A": Status.OK, "B": Status.OK, "C": Status.ABORTED}
    assert results == {(k, q): v for k, v in expected.items() for q in (0, 1)}
    assert new.sizes()["open"] == 0
    quiet(r0, r1)
    assert set(r0.sizes().values()) == set(r1.sizes().values()) == {0}


def test_a_release_of_a_request_a_restarted_rank_never_held_tells_its_decode_rank() -> None:
    """The rank's predecessor wrote and arrived, then died before its notice went out: its decode
    rank hears a failure (nobody alive can vouch for where the bytes went) instead of nothing."""
    c = core(1)
    out = c.handle(Release("prefill", "r", 0, Digest(3, 1, 3072, "ff"), "ipc:///d-{rank}"), 1.0)
    (notice,) = of(out, ToPeer)
    assert notice.peer == "ipc:///d-{rank}" and notice.message.status is Status.FAILED
    assert "restarted after the request was released" in notice.message.reason
    assert c.handle(Release("prefill", "r", 0, Digest(3, 1, 3072, "ff"), "ipc:///d-{rank}"), 1.1) == []  # once


def test_while_the_memory_of_endings_is_full_of_recent_ones_new_requests_are_refused_not_forgotten() -> None:
    """Issue 23, item 9: the memory of endings holds ``max_ended`` for ``pending_s + verdict_s``
    (16 s here). A rank that ended that many in that time refuses the next request loudly rather
    than forget an ending early, after which a repeat of that instance would be taken as new and
    end twice; once the oldest is forgotten by time, requests are taken again."""
    c = core(max_ended=3)
    for i in range(3):
        out = feed(c, [info(f"r{i}", i, i + 1, 16, [i], [i]), *layers(i + 1, SlotChunk(i, 0, 16, i + 1))])
        (arrive,) = messages(out, Arrive)
        c.handle(Release("prefill", f"r{i}", 0, arrive.digest), 1.0)
    assert c.sizes()["ended"] == 3
    out = c.handle(info("r3", 3, 4, 16, [3], [3]), 2.0)
    assert out[0].code is ErrorCode.TABLE_FULL and "remembers 3 endings of the last 16s" in out[0].detail
    (p,) = c.handle(info("r0", 0, 1, 16, [0], [0]), 2.0)  # a repeat of the oldest is still known as one
    assert p.code is ErrorCode.DUPLICATE_REQUEST
    assert c.sizes()["ended"] == 3, "the refusal pushed no ending out"
    c.on_timer(17.0)  # the endings' time is over
    assert messages(c.handle(info("r3", 3, 4, 16, [3], [3]), 17.0), Admit)


def test_verdicts_learned_in_bulk_never_make_a_rank_refuse_new_requests() -> None:
    """A joiner, or every rank of a cold start, learns every verdict its group remembers (up to
    the barrier's max_keys, as many as a rank's memory of endings holds). Kept with the rank's own
    endings they filled that memory with fresh entries, and the rank refused every new cache_info
    (TABLE_FULL) until they aged out, ~90 s. Learned ones are kept apart: new requests are taken,
    and a late cache_info of a learned instance is still answered with its ending, once."""
    c = core(max_ended=4)
    peer = "ipc://d-{rank}"
    for i in range(6):
        verdict = Expired("prefill", f"old{i}", 0, (1,), 10.0, Status.FAILED, f"old{i} failed", peer)
        (notice,) = c.on_verdict(verdict, 0.0)
        assert isinstance(notice, ToPeer) and notice.message.status is Status.FAILED
    out = c.on_cache_info(info("new", 0, 1, 16, [1], [2]), 0.1)
    assert messages(out, Admit) and not of(out, Problem), out
    late = c.on_cache_info(info("old5", 1, 1, 16, [3], [4]), 0.2)
    (told,) = of(late, ToEngine)
    assert told.result.status is Status.FAILED and "old5 failed" in told.result.reason
    repeat = c.on_cache_info(info("old5", 1, 1, 16, [3], [4]), 0.3)
    assert [p.code for p in of(repeat, Problem)] == [ErrorCode.DUPLICATE_REQUEST] and not of(repeat, ToEngine)
    # told to its engine, it is among the rank's own endings now (guarded like them)
    assert c.sizes()["learned"] == 3 and c.sizes()["ended"] == 1
