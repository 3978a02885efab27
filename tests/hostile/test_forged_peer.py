"""A decode endpoint that lies: PeerInfo answers that do not describe a decode cache are refused
before prefill writes a byte.

The liars hold the daemon keys (they stand for a decode daemon gone wrong, or a process that took
over its endpoint): outsiders never get this far (``test_trust``). Two decode groups of the config
are played by raw ROUTER sockets answering every PeerQuery: ``liar`` describes a cache of another
shape, ``mirror`` names the asking prefill rank's own source segments, the right shape. Every
request to them fails on every rank with a reason, no cache changes, and the real decode group is
still served.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from kvxferd import security
from kvxferd.protocol import CacheInfo, CacheLayout, Message, PeerInfo, PeerQuery, SlotChunk, Status, decode, encode
from kvxferd.runtime.peers import host_id
from tests.hostile.conftest import ANSWER_S, HOSTILE, Hostile
from tests.integration.conftest import deploy, fill

LIARS = (
    HOSTILE
    + """
groups:
  - {name: prefill, role: prefill, world_size: 2, endpoint: "ipc://{run_dir}/p-{rank}.sock", memory: host}
  - {name: decode, role: decode, world_size: 2, endpoint: "ipc://{run_dir}/d-{rank}.sock", memory: host}
  - {name: liar, role: decode, world_size: 2, endpoint: "ipc://{run_dir}/l-{rank}.sock", memory: host}
  - {name: mirror, role: decode, world_size: 2, endpoint: "ipc://{run_dir}/m-{rank}.sock", memory: host}
"""
)


class Liars(Hostile):
    skip = frozenset({"liar", "mirror"})

    def endpoints(self) -> list[str]:
        played = {self.config.endpoint(self.config.group(g), r) for g in self.skip for r in range(2)}
        return [e for e in super().endpoints() if e not in played]


class LyingPeer:
    """Raw ROUTERs at a decode group's peer endpoints, each PeerQuery answered by ``answer``."""

    def __init__(self, dep: Liars, group: str, answer: Callable[[PeerQuery], Message]) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        creds = security.credentials(dep.config, "daemon")
        self.auth = security.authenticator(self.ctx, creds)
        self.socks = []
        self.paths: list[Path] = []  # the socket files this test binds, removed at close
        g = dep.config.group(group)
        for rank in range(g.world_size):
            sock = self.ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            creds.server(sock, "peer")
            endpoint = dep.config.peer_endpoint(g, rank)
            sock.bind(endpoint)
            self.socks.append(sock)
            self.paths.append(Path(endpoint.removeprefix("ipc://")))
        self.answer = answer
        self.queries: list[PeerQuery] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        for sock in self.socks:
            poller.register(sock, zmq.POLLIN)
        while not self.stop.is_set():
            for sock, _ in poller.poll(50):
                identity, frame = sock.recv_multipart()
                msg = decode(frame, max_bytes=1 << 20)
                if isinstance(msg, PeerQuery):
                    self.queries.append(msg)
                    sock.send_multipart([identity, encode(self.answer(msg))])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for sock in self.socks:
            sock.close()
        self.auth.stop()  # type: ignore[attr-defined]
        self.ctx.term()
        for path in self.paths:
            path.unlink(missing_ok=True)


@pytest.fixture
def dep() -> Iterator[Liars]:
    with deploy(LIARS, kind=Liars) as d:
        assert isinstance(d, Liars)
        yield d


def _request(dep: Liars, rid: str, peer: str) -> tuple[Status, list[str]]:
    """One request to ``peer``, every layer signalled; its status and every rank's reason."""
    assert dep.sched is not None
    step = next(dep.steps)
    for r, cache in enumerate(dep.pcaches):
        fill(cache, [1, 2], seed=step * 10 + r)
    dep.sched.submit(CacheInfo(rid, 0, step, 8, (1, 2), (5, 6), peer))
    for worker in dep.workers:
        for layer in range(dep.config.kv.num_layers):
            worker.layer_ready(step, layer, (SlotChunk(0, 0, 8, step),) if layer == 0 else ())
    out = dep.sched.wait(rid, ANSWER_S)
    return out.status, [r.reason for r in out.results.values()]


def test_peer_info_of_another_shape_is_refused_and_nothing_is_written(dep: Liars) -> None:
    def answer(q: PeerQuery) -> Message:
        reg = dep.dcaches[q.rank].registration()
        wrong = dataclasses.replace(reg.layout, num_blocks=reg.layout.num_blocks // 2)
        assert isinstance(wrong, CacheLayout)
        return PeerInfo("liar", q.rank, host_id(), "host", wrong, reg.regions, {})

    before = [c.raw().copy() for c in dep.dcaches]
    liar = LyingPeer(dep, "liar", answer)
    try:
        status, reasons = _request(dep, "to-liar", "liar")
    finally:
        liar.close()
    assert liar.queries, "prefill never asked the liar"
    assert status is Status.FAILED
    assert all("the config describes" in r for r in reasons), reasons
    for cache, old in zip(dep.dcaches, before, strict=True):
        assert np.array_equal(cache.raw(), old), "a lie about the shape moved bytes"
    dep.still_fine("after-liar")


def test_peer_info_naming_prefills_own_cache_is_refused_and_the_source_is_untouched(dep: Liars) -> None:
    def answer(q: PeerQuery) -> Message:
        reg = dep.pcaches[q.rank].registration()  # the asking rank's own source cache, exact shape
        return PeerInfo("mirror", q.rank, host_id(), "host", reg.layout, reg.regions, {})

    mirror = LyingPeer(dep, "mirror", answer)
    try:
        assert dep.sched is not None
        step = next(dep.steps)
        for r, cache in enumerate(dep.pcaches):
            fill(cache, [1, 2, 5, 6], seed=step * 10 + r)
        before = [c.raw().copy() for c in dep.pcaches]
        dep.sched.submit(CacheInfo("to-mirror", 0, step, 8, (1, 2), (5, 6), "mirror"))
        for worker in dep.workers:
            for layer in range(dep.config.kv.num_layers):
                worker.layer_ready(step, layer, (SlotChunk(0, 0, 8, step),) if layer == 0 else ())
        out = dep.sched.wait("to-mirror", ANSWER_S)
    finally:
        mirror.close()
    assert mirror.queries, "prefill never asked the mirror"
    assert out.status is Status.FAILED
    reasons = [r.reason for r in out.results.values()]
    assert all("own cache" in r for r in reasons), reasons
    for cache, old in zip(dep.pcaches, before, strict=True):
        assert np.array_equal(cache.raw(), old), "prefill wrote into its own source cache"
    dep.still_fine("after-mirror")
