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

import json
import threading
import time

import numpy as np
import pytest

from kvxferd.client import credentials, status
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


def test_a_rank_stopped_just_before_its_heartbeat_writes_nothing_into_blocks_decode_may_reuse() -> None:
    with run_dir(ONE_BY_ONE) as config:
        pgroup, dgroup = config.group(role="prefill"), config.group(role="decode")
        prefill = PrefillDaemon(config, pgroup, 0)
        services = [Running(BarrierService(config)), Running(prefill), Running(DecodeDaemon(config, dgroup, 0))]
        shape = KVShape.from_config(config, 1)
        src, dst = HostKVCache.create(shape), HostKVCache.create(shape)
        clients: list = []
        thaw, frozen = threading.Event(), threading.Event()
        try:
            dec, worker, sched = engines(config, clients)
            creds = credentials(config)
            dec.register([dst])
            worker.register(src)
            src.raw()[...] = 7
            sched.submit(CacheInfo("r", 0, 1, 4, (1,), (2,), dgroup.name, dst_generations=dec.generations))
            worker.layer_ready(1, 0, [SlotChunk(0, 0, 4, 1)])

            def tables() -> dict:  # a status round trip: each one is a turn of the daemon's loop
                return json.loads(status(config.endpoint(pgroup, 0), credentials=creds).report)["tables"]

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
                worker.layer_ready(1, layer)
            told = dec.wait("r", 10.0)  # the barrier service counts the rank stopped
            assert told.reusable and not told.ready, told
            dst.raw()[:, :, 2] = 99  # the engine reuses the block
            prefill.barrier.hello = hello  # type: ignore[method-assign]
            thaw.set()
            outcome = sched.wait("r", 10.0)
            assert outcome.status is Status.FAILED, outcome
            deadline = time.monotonic() + 10
            while tables()["requests"]:
                assert time.monotonic() < deadline, "the request stayed in the prefill rank's table"
            assert np.all(dst.raw()[:, :, 2] == 99), "the rank wrote into a block its decode rank was told is free"
        finally:
            thaw.set()
            for client in clients:
                client.close()
            codes = [s.stop() for s in services]
            for cache in (src, dst):
                cache.close()
                cache.unlink()
        assert codes == [0, 0, 0]


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
    with run_dir(ONE_BY_ONE) as config:
        pgroup, dgroup = config.group(role="prefill"), config.group(role="decode")
        prefill = PrefillDaemon(config, pgroup, 0)
        services = [Running(BarrierService(config)), Running(prefill), Running(DecodeDaemon(config, dgroup, 0))]
        shape = KVShape.from_config(config, 1)
        src, dst = HostKVCache.create(shape), HostKVCache.create(shape)
        clients: list = []
        thaw, frozen = threading.Event(), threading.Event()
        try:
            dec, worker, sched = engines(config, clients)
            dec.register([dst])
            worker.register(src)
            src.raw()[...] = 7
            copier = prefill.peers.transports["shm"]
            asked = copier.interrupted

            def stopped_here() -> bool:  # the process stops between two slices of layer 0's copy
                frozen.set()
                assert thaw.wait(30), "never thawed"
                return asked() if asked is not None else False

            copier.interrupted = stopped_here
            blocks = (1, 2, 3, 4)
            sched.submit(CacheInfo("r", 0, 1, 16, blocks, (2, 3, 4, 5), dgroup.name, dst_generations=dec.generations))
            worker.layer_ready(1, 0, [SlotChunk(0, 0, 16, 1)])
            assert frozen.wait(10), "layer 0 was not copied in slices"
            told = dec.wait("r", 10.0)  # the barrier service counts the rank stopped
            assert told.reusable and not told.ready, told
            dst.raw()[:, :, 2:6] = 99  # the engine reuses the blocks
            copier.interrupted = asked
            thaw.set()
            outcome = sched.wait("r", 10.0)
            assert outcome.status is Status.FAILED, outcome
            assert np.all(dst.raw()[:, :, 2:6] == 99), "the rank copied into blocks its decode rank was told are free"
        finally:
            thaw.set()
            for client in clients:
                client.close()
            codes = [s.stop() for s in services]
            for cache in (src, dst):
                cache.close()
                cache.unlink()
        assert codes == [0, 0, 0]
