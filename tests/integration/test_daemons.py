"""Real daemons, real sockets: the published deadlock, KVReady timing, refusals, status, shutdown."""

from __future__ import annotations

import numpy as np

from kvxferd.protocol import CacheInfo, ErrorCode, SlotChunk, Status
from tests.integration.conftest import Deployment, deploy, fill


def _info(dep: Deployment, rid: str, slot: int, step: int, tokens: int, src: list[int], dst: list[int]) -> CacheInfo:
    return CacheInfo(rid, slot, step, tokens, tuple(src), tuple(dst), dep.peer)


def _check_bytes(dep: Deployment, src: list[int], dst: list[int]) -> None:
    for rank in range(dep.prefill.world_size):
        p, d = dep.pcaches[rank].raw(), dep.dcaches[rank].raw()
        assert np.array_equal(p[:, :, src], d[:, :, dst]), f"rank {rank}: decode blocks differ from prefill"


def test_published_deadlock_through_real_processes(deployment: Deployment) -> None:
    """A (slot 3) and B (slot 5) run in step 1. Rank 0 has both cache_infos before the layer-0
    signal, rank 1 only after it: both requests still complete on both ranks, and verify."""
    dep = deployment
    layers = dep.config.kv.num_layers
    a = _info(dep, "A", 3, 1, 10, [0, 1, 2], [20, 21, 40])  # 10 tokens in blocks of 4
    b = _info(dep, "B", 5, 1, 7, [3, 4], [41, 50])
    for r in range(2):
        fill(dep.pcaches[r], [0, 1, 2, 3, 4], seed=r)
    step = (SlotChunk(3, 0, 10, 1), SlotChunk(5, 0, 7, 1))
    assert dep.sched is not None

    # rank 0: cache_infos first, confirmed processed (a status reply on the same connection follows them)
    dep.sched.submit(a, ranks=[0])
    dep.sched.submit(b, ranks=[0])
    dep.wait_until("rank 0 to park both cache_infos", lambda: dep.status(0)["tables"]["parked_infos"] == 2)
    # rank 1: the layer-0 signal first; both slots wait in its pending table
    dep.workers[1].layer_ready(1, 0, step)
    dep.wait_until("rank 1 to park both signals", lambda: dep.status(1)["tables"]["parked_signals"] == 2)
    dep.workers[0].layer_ready(1, 0, step)
    for layer in range(1, layers):
        for w in dep.workers:
            w.layer_ready(1, layer)
    dep.sched.submit(a, ranks=[1])
    dep.sched.submit(b, ranks=[1])

    for rid in ("A", "B"):
        outcome = dep.sched.wait(rid, 20.0)
        assert outcome.ok, outcome.results
        assert {r.transport for r in outcome.results.values()} == {"shm"}
        assert dep.dec is not None
        assert dep.dec.wait(rid, 20.0).ready
    _check_bytes(dep, [0, 1, 2, 3, 4], [20, 21, 40, 41, 50])
    assert dep.workers[0].errors() == [] and dep.workers[1].errors() == []


def test_kv_ready_only_once_every_rank_wrote(deployment: Deployment) -> None:
    """Rank 1 lags by its last layer. Rank 0 finishes and arrives; decode must hear nothing until
    rank 1 wrote too, and at the moment KVReady arrives every rank's bytes are in place."""
    dep = deployment
    layers = dep.config.kv.num_layers
    src, dst = [7, 8, 9], [30, 31, 12]
    for r in range(2):
        fill(dep.pcaches[r], src, seed=10 + r)
    assert dep.sched is not None and dep.dec is not None
    dep.sched.submit(_info(dep, "R", 0, 1, 12, src, dst))
    for layer in range(layers):
        dep.workers[0].layer_ready(1, layer, (SlotChunk(0, 0, 12, 1),) if layer == 0 else ())
        if layer < layers - 1:
            dep.workers[1].layer_ready(1, layer, (SlotChunk(0, 0, 12, 1),) if layer == 0 else ())

    def rank0_arrived() -> bool:
        reqs = dep.status(0)["requests"]
        return bool(reqs) and reqs[0]["state"] == "arrived"

    dep.wait_until("rank 0 to arrive at the barrier", rank0_arrived)
    assert dep.status(1)["requests"][0]["waiting_for"] == f"layer {layers - 1} of step 1"
    dep.dec.collect(0.2)
    assert dep.dec.outcome("R") is None, "decode heard of R before rank 1 wrote its last layer"

    dep.workers[1].layer_ready(1, layers - 1)
    assert dep.dec.wait("R", 20.0).ready  # every decode rank's KVReady
    _check_bytes(dep, src, dst)
    assert all(r.status is Status.OK for r in dep.sched.wait("R", 20.0).results.values())


def test_bad_requests_get_clear_errors_and_failed_results(deployment: Deployment) -> None:
    dep = deployment
    assert dep.sched is not None
    nblocks = dep.config.kv.num_blocks
    dep.sched.submit(_info(dep, "too-far", 0, 1, 4, [nblocks], [0]))
    out = dep.sched.wait("too-far", 20.0)
    assert not out.ok
    assert all("outside this rank's 64 blocks" in r.reason for r in out.results.values())
    codes = {e.code for _, e in dep.sched.errors}
    assert ErrorCode.OUT_OF_RANGE in codes

    # destination out of the decode cache's range: refused before any write, on every rank
    dep.sched.submit(_info(dep, "bad-dst", 1, 2, 4, [5], [nblocks + 3]))
    for w in dep.workers:
        w.layer_ready(2, 0, (SlotChunk(1, 0, 4, 2),))
        for layer in range(1, dep.config.kv.num_layers):
            w.layer_ready(2, layer)
    out = dep.sched.wait("bad-dst", 20.0)
    assert not out.ok
    assert all(
        "refused before writing" in r.reason and "exceed the peer's 64" in r.reason for r in out.results.values()
    )

    # a frame that is not a protocol message is answered with an error, and the daemon carries on
    ch = dep.workers[0].channels[0]
    ch.sock.send(b"\x93garbage")
    reply = ch.recv(10.0)
    assert reply is not None and reply.code is ErrorCode.BAD_MESSAGE  # type: ignore[attr-defined]
    assert dep.status(0)["state"] == "serving"


def test_status_reports_tables_and_counters(deployment: Deployment) -> None:
    dep = deployment
    st = dep.status(0)
    assert st["state"] == "serving" and st["registered"] is True
    assert set(st["tables"].values()) == {0}
    assert dep.status(0, role="decode")["engine"] is True


LARGE = """
kv: {num_layers: 4, kv_heads: 2, head_dim: 128, block_tokens: 16, num_blocks: 320, dtype: float32}
timeouts: {pending_s: 20, progress_s: 20, verdict_s: 40, peer_s: 10, startup_s: 30, shutdown_s: 5}
"""


def test_a_large_write_copied_in_slices_and_a_short_one_passing_it_both_land() -> None:
    """Each rank's layer of the large request is 4 MiB (K and V): shm copies it a slice per turn
    of the loop. A one-block request signalled right after it is written on its own (never in the
    large write's tail) while the large one moves; both end ok once, every byte in place."""
    with deploy(LARGE) as dep:
        layers = dep.config.kv.num_layers
        big_src, big_dst = list(range(256)), list(range(319, 63, -1))  # reversed: one run per block
        assert 256 * dep.shape.block_bytes * 2 > (1 << 20)  # (more than a slice)
        for r in range(2):
            fill(dep.pcaches[r], [*big_src, 300], seed=20 + r)
        assert dep.sched is not None and dep.dec is not None
        dep.sched.submit(_info(dep, "big", 0, 1, 256 * 16, big_src, big_dst))
        dep.sched.submit(_info(dep, "short", 0, 2, 16, [300], [0]))
        for layer in range(layers):
            for w in dep.workers:
                w.layer_ready(1, layer, (SlotChunk(0, 0, 256 * 16, 1),) if layer == 0 else ())
        for layer in range(layers):
            for w in dep.workers:
                w.layer_ready(2, layer, (SlotChunk(0, 0, 16, 2),) if layer == 0 else ())
        for rid in ("short", "big"):
            outcome = dep.sched.wait(rid, 30.0)
            assert outcome.ok, outcome.results
            assert dep.dec.wait(rid, 30.0).ready
        _check_bytes(dep, [*big_src, 300], [*big_dst, 0])
        assert dep.workers[0].errors() == [] and dep.workers[1].errors() == []
