"""A holder of the engine or daemon keys that is buggy, not only an attacker: what one of its frames
or one of its ranks can cost everyone else must stay bounded (issue 23, items 14 to 20)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import msgpack
import pytest

from kvxferd.client import PrefillWorker
from kvxferd.kvcache import HostKVCache
from kvxferd.protocol import PROTOCOL_VERSION, CacheInfo, Error, ErrorCode, SlotChunk, StatusQuery
from tests.hostile.conftest import ANSWER_S, HOSTILE, Hostile
from tests.integration.conftest import deploy, fill

#: a small pending table, so a few frames overflow it
SMALL_TABLE = HOSTILE + "limits: {max_pending_signals: 64}\n"
#: few connections per daemon, so a few clients fill them
FEW_CONNECTIONS = HOSTILE + "limits: {max_connections: 6}\n"


@pytest.fixture
def small() -> Iterator[Hostile]:
    with deploy(SMALL_TABLE, kind=Hostile) as d:
        assert isinstance(d, Hostile)
        d.steps = itertools.count(1)
        yield d


def _errors_until_sentinel(dep: Hostile, rank: int) -> list[Error]:
    """Every Error the worker of ``rank`` got up to the answer to one sentinel: a later layer of a
    step nobody began (the daemon answers a connection's frames in order)."""
    worker = dep.workers[rank]
    sentinel_step = 1 << 40
    worker.layer_ready(sentinel_step, 1)
    got: list[Error] = []
    deadline = time.monotonic() + ANSWER_S
    while time.monotonic() < deadline:
        for _, msg in worker.poll(0.5):  # (a connection event wakes it with nothing to take)
            assert isinstance(msg, Error), msg
            if f"step {sentinel_step}" in msg.detail:
                return got
            got.append(msg)
    raise AssertionError(f"no answer to the sentinel within {ANSWER_S:g}s ({len(got)} errors before)")


def test_one_frame_of_unknown_later_chunks_draws_one_reply(small: Hostile) -> None:
    """Two layer-0 frames of 200 later chunks of requests nobody sent: the pending table (64) takes
    what it can; the rest is dropped, said in one reply per frame, not one per slot."""
    dep = small
    for step in (next(dep.steps), next(dep.steps)):
        chunks = tuple(SlotChunk(slot, 16, 4, 0) for slot in range(200))  # later chunks of step 0
        dep.workers[0].layer_ready(step, 0, chunks)
    errors = _errors_until_sentinel(dep, 0)
    assert len(errors) == 2, [e.detail[:80] for e in errors]
    assert all(e.code is ErrorCode.TABLE_FULL for e in errors)
    assert "136 slots of step" in errors[0].detail and "200 slots of step" in errors[1].detail
    _legit_once_held(dep, "after-flood")


def _legit_once_held(dep: Hostile, rid: str) -> None:
    """A legitimate request, its cache_info held by every rank before its layers come (the pending
    table may still be full of what an attack parked)."""
    assert dep.sched is not None and dep.dec is not None
    step = next(dep.steps)
    src, dst = [1, 2], [40 + step % 20, 10]
    for r, cache in enumerate(dep.pcaches):
        fill(cache, src, seed=1000 * step + r)
    dep.sched.submit(CacheInfo(rid, 5000 % 4096, step, 8, tuple(src), tuple(dst), dep.peer))
    for r in range(dep.prefill.world_size):
        dep.wait_until(f"rank {r} to hold {rid}", lambda r=r: dep.status(r)["tables"]["parked_infos"] == 1)
    for worker in dep.workers:
        for layer in range(dep.config.kv.num_layers):
            worker.layer_ready(step, layer, (SlotChunk(5000 % 4096, 0, 8, step),) if layer == 0 else ())
    assert dep.sched.wait(rid, ANSWER_S).ok
    assert dep.dec.wait(rid, ANSWER_S).ready


def test_a_takeover_registration_cannot_poison_the_real_workers_step_window(dep: Hostile) -> None:
    """Another connection registers a cache of its own with prefill rank 0 and opens a step far
    ahead; the real worker registers again at once. Its steps must be taken as a new sequence,
    not refused as stale until yet another registration."""
    other = PrefillWorker(dep.config.endpoint(dep.prefill, 0), credentials=dep.creds)
    impostor = HostKVCache.create(dep.shape)
    try:
        other.register(impostor)
        far = (1 << 63) - 1
        other.layer_ready(far, 0, (SlotChunk(3, 0, 8, far),))
        dep.wait_until("the far step to be open", lambda: dep.status(0)["tables"]["steps"] == 1)
        dep.workers[0].register(dep.pcaches[0])
        assert dep.status(0)["tables"]["steps"] == 0
        dep.still_fine("after-takeover")
    finally:
        other.close()
        impostor.close()
        impostor.unlink()


def test_frames_that_cost_much_to_parse_do_not_stall_a_daemon_past_its_heartbeat(dep: Hostile, probes) -> None:
    """Issue 23, item 15: a layer signal of a million empty slots fits in 1 MiB and took a third of
    a second to parse before its count was checked; four connections sending four each stalled
    prefill rank 0 past its heartbeat, and the barrier failed the request it held. The count is read
    from the list's header now: the request in flight completes."""
    assert dep.sched is not None
    step = next(dep.steps)
    src, dst = [1, 2], [50, 51]
    for r, cache in enumerate(dep.pcaches):
        fill(cache, src, seed=step + r)
    dep.sched.submit(CacheInfo("held", 0, step, 8, tuple(src), tuple(dst), dep.peer))
    dep.wait_until("rank 0 to hold it", lambda: dep.status(0)["tables"]["requests"] == 1)
    million = b"\x95" + msgpack.packb(PROTOCOL_VERSION) + msgpack.packb("layer") + b"\x01\x00"
    million += b"\xdd" + (1_048_000).to_bytes(4, "big") + b"\x90" * 1_048_000
    attackers = [probes(dep.config.endpoint(dep.prefill, 0), credentials=dep.creds) for _ in range(4)]
    for _ in range(4):
        for attacker in attackers:
            attacker.send(million)
    for attacker in attackers:  # every frame answered: refused, without a stall
        for _ in range(4):
            answer = attacker.recv()
            assert isinstance(answer, Error) and "at most 4096" in answer.detail, answer
    for worker in dep.workers:
        for layer in range(dep.config.kv.num_layers):
            worker.layer_ready(step, layer, (SlotChunk(0, 0, 8, step),) if layer == 0 else ())
    out = dep.sched.wait("held", ANSWER_S)
    assert out.ok, out.results
    dep.still_fine("after-costly-frames")


def test_every_frame_up_to_the_documented_limit_is_answered_and_a_little_more_is_refused_in_words(
    dep: Hostile, probes
) -> None:
    """Issue 23, item 19: with CURVE, the envelope counted against ZMQ's own size limit, so frames
    just under ``limits.max_frame_bytes`` dropped the connection without a word. Every frame up to
    the limit is read and answered; one a little over it is refused with an Error."""
    limit = dep.config.limits.max_frame_bytes
    for size in (limit - 64, limit - 32, limit - 1, limit, limit + 1, limit + 200):
        attacker = probes(dep.config.endpoint(dep.prefill, 0), credentials=dep.creds)
        header = b"\x93" + msgpack.packb(PROTOCOL_VERSION) + msgpack.packb("abort")
        text = "a" * (size - len(header) - 5)  # a request id far too long: read, then refused
        frame = header + b"\xdb" + len(text).to_bytes(4, "big") + text.encode()
        assert len(frame) == size
        answer = attacker.ask(frame)
        if size <= limit:
            assert isinstance(answer, Error) and "request_id" in answer.detail, (size, answer)
        else:
            assert isinstance(answer, Error) and f"exceeds the {limit}-byte limit" in answer.detail, (size, answer)
    dep.still_fine("after-frames-at-the-limit")


def test_one_ranks_refusals_cannot_fill_the_barrier_for_the_group(dep: Hostile) -> None:
    """Issue 23, item 14: a scheduler that skips rank 1 sends rank 0 more refusable cache_infos
    than the group has barrier keys (64 here); each is refused and withdrawn, and rank 1 never
    speaks in those keys. A legitimate request right after must still be admitted and move."""
    assert dep.sched is not None
    flood = 3 * 64
    for i in range(flood):
        dep.sched.submit(CacheInfo(f"skip-{i}", i % 4096, 0, 8, (999,), (1,), dep.peer), ranks=[0])
    refused = set()
    deadline = time.monotonic() + ANSWER_S
    while len(refused) < flood:
        assert time.monotonic() < deadline, f"{len(refused)} of {flood} refusals came"
        refused |= {out.request_id for out in dep.sched.collect(0.5) if out.refused}
    _legit_once_held(dep, "after-refusals")
    probe = dep.status(0)
    assert probe["tables"]["requests"] == 0


def test_a_daemon_holds_a_bounded_number_of_connections_so_what_they_can_queue_is_bounded(probes) -> None:
    """Issue 23, item 16: twelve clients holding the engine keys connect to prefill rank 0, which
    already serves its worker and scheduler: it takes 6 in all (limits.max_connections), so what
    all of them can queue is bounded; the others are refused in the handshake and get no answer.
    Once they leave, their places are free again, and the worker and scheduler were served all along."""
    with deploy(FEW_CONNECTIONS, kind=Hostile) as dep:
        assert isinstance(dep, Hostile)
        dep.steps = itertools.count(1)
        endpoint = dep.config.endpoint(dep.prefill, 0)
        crowd, answered = [], []
        for _ in range(12):  # one after the other (a burst of handshakes is counted more strictly)
            crowd.append(probes(endpoint, credentials=dep.creds))
            crowd[-1].send(StatusQuery())
            if crowd[-1].recv(ANSWER_S if not answered else 1.0) is not None:
                answered.append(crowd[-1])
        # the worker and the scheduler hold 2 of the 6: at most 4 others are ever taken in
        assert 1 <= len(answered) <= 4, f"{len(answered)} of 12 served"
        # the worker and the scheduler, connected before, are served among the crowd
        assert dep.sched is not None and dep.dec is not None
        step = next(dep.steps)
        info = CacheInfo("among-the-crowd", 7, step, 8, (1, 2), (30, 31), dep.peer)
        dep.sched.submit(info)
        for worker in dep.workers:
            for layer in range(dep.config.kv.num_layers):
                worker.layer_ready(step, layer, (SlotChunk(7, 0, 8, step),) if layer == 0 else ())
        assert dep.sched.wait(info.request_id, ANSWER_S).ok
        for p in crowd:
            p.close()
        dep.wait_until("a new client to be served", lambda: dep.status(0)["state"] == "serving")
        _legit_once_held(dep, "after-the-crowd")
