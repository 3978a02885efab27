"""A prefill rank that did not run for 3 heartbeats writes nothing it held, wherever it stopped.

The barrier service counts a rank it has not heard from for 3 heartbeats as stopped, ends the
rounds waiting for it and tells its decode rank those requests failed; the engine may reuse the
blocks at once. So a rank back from such a stop must stop writing what it holds before it writes
anything, whatever line it was on when the process stopped: inside ``poll`` (the common case), or
anywhere else in its loop, for instance about to send its heartbeat (after which the barrier
service hears it again, and nothing in the loop looks late any more).

SIGSTOP cannot choose the line, so the services run in threads (:mod:`tests.threads`) and the
prefill daemon's heartbeat is made to block, which is what a stop on that line looks like to the
rest of the group: its messages queue in its socket, the barrier service hears nothing.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from kvxferd.client import DecodeEngine, PrefillScheduler, PrefillWorker, credentials, status
from kvxferd.config import Config
from kvxferd.kvcache import HostKVCache, KVShape
from kvxferd.protocol import CacheInfo, SlotChunk, Status
from kvxferd.runtime.barrier import BarrierService
from kvxferd.runtime.decode import DecodeDaemon
from kvxferd.runtime.prefill import PrefillDaemon
from tests.threads import Running, engines, run_dir

ONE_BY_ONE = """
groups:
  - {name: prefill, role: prefill, world_size: 1, endpoint: "ipc://{run_dir}/p-{rank}.sock", memory: host}
  - {name: decode, role: decode, world_size: 1, endpoint: "ipc://{run_dir}/d-{rank}.sock", memory: host}
kv: {num_layers: 4, kv_heads: 2, head_dim: 16, block_tokens: 4, num_blocks: 16, dtype: float32}
timeouts: {pending_s: 20, progress_s: 20, verdict_s: 40, peer_s: 10, startup_s: 20, shutdown_s: 2,
           heartbeat_s: 0.25}
"""


@dataclass
class Group:
    """A barrier service, one prefill and one decode rank in threads, with their engines; ``thaw``
    ends whatever stop a test puts the prefill daemon in."""

    config: Config
    prefill: PrefillDaemon
    dec: DecodeEngine
    worker: PrefillWorker
    sched: PrefillScheduler
    src: HostKVCache
    dst: HostKVCache
    thaw: threading.Event
    frozen: threading.Event

    def submit(self, src: tuple[int, ...], dst: tuple[int, ...]) -> None:
        """Request "r" of ``src`` into ``dst``, and its layer-0 signal."""
        tokens = 4 * len(src)
        decode = self.config.group(role="decode").name
        self.sched.submit(CacheInfo("r", 0, 1, tokens, src, dst, decode, dst_generations=self.dec.generations))
        self.worker.layer_ready(1, 0, [SlotChunk(0, 0, tokens, 1)])


@contextlib.contextmanager
def one_by_one() -> Iterator[Group]:
    """The deployment of ONE_BY_ONE running, its source cache all 7s; every service must stop cleanly."""
    with run_dir(ONE_BY_ONE) as config:
        pgroup, dgroup = config.group(role="prefill"), config.group(role="decode")
        prefill = PrefillDaemon(config, pgroup, 0)
        services = [Running(BarrierService(config)), Running(prefill), Running(DecodeDaemon(config, dgroup, 0))]
        shape = KVShape.from_config(config, 1)
        src, dst = HostKVCache.create(shape), HostKVCache.create(shape)
        clients: list = []
        thaw = threading.Event()
        try:
            dec, worker, sched = engines(config, clients)
            dec.register([dst])
            worker.register(src)
            src.raw()[...] = 7
            yield Group(config, prefill, dec, worker, sched, src, dst, thaw, threading.Event())
        finally:
            thaw.set()
            for client in clients:
                client.close()
            codes = [s.stop() for s in services]
            for cache in (src, dst):
                cache.close()
                cache.unlink()
        assert codes == [0, 0, 0]


def test_a_rank_stopped_just_before_its_heartbeat_writes_nothing_into_blocks_decode_may_reuse() -> None:
    with one_by_one() as g:
        prefill, dst, thaw, frozen = g.prefill, g.dst, g.thaw, g.frozen
        creds, endpoint = credentials(g.config), g.config.endpoint(g.config.group(role="prefill"), 0)
        g.submit((1,), (2,))

        def tables() -> dict:  # a status round trip: each one is a turn of the daemon's loop
            return json.loads(status(endpoint, credentials=creds).report)["tables"]

        deadline = time.monotonic() + 10
        while not np.all(dst.raw()[0, :, 2] == 7):  # layer 0 landed: the request is writing
            assert time.monotonic() < deadline, "layer 0 never landed"
            tables()

        hello = prefill.barrier.hello

        def stopped_here() -> None:  # the process stops on the line that sends its heartbeat
            frozen.set()
            assert thaw.wait(30), "never thawed"
            hello()

        prefill.barrier.hello = stopped_here  # type: ignore[method-assign]
        assert frozen.wait(5), "no heartbeat within 5 s"
        for layer in range(1, 4):  # the rest of its signals wait in its socket
            g.worker.layer_ready(1, layer)
        told = g.dec.wait("r", 10.0)  # the barrier service counts the rank stopped
        assert told.reusable and not told.ready, told
        dst.raw()[:, :, 2] = 99  # the engine reuses the block
        prefill.barrier.hello = hello  # type: ignore[method-assign]
        thaw.set()
        outcome = g.sched.wait("r", 10.0)
        assert outcome.status is Status.FAILED, outcome
        deadline = time.monotonic() + 10
        while tables()["requests"]:
            assert time.monotonic() < deadline, "the request stayed in the prefill rank's table"
        assert np.all(dst.raw()[:, :, 2] == 99), "the rank wrote into a block its decode rank was told is free"


def test_a_rank_stopped_between_two_slices_of_a_large_copy_copies_no_more_of_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """shm copies a large write a slice per step of its poll; a process stopped between two of them
    (here: frozen where the poll asks whether anything waits) must not copy the next one once it
    runs again, when its decode rank may have been told the request failed: the poll sees the gap
    and returns, the fence cancels what is queued, and the block the engine reused stays its own."""
    from kvxferd.transports import shm

    monkeypatch.setattr(shm, "SLICE_BYTES", 1)  # (at least a block: one block a slice)
    monkeypatch.setattr(shm, "POLL_S", 0.0)  # ask after every slice
    with one_by_one() as g:
        thaw, frozen, dst = g.thaw, g.frozen, g.dst
        copier = g.prefill.peers.transports["shm"]
        asked = copier.interrupted

        def stopped_here() -> bool:  # the process stops between two slices of layer 0's copy
            frozen.set()
            assert thaw.wait(30), "never thawed"
            return asked() if asked is not None else False

        copier.interrupted = stopped_here
        g.submit((1, 2, 3, 4), (2, 3, 4, 5))
        assert frozen.wait(10), "layer 0 was not copied in slices"
        told = g.dec.wait("r", 10.0)  # the barrier service counts the rank stopped
        assert told.reusable and not told.ready, told
        dst.raw()[:, :, 2:6] = 99  # the engine reuses the blocks
        copier.interrupted = asked
        thaw.set()
        outcome = g.sched.wait("r", 10.0)
        assert outcome.status is Status.FAILED, outcome
        assert np.all(dst.raw()[:, :, 2:6] == 99), "the rank copied into blocks its decode rank was told are free"
