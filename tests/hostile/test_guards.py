"""Guarded handlers: one message that makes a handler raise costs that message only; a core
that raises (a broken invariant) fails every request in flight, then its daemon exits non-zero.

Nothing outside the process can make a correct handler raise on purpose, so these tests run
the real services in threads (:mod:`tests.threads`) and break a method of theirs.
"""

from __future__ import annotations

import json
import time

import pytest
import zmq

from kvxferd import security
from kvxferd.client import credentials, status
from kvxferd.config import Config
from kvxferd.kvcache import HostKVCache, KVShape
from kvxferd.protocol import CacheInfo, Error, ErrorCode, Hello, SlotChunk, Status, StatusQuery, decode, encode
from kvxferd.runtime.barrier import BarrierService
from kvxferd.runtime.decode import DecodeDaemon
from kvxferd.runtime.guard import unguarded
from kvxferd.runtime.prefill import PrefillDaemon
from kvxferd.runtime.service import BROKEN_EXIT
from tests.threads import Running, engines, ready, run_dir

ONE_BY_ONE = """
groups:
  - {name: prefill, role: prefill, world_size: 1, endpoint: "ipc://{run_dir}/p-{rank}.sock", memory: host}
  - {name: decode, role: decode, world_size: 1, endpoint: "ipc://{run_dir}/d-{rank}.sock", memory: host}
kv: {num_layers: 2, kv_heads: 2, head_dim: 16, block_tokens: 4, num_blocks: 16, dtype: float32}
timeouts: {pending_s: 20, progress_s: 20, verdict_s: 40, peer_s: 10, startup_s: 20, shutdown_s: 2}
"""


def ask(config: Config, endpoint: str, frame: bytes, identity: bytes = b"") -> object:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    security.credentials(config, "daemon").client(sock)
    sock.setsockopt(zmq.LINGER, 0)
    if identity:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(endpoint)
    try:
        sock.send(frame)
        assert sock.poll(10_000), "no answer within 10 s"
        return decode(sock.recv())
    finally:
        sock.close()


def test_a_handler_that_raises_costs_one_message_and_is_answered_as_internal() -> None:
    with run_dir(ONE_BY_ONE) as config:
        service = BarrierService(config)
        real = service._apply

        def flaky(effects: list, sender: bytes | None) -> None:  # the shell, not the core, fails
            if sender == b"boom:0":
                raise RuntimeError("x" * 10_000)  # a long text, too: the answer must still be built
            real(effects, sender)

        service._apply = flaky  # type: ignore[method-assign]
        running = Running(service)
        endpoint = config.barrier_endpoint()
        ready(config, endpoint)
        answer = ask(config, endpoint, encode(Hello("boom", 0, 1, "prefill")), b"boom:0")
        assert isinstance(answer, Error) and answer.code is ErrorCode.INTERNAL
        assert "RuntimeError" in answer.detail and len(answer.detail) < 1024
        # still serving, for the same kind of message from someone else
        assert not isinstance(ask(config, endpoint, encode(Hello("fine", 0, 1, "prefill")), b"fine:0"), Error)
        assert ask(config, endpoint, encode(StatusQuery())) is not None
        assert running.stop() == 0


def test_a_core_that_raises_fails_every_request_in_flight_then_exits_non_zero() -> None:
    with run_dir(ONE_BY_ONE) as config:
        pgroup, dgroup = config.group(role="prefill"), config.group(role="decode")
        barrier = Running(BarrierService(config))
        prefill = PrefillDaemon(config, pgroup, 0)
        services = [barrier, Running(prefill), Running(DecodeDaemon(config, dgroup, 0))]
        shape = KVShape.from_config(config, 1)
        caches = [HostKVCache.create(shape), HostKVCache.create(shape)]
        clients: list = []
        try:
            dec, worker, sched = engines(config, clients)
            creds = credentials(config)
            dec.register([caches[1]])
            worker.register(caches[0])
            peer = dgroup.name
            sched.submit(CacheInfo("in-flight", 0, 1, 4, (1,), (2,), peer))  # waits for its layer-0 signal
            for _ in range(100):  # the readiness of the request: in the prefill rank's table
                if json.loads(status(config.endpoint(pgroup, 0), credentials=creds).report)["tables"]["requests"] == 1:
                    break
            else:
                raise AssertionError("the cache_info never reached the request table")
            core = unguarded(prefill.core)

            def broken(msg: object, now: float) -> list:
                raise AssertionError("pending table out of step with the request table")

            core.handle = broken  # type: ignore[method-assign]
            # the first layer signal is handled by a broken core
            worker.layer_ready(1, 0, [SlotChunk(0, 0, 4, 1)])
            outcome = sched.wait("in-flight", 10.0)
            assert outcome.status is Status.FAILED
            (result,) = outcome.results.values()
            assert "internal error" in result.reason and "pending table" in result.reason
            told = dec.wait("in-flight", 10.0)
            assert told.decided and not told.ready
            assert services[1].wait() == BROKEN_EXIT
        finally:
            for client in clients:
                client.close()
            codes = [s.stop() for s in services]
            for cache in caches:
                cache.close()
                cache.unlink()
        assert codes[0] == 0 and codes[2] == 0


@pytest.mark.parametrize(("times", "code"), [(1, 0), (2, 0), (3, BROKEN_EXIT)])
def test_timers_that_raise_now_and_then_are_survived_but_not_forever(times: int, code: int) -> None:
    with run_dir(ONE_BY_ONE) as config:
        service = BarrierService(config)
        left = [times]
        real_tick, real_wakeup = service.tick, service.next_wakeup

        def flaky_tick(now: float) -> None:  # a shell's timer work (transports, links), not the core
            if left[0]:
                left[0] -= 1
                raise OSError("a passing failure")
            real_tick(now)

        service.tick = flaky_tick  # type: ignore[method-assign]
        # due now while the failures last (not "at time 0": a loop that far past its deadline takes
        # itself for a stopped process and reads all that waits before it runs its timers)
        service.next_wakeup = lambda: time.monotonic() if left[0] else real_wakeup()  # type: ignore[method-assign]
        running = Running(service)
        if code == 0:
            ready(config, config.barrier_endpoint())
            # a turn of the loop reads, then runs its timers: each query answered is one more turn
            for _ in range(times):
                if left[0]:
                    ready(config, config.barrier_endpoint())
            assert left == [0]
            assert running.stop() == 0
        else:
            assert running.wait() == code  # exits by itself
