"""The transport contract, the same for every transport (skipped, with the reason, where one cannot run).

- a layer's runs land byte for byte, K and V, and nothing else is touched
- a block outside either registered cache is refused before anything is written
- a peer that goes away fails the write with a reason, within the configured timeout
- close releases everything: mappings, file descriptors, native threads, handles
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvxferd.config import TransportConfig
from kvxferd.core.effects import Run
from kvxferd.errors import TransportUnavailable
from kvxferd.kvcache import HostKVCache, KVShape
from kvxferd.protocol import PeerInfo, decode
from kvxferd.runtime.peers import host_id
from kvxferd.transports import Completion, Transport, load
from tests.integration.transport_shape import SHAPE

CONFIG = TransportConfig(write_timeout_s=2.0)
HOST_TRANSPORTS = ["shm", "rdma"]


def available(name: str) -> Transport:
    """A transport over a throw-away cache, or skip saying why it cannot run here."""
    try:
        cls = load(name)
    except TransportUnavailable as exc:
        pytest.skip(str(exc))
    return cls  # type: ignore[return-value]


@pytest.fixture(params=[*HOST_TRANSPORTS, pytest.param("cuda_ipc", marks=pytest.mark.gpu)])
def name(request: pytest.FixtureRequest) -> str:
    if request.param == "cuda_ipc":
        pytest.skip("cuda_ipc moves GPU memory: its test (two processes, one GPU) is tests/gpu/test_cuda_ipc.py")
    available(request.param)
    return str(request.param)


@pytest.fixture
def caches() -> Iterator[tuple[HostKVCache, HostKVCache]]:
    src, dst = HostKVCache.create(SHAPE), HostKVCache.create(SHAPE)
    rng = np.random.default_rng(7)
    src.raw()[:] = rng.integers(0, 256, size=src.raw().shape, dtype=np.uint8)
    dst.raw()[:] = 0
    yield src, dst
    for c in (src, dst):
        c.close()
        c.unlink()


def _peer_info(name: str, cache: HostKVCache, target: Transport) -> PeerInfo:
    reg = cache.registration()
    blob = target.publish()
    return PeerInfo("decode", 0, host_id(), "host", reg.layout, reg.regions, {name: blob} if blob else {})


def _wait(t: Transport, first: Completion | None, timeout_s: float = 30.0) -> Completion:
    deadline = time.monotonic() + timeout_s
    done = first
    while done is None:
        assert time.monotonic() < deadline, "write never completed"
        got = t.poll()
        done = got[0] if got else None
    return done


@pytest.mark.parametrize("layers", [(1,), (0, 2), (0, 1, 2)], ids=["one-layer", "several-layers", "every-layer"])
def test_runs_land_byte_for_byte_and_nothing_else(
    name: str, caches: tuple[HostKVCache, HostKVCache], layers: tuple[int, ...]
) -> None:
    src, dst = caches
    cls = load(name)
    target, init = cls(CONFIG, dst.registration()), cls(CONFIG, src.registration())
    try:
        init.open_peer("peer", _peer_info(name, dst, target))
        runs = [Run(0, 5, 3), Run(9, 30, 2), Run(31, 0, 1)]
        done = _wait(init, init.post(1, "peer", layers, runs))
        assert done == Completion(1, transport=name, peer="peer")
        s, d = src.raw(), dst.raw()
        expect = np.zeros_like(d)
        for layer, r in itertools.product(layers, runs):
            expect[layer, :, r.dst : r.dst + r.length] = s[layer, :, r.src : r.src + r.length]
        assert np.array_equal(d, expect)
        assert init.pending() == 0
    finally:
        init.close()
        target.close()


def test_regions_in_any_order_are_read_and_written_where_the_registration_says(
    name: str, caches: tuple[HostKVCache, HostKVCache]
) -> None:
    """A registration need not put layer l at a fixed distance from layer l-1: the source's layers
    1 and 2 swap places and the destination's V comes before its K, and each lands where it says."""
    src, dst = caches
    reg_s, reg_d = src.registration(), dst.registration()
    at_s = {(r.layer, r.kv): r.offset for r in reg_s.regions}
    swapped = tuple(replace(r, offset=at_s[({1: 2, 2: 1}.get(r.layer, r.layer), r.kv)]) for r in reg_s.regions)
    at_d = {(r.layer, r.kv): r.offset for r in reg_d.regions}
    flipped = tuple(replace(r, offset=at_d[(r.layer, 1 - r.kv)]) for r in reg_d.regions)
    cls = load(name)
    target, init = cls(CONFIG, replace(reg_d, regions=flipped)), cls(CONFIG, replace(reg_s, regions=swapped))
    try:
        reg = replace(reg_d, regions=flipped)
        blob = target.publish()
        peer = PeerInfo("decode", 0, host_id(), "host", reg.layout, reg.regions, {name: blob} if blob else {})
        init.open_peer("peer", peer)
        runs, layers = [Run(0, 5, 3), Run(31, 0, 1)], (0, 1, 2)
        assert _wait(init, init.post(1, "peer", layers, runs)).error is None
        s, d = src.raw(), dst.raw()
        expect = np.zeros_like(d)
        for layer, r in itertools.product(layers, runs):
            from_layer = {1: 2, 2: 1}.get(layer, layer)
            for kv in (0, 1):
                expect[layer, 1 - kv, r.dst : r.dst + r.length] = s[from_layer, kv, r.src : r.src + r.length]
        assert np.array_equal(d, expect)
    finally:
        init.close()
        target.close()


@contextlib.contextmanager
def pair(name: str, src_shape: KVShape, dst_shape: KVShape) -> Iterator[tuple[HostKVCache, HostKVCache, Any, Any]]:
    """Two caches of these shapes (the source filled with random bytes, the destination zeroed, its
    padding, if any, set to 7) and the transport ``name`` on each: (src, dst, target, initiator)."""
    src, dst = HostKVCache.create(src_shape), HostKVCache.create(dst_shape)
    np.frombuffer(src.segment.buffer, dtype=np.uint8)[: src_shape.nbytes] = np.random.default_rng(11).integers(
        0, 256, src_shape.nbytes
    )
    np.frombuffer(dst.segment.buffer, dtype=np.uint8)[:] = 7
    dst.raw()[:] = 0
    cls = load(name)
    target, init = cls(CONFIG, dst.registration()), cls(CONFIG, src.registration())
    try:
        yield src, dst, target, init
    finally:
        init.close()
        target.close()
        for c in (src, dst):
            c.close()
            c.unlink()


def _bytes(cache: HostKVCache) -> np.ndarray[Any, Any]:
    """``[layer, K|V, block, (head, token) or (token, head), row bytes]``, padded or not."""
    return cache.numpy() if cache.shape.block_pad else cache.numpy().view(np.uint8)


@pytest.mark.parametrize(("src_heads", "dst_heads", "first", "at"), [(2, 1, 1, 0), (1, 2, 0, 1), (4, 2, 2, 0)])
def test_a_slice_of_heads_of_each_block_lands_in_its_place_of_the_peers_blocks(
    name: str, src_heads: int, dst_heads: int, first: int, at: int
) -> None:
    """Groups of different sizes (issue 24): heads ``first ..`` of each source block go to heads
    ``at ..`` of each destination block (as many as the smaller side holds); every other byte of
    the peer's cache is untouched."""
    from kvxferd.core.rankmap import Cut

    heads = min(src_heads, dst_heads)
    with pair(name, replace(SHAPE, kv_heads=src_heads), replace(SHAPE, kv_heads=dst_heads)) as (src, dst, target, init):
        head = src.shape.block_bytes // src_heads
        init.open_peer("peer", _peer_info(name, dst, target), Cut(first * head, at * head, heads * head))
        runs = [Run(0, 5, 3), Run(9, 30, 2)]
        assert _wait(init, init.post(1, "peer", (2,), runs)).error is None
        s, d = _bytes(src), _bytes(dst)
        expect = np.zeros_like(d)
        for r in runs:
            expect[2, :, r.dst : r.dst + r.length, at : at + heads] = s[
                2, :, r.src : r.src + r.length, first : first + heads
            ]
        assert np.array_equal(d, expect)
        # a slice that does not fit the peer's blocks is refused at open, never at a write
        with pytest.raises(Exception, match="do not fit"):
            init.open_peer("bad", _peer_info(name, dst, target), Cut(0, dst.shape.block_bytes - head, 2 * head))


def _note(seen: list[int], write_id: int, gathered: Any) -> Any:
    """Record ``write_id`` in ``seen`` if its slices went through staging (``_gather`` returned
    its slots: not None, never possible, nor False, wait for room)."""
    if isinstance(gathered, tuple):
        seen.append(write_id)
    return gathered


@pytest.mark.parametrize("staging_mb", [2, 0], ids=["staged", "block-by-block"])
def test_rdma_gathers_slices_through_staging_it_takes_back_and_goes_block_by_block_without(staging_mb: int) -> None:
    """A head slice into a peer that holds only those heads (2 prefill ranks into 4) is gathered
    into staging and sent run by run; the staging comes back when the write is done, so writes
    that together need more of it than there is all land; a write larger than the staging, or
    none configured, goes block by block. The bytes are the same every way."""
    from kvxferd.core.rankmap import Cut

    available("rdma")
    big = replace(SHAPE, num_blocks=64, block_tokens=64, head_dim=64)  # 16 KiB a head a block
    with pair("rdma", replace(big, kv_heads=2), replace(big, kv_heads=1)) as (src, dst, target, init):
        init.config = replace(CONFIG, rdma_staging_mb=staging_mb)
        head = src.shape.block_bytes // 2
        init.open_peer("peer", _peer_info("rdma", dst, target), Cut(head, 0, head))
        gathered = []
        gather = init._gather
        init._gather = lambda wid, *args: _note(gathered, wid, gather(wid, *args))
        posts = [((0, 1, 2), [Run(0, 5, 20)]), ((1,), [Run(30, 0, 10), Run(50, 40, 14)])] * 4  # 1.875, 0.75 MiB
        posts.append(((0, 1, 2), [Run(0, 0, 64)]))  # 6 MiB: more than the staging holds
        for wid, (layers, runs) in enumerate(posts, 1):
            dst.raw()[:] = 0
            assert _wait(init, init.post(wid, "peer", layers, runs)).error is None
            s, d = _bytes(src), _bytes(dst)
            expect = np.zeros_like(d)
            for layer, r in itertools.product(layers, runs):
                expect[layer, :, r.dst : r.dst + r.length, 0] = s[layer, :, r.src : r.src + r.length, 1]
            assert np.array_equal(d, expect), f"write {wid}"
            assert not init._staged  # nothing of it is still held
        if staging_mb:  # each of the first eight fits only once the one before gave its staging back
            assert gathered == list(range(1, 9))
            assert init._staging is not None and init._staging.free == [(0, staging_mb << 20)]
        else:
            assert not gathered and init._staging is None


@pytest.mark.parametrize("how", ["polled", "cancelled", "closed"])
def test_rdma_writes_that_find_the_staging_taken_wait_in_order_and_fail_before_a_byte_if_stopped(how: str) -> None:
    """Three writes of 1.9 MiB each posted at once through 2 MiB of staging: the first goes, the
    others wait their turn and land as it comes back. Cancelled or closed meanwhile, the waiting
    ones fail at the next poll and nothing of them reaches the peer."""
    from kvxferd.core.rankmap import Cut

    available("rdma")
    big = replace(SHAPE, num_blocks=64, block_tokens=64, head_dim=64)  # 16 KiB a head a block
    with pair("rdma", replace(big, kv_heads=2), replace(big, kv_heads=1)) as (src, dst, target, init):
        init.config = replace(CONFIG, rdma_staging_mb=2)
        head = src.shape.block_bytes // 2
        init.open_peer("peer", _peer_info("rdma", dst, target), Cut(head, 0, head))
        firsts = [init.post(layer + 1, "peer", (layer,), [Run(0, 2, 60)]) for layer in range(3)]
        assert all(f is None for f in firsts) and init.pending() == 3
        assert set(init._waiting) == {2, 3}
        done: dict[int, Any] = {}
        deadline = time.monotonic() + 30
        if how == "polled":  # a write of whole blocks to another peer never waits behind them
            other = HostKVCache.create(replace(big, kv_heads=2))
            target2 = load("rdma")(CONFIG, other.registration())
            try:
                init.open_peer("whole", _peer_info("rdma", other, target2))
                first = init.post(9, "whole", (0,), [Run(0, 0, 4)])
                assert 9 not in init._waiting
                if first is not None:
                    done[9] = first
                while 9 not in done:
                    assert time.monotonic() < deadline, "the whole-block write never completed"
                    done.update((c.write_id, c) for c in init.poll())
                assert done.pop(9).error is None
                assert np.array_equal(other.raw()[0, :, 0:4], src.raw()[0, :, 0:4])
                init.close_peer("whole")
            finally:
                target2.close()
                other.close()
                other.unlink()
        if how == "cancelled":
            init.cancel("the rank was stopped")
        elif how == "closed":
            init.close_peer("peer")
        while len(done) < 3:
            assert time.monotonic() < deadline, f"writes never completed: {done}"
            done.update((c.write_id, c) for c in init.poll())
        s, d = _bytes(src), _bytes(dst)
        expect = np.zeros_like(d)
        landed = [1, 2, 3] if how == "polled" else [] if how == "closed" else [1]
        for wid in landed:
            expect[wid - 1, :, 2:62, 0] = s[wid - 1, :, 0:60, 1]
        if how != "closed":  # (a closed peer's first write may or may not have landed: NIXL had it)
            assert np.array_equal(d, expect)
        assert [w for w, c in sorted(done.items()) if c.error is None] == landed
        reason = {"cancelled": "the rank was stopped", "closed": "was closed"}.get(how)
        assert all(reason in c.error for w, c in done.items() if w in (2, 3) and reason)
        assert init.pending() == 0 and not init._staged


@pytest.mark.parametrize(("src_pad", "dst_pad", "sliced"), [(256, 0, False), (0, 192, False), (64, 128, True)])
def test_blocks_padded_by_their_engine_land_in_place_and_the_padding_is_never_touched(
    name: str, src_pad: int, dst_pad: int, sliced: bool
) -> None:
    """An engine may pad its blocks (block_stride > block_bytes), on either side: whole blocks, or
    a slice of heads of each, land where they belong, and no byte of padding is written."""
    from kvxferd.core.rankmap import Cut

    shapes = replace(SHAPE, block_pad=src_pad), replace(SHAPE, kv_heads=1 if sliced else 2, block_pad=dst_pad)
    with pair(name, *shapes) as (src, dst, target, init):
        head = src.shape.block_bytes // 2
        init.open_peer("peer", _peer_info(name, dst, target), Cut(head, 0, head) if sliced else None)
        runs = [Run(0, 5, 3), Run(9, 30, 2)]
        assert _wait(init, init.post(1, "peer", (1,), runs)).error is None
        s, d = _bytes(src), _bytes(dst)
        expect = np.zeros_like(d)
        for r in runs:
            expect[1, :, r.dst : r.dst + r.length] = s[
                1, :, r.src : r.src + r.length, slice(1, 2) if sliced else slice(0, 2)
            ]
        assert np.array_equal(d, expect)
        if dst_pad:
            flat = np.frombuffer(dst.segment.buffer[: dst.shape.nbytes], dtype=np.uint8).reshape(
                -1, dst.shape.block_stride
            )
            assert (flat[:, dst.shape.block_bytes :] == 7).all(), "a byte of padding was written"


def test_a_token_major_caches_heads_land_token_by_token_over_shm_and_rdma_refuses_them(name: str) -> None:
    """Tokens outermost inside a block (NHD): the heads a rank writes are a piece of every token.
    shm copies them in one strided call per run; rdma refuses at open, saying why."""
    from kvxferd.core.rankmap import Cut

    row = SHAPE.head_dim * SHAPE.itemsize  # one head of one token
    cut = Cut(row, 0, row, SHAPE.block_tokens, 2 * row, row)  # head 1 of 2 into head 0 of 1
    shapes = replace(SHAPE, kv_heads=2, order="tokens"), replace(SHAPE, kv_heads=1, order="tokens")
    with pair(name, *shapes) as (src, dst, target, init):
        if name == "rdma":
            with pytest.raises(Exception, match="separate pieces of every block"):
                init.open_peer("peer", _peer_info(name, dst, target), cut)
            return
        init.open_peer("peer", _peer_info(name, dst, target), cut)
        assert _wait(init, init.post(1, "peer", (0,), [Run(3, 7, 2)])).error is None
        s, d = _bytes(src), _bytes(dst)  # [layer, K|V, block, token, head, bytes]
        expect = np.zeros_like(d)
        expect[0, :, 7:9, :, 0] = s[0, :, 3:5, :, 1]
        assert np.array_equal(d, expect)


@pytest.mark.parametrize(
    ("layers", "runs", "why"),
    [
        ((0,), [Run(0, 31, 2)], "destination blocks 31..32 exceed the peer's 32"),
        ((0,), [Run(31, 0, 2)], "source blocks 31..32 exceed the 32 registered"),
        ((3,), [Run(0, 0, 1)], "layer 3 is outside the registered caches"),
        ((0, 1, 3), [Run(0, 0, 1)], "layer 3 is outside the registered caches"),  # (the valid ones neither)
        ((), [Run(0, 0, 1)], "no layers"),
        ((0,), [Run(0, 0, 1), Run(5, 100, 1)], "destination blocks 100..100"),
    ],
)
def test_out_of_range_is_refused_before_any_write(
    name: str, caches: tuple[HostKVCache, HostKVCache], layers: tuple[int, ...], runs: list[Run], why: str
) -> None:
    src, dst = caches
    cls = load(name)
    target, init = cls(CONFIG, dst.registration()), cls(CONFIG, src.registration())
    try:
        init.open_peer("peer", _peer_info(name, dst, target))
        done = init.post(9, "peer", layers, runs)
        assert done is not None and done.write_id == 9
        assert done.error is not None and "refused before writing" in done.error and why in done.error
        assert not dst.raw().any(), "nothing may be written, not even the valid first run"
    finally:
        init.close()
        target.close()


def _start_peer(name: str) -> tuple[subprocess.Popen[str], PeerInfo]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.peer_target", name],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "peer process did not start"
    info = decode(bytes.fromhex(line.strip()))
    assert isinstance(info, PeerInfo)
    return proc, info


@pytest.mark.parametrize("how", ["gone", "hung"])
def test_a_peer_that_goes_away_fails_the_write_with_a_reason_in_time(name: str, how: str) -> None:
    if how == "hung" and name == "shm":
        pytest.skip("shm writes are plain memory copies: there is no peer process that could hang them")
    src = HostKVCache.create(SHAPE)
    proc, info = _start_peer(name)
    init = load(name)(CONFIG, src.registration())
    segment = next(r.handle for r in info.regions)
    try:
        init.open_peer("peer", info)
        assert _wait(init, init.post(1, "peer", (0,), [Run(0, 0, 4)])).error is None
        if how == "hung":
            proc.send_signal(signal.SIGSTOP)
        elif name == "shm":
            proc.send_signal(signal.SIGTERM)  # the engine releases its cache
            proc.wait(30)
        else:
            proc.kill()  # the decode process dies
            proc.wait(30)
        started = time.monotonic()
        error = None
        for wid in range(2, 50):  # a disconnect may take a write or two to surface
            done = _wait(init, init.post(wid, "peer", (0,), [Run(0, 0, 4)]), timeout_s=CONFIG.write_timeout_s + 5)
            if done.error is not None:
                error = done.error
                break
        elapsed = time.monotonic() - started
        assert error is not None, "writes to a vanished peer kept succeeding"
        assert elapsed <= CONFIG.write_timeout_s + 1.0, f"took {elapsed:.1f}s"
        expected = {"shm": "is gone", "rdma": "hung" if how == "hung" else "write to peer failed"}[name]
        assert expected in error, error
    finally:
        init.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
        Path("/dev/shm", str(segment)).unlink(missing_ok=True)
        src.close()
        src.unlink()


def _wait_stopped(pid: int) -> None:
    """Return once the kernel reports child ``pid`` stopped: ``waitid`` blocks until it does (the
    test's own timeout bounds it), and leaves its exit status for ``Popen`` to collect later."""
    info = os.waitid(os.P_PID, pid, os.WSTOPPED)
    assert info is not None and info.si_code == os.CLD_STOPPED, info


def test_closing_a_peer_ends_its_writes_in_flight_as_failed_at_the_next_poll(name: str) -> None:
    if name == "shm":
        pytest.skip("shm writes this small finish before post returns (large ones: test_closing_a_peer_stops_its_...)")
    src = HostKVCache.create(SHAPE)
    proc, info = _start_peer(name)
    init = load(name)(replace(CONFIG, write_timeout_s=60.0), src.registration())
    segment = next(r.handle for r in info.regions)
    try:
        init.open_peer("peer", info)
        assert _wait(init, init.post(1, "peer", (0,), [Run(0, 0, 4)])).error is None
        proc.send_signal(signal.SIGSTOP)  # the peer hangs: writes stay in flight
        _wait_stopped(proc.pid)  # (the signal is delivered later than send_signal returns)
        inflight = [wid for wid in range(2, 6) if init.post(wid, "peer", (0,), [Run(0, 0, 4)]) is None]
        finished = {c.write_id for c in init.poll()}  # (once: what a poll returns it returns once)
        inflight = [w for w in inflight if w not in finished]
        assert inflight, "no write stayed in flight to a stopped peer"
        init.close_peer("peer")
        done = {c.write_id: c for c in init.poll()}
        assert set(inflight) <= set(done), f"writes {sorted(set(inflight) - set(done))} were never returned"
        assert all(done[w].error is not None and "closed" in done[w].error for w in inflight)
        assert init.pending() == 0
    finally:
        init.close()
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
        Path("/dev/shm", str(segment)).unlink(missing_ok=True)
        src.close()
        src.unlink()


def _resources() -> tuple[int, int, int]:
    """Native threads, mappings of /dev/shm files and open /dev/shm descriptors of this process."""
    threads = len(os.listdir("/proc/self/task"))
    maps = sum(1 for line in Path("/proc/self/maps").read_text().splitlines() if "/dev/shm/" in line)
    fds = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds += os.readlink(f"/proc/self/fd/{fd}").startswith("/dev/shm/")
        except OSError:
            continue
    return threads, maps, fds


def test_close_releases_everything(name: str, caches: tuple[HostKVCache, HostKVCache]) -> None:
    src, dst = caches
    cls = load(name)
    warm = cls(CONFIG, dst.registration())  # the first agent of a process loads libraries that stay
    warm.publish()
    warm.close()
    before = _resources()
    target, init = cls(CONFIG, dst.registration()), cls(CONFIG, src.registration())
    init.open_peer("peer", _peer_info(name, dst, target))
    _wait(init, init.post(1, "peer", (0,), [Run(0, 0, 8)]))
    during = _resources()
    init.close()
    target.close()
    del init, target
    after = _resources()
    assert during[1] > before[1], "the transports map the caches while open"
    assert after[1] == before[1], f"{after[1] - before[1]} mappings left"
    assert after[2] == before[2], f"{after[2] - before[2]} descriptors left"
    assert after[0] <= before[0], f"{after[0] - before[0]} native threads left running"


def test_rdma_listens_only_on_the_configured_interface(caches: tuple[HostKVCache, HostKVCache]) -> None:
    available("rdma")
    _, dst = caches
    target = load("rdma")(replace(CONFIG, rdma_interface="lo"), dst.registration())
    try:
        target.publish()
        inodes = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                link = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
        listening = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN, one of ours
                    listening.append(fields[1])
        assert listening, "expected UCX to listen for its peers"
        loopback = ("0100007F:", "00000000000000000000000001000000:")
        assert all(addr.startswith(loopback) for addr in listening), listening
    finally:
        target.close()


def test_a_packed_layout_moves_whole_blocks_of_k_and_v_together(name: str) -> None:
    """vLLM's CPU backend keeps K and V inside each block: one region per layer (``planes`` 1)."""
    shape = replace(SHAPE, kv_layout="packed")
    src, dst = HostKVCache.create(shape), HostKVCache.create(shape)
    cls = load(name)
    target = init = None
    try:
        assert src.registration().layout.planes == 1 and len(src.registration().regions) == shape.num_layers
        src.raw()[:] = np.random.default_rng(3).integers(0, 256, size=src.raw().shape, dtype=np.uint8)
        dst.raw()[:] = 0
        target, init = cls(CONFIG, dst.registration()), cls(CONFIG, src.registration())
        init.open_peer("peer", _peer_info(name, dst, target))
        runs = [Run(2, 7, 3), Run(20, 0, 1)]
        assert _wait(init, init.post(1, "peer", (2,), runs)) == Completion(1, transport=name, peer="peer")
        s, d = src.raw(), dst.raw()
        expect = np.zeros_like(d)
        for r in runs:
            expect[2, :, r.dst : r.dst + r.length] = s[2, :, r.src : r.src + r.length]
        assert np.array_equal(d, expect), "a packed block must land whole, and nothing else"
    finally:
        for t in (init, target):
            if t is not None:
                t.close()
        for c in (src, dst):
            c.close()
            c.unlink()


# -- shm: large writes a slice at a time -------------------------------------------------------


@contextlib.contextmanager
def _opened(src: HostKVCache, dst: HostKVCache) -> Iterator[Any]:
    """An shm transport over ``src`` with ``dst`` open as peer "peer" (and ``dst``'s own)."""
    from kvxferd.transports import shm

    target, init = shm.ShmTransport(CONFIG, dst.registration()), shm.ShmTransport(CONFIG, src.registration())
    try:
        init.open_peer("peer", _peer_info("shm", dst, target))
        yield init
    finally:
        init.close()
        target.close()


def test_a_large_shm_write_is_copied_a_slice_per_poll_and_small_ones_pass_it(
    caches: tuple[HostKVCache, HostKVCache], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above SLICE_BYTES a write is queued and each poll copies at most POLL_BYTES of it, so the
    loop reads between slices; a small write posted meanwhile completes at once, not behind it."""
    from kvxferd.transports import shm

    src, dst = caches
    with _opened(src, dst) as init:
        block = SHAPE.block_bytes
        monkeypatch.setattr(shm, "SLICE_BYTES", 3 * block)
        monkeypatch.setattr(shm, "POLL_BYTES", 3 * block)
        monkeypatch.setattr(shm, "POLL_S", 60.0)  # (the byte budget decides here)
        big = [Run(0, 0, 10), Run(12, 20, 4)]  # 2 layers x K,V x 14 blocks: 56 blocks, 19 polls of 3
        assert init.post(1, "peer", (1, 2), big) is None
        assert init.busy() and init.pending() == 1
        assert init.post(2, "peer", (0,), [Run(30, 30, 1)]) == Completion(2, transport="shm", peer="peer")
        polls, done = 0, []
        while not done:
            before = int(np.count_nonzero(dst.raw()[1:3]))
            done = init.poll()
            polls += 1
            grown = int(np.count_nonzero(dst.raw()[1:3])) - before
            assert grown <= 3 * block, "one poll copied more than its budget"  # (raw: bytes)
        assert done == [Completion(1, transport="shm", peer="peer")]
        assert polls == 19 and not init.busy() and init.pending() == 0
        s, d = src.raw(), dst.raw()
        expect = np.zeros_like(d)
        expect[0, :, 30:31] = s[0, :, 30:31]
        for layer, r in itertools.product((1, 2), big):
            expect[layer, :, r.dst : r.dst + r.length] = s[layer, :, r.src : r.src + r.length]
        assert np.array_equal(d, expect)


def test_closing_a_peer_stops_its_large_write_between_slices_and_fails_it(
    caches: tuple[HostKVCache, HostKVCache], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvxferd.transports import shm

    src, dst = caches
    with _opened(src, dst) as init:
        monkeypatch.setattr(shm, "SLICE_BYTES", SHAPE.block_bytes)
        monkeypatch.setattr(shm, "POLL_BYTES", SHAPE.block_bytes)
        monkeypatch.setattr(shm, "POLL_S", 60.0)
        assert init.post(4, "peer", (0,), [Run(0, 0, 8)]) is None
        assert init.poll() == []  # one block of K landed
        landed = dst.raw().copy()
        init.close_peer("peer")
        (done,) = init.poll()
        assert done.write_id == 4 and done.error is not None and "closed while" in done.error
        assert np.array_equal(dst.raw(), landed), "bytes landed after the write was given up"
        assert init.pending() == 0


def test_a_large_shm_write_whose_peer_removes_its_segment_meanwhile_fails(
    caches: tuple[HostKVCache, HostKVCache], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short write fails when the peer's segment is gone when it is posted; a large one, copied
    over several polls, is checked again once its last slice is in, so it is never reported
    written into a cache its engine has given up."""
    from kvxferd.transports import shm

    src, dst = caches
    with _opened(src, dst) as init:
        monkeypatch.setattr(shm, "SLICE_BYTES", SHAPE.block_bytes)
        monkeypatch.setattr(shm, "POLL_S", 0.0)
        init.interrupted = lambda: True  # one slice a poll
        assert init.post(1, "peer", (0,), [Run(0, 0, 16)]) is None
        assert init.poll() == []  # a slice in
        dst.unlink()
        done = _wait(init, None)
        assert done.write_id == 1 and done.error is not None and "was removed while it was copied" in done.error
        assert init.pending() == 0


def test_a_large_shm_write_goes_on_while_nothing_waits_and_stops_for_what_does(
    caches: tuple[HostKVCache, HostKVCache], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between slices poll asks its owner whether anything waits to be read: while nothing does it
    goes on (no turn of the loop per slice), and it returns as soon as something does."""
    from kvxferd.transports import shm

    src, dst = caches
    with _opened(src, dst) as init:
        monkeypatch.setattr(shm, "SLICE_BYTES", SHAPE.block_bytes)
        monkeypatch.setattr(shm, "POLL_S", 0.0)  # ask after every slice
        asked: list[bool] = []
        init.interrupted = lambda: asked.append(len(asked) >= 5) or asked[-1]
        assert init.post(1, "peer", (0,), [Run(0, 0, 16)]) is None  # 2 x 16 blocks: 32 slices
        assert init.poll() == []  # stopped once something waited: after the 6th slice
        assert len(asked) == 6 and asked[-1]
        init.interrupted = lambda: False
        assert [c.write_id for c in init.poll()] == [1]  # nothing waits: the rest in one call
        assert np.array_equal(dst.raw()[0, :, :16], src.raw()[0, :, :16])


def test_a_large_shm_write_lands_no_more_once_cancelled_or_once_its_process_was_stopped(
    caches: tuple[HostKVCache, HostKVCache], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poll that finds two slices far apart (the process was stopped) returns before the next
    one, so the daemon's fence can cancel: every queued write then fails and lands nothing more."""
    from kvxferd.transports import shm

    src, dst = caches
    with _opened(src, dst) as init:
        monkeypatch.setattr(shm, "SLICE_BYTES", SHAPE.block_bytes)
        init.interrupted = lambda: False
        assert init.post(1, "peer", (0,), [Run(0, 0, 16)]) is None
        clock = iter([0.0, 0.0, 5.0])  # the start, one slice, then a slice 5 s later: stopped
        monkeypatch.setattr(shm.time, "monotonic", lambda: next(clock, 10.0))
        assert init.poll() == []
        landed = dst.raw().copy()
        assert int(np.count_nonzero(landed[0])) <= 2 * SHAPE.block_bytes  # two slices, no more
        init.cancel("the rank was stopped")
        (done,) = init.poll()
        assert done.write_id == 1 and done.error == "the rank was stopped"
        assert np.array_equal(dst.raw(), landed) and init.pending() == 0
