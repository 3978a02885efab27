"""Attacks through real daemons: a 2+2 deployment, raw zmq sockets for the attacker, and the
checks every hostile test ends with: every daemon alive, and a legitimate request still moves
verified bytes.

The attacker's socket (:class:`Probe`) speaks raw frames, so it can send what no client would.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq

from kvxferd import security
from kvxferd.client import status
from kvxferd.protocol import CacheInfo, Message, SlotChunk, decode, encode
from kvxferd.security import Credentials
from tests.integration.conftest import SMALL, Deployment, deploy, fill

HOSTILE = SMALL + "barrier: {timeout_s: 5, max_keys: 64}\n"
ANSWER_S = 10.0  # a daemon that answers does so well within this; one that must not answer is given as long


class Probe:
    """A raw DEALER an attacker holds (see :func:`probe`)."""

    def __init__(self, endpoint: str, *, credentials: Credentials | None, identity: bytes | None = None) -> None:
        """``credentials``: the keys the attacker holds (None: an outsider, without the secret)."""
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        if credentials is not None:
            credentials.client(self.sock)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, 5000)
        if identity is not None:
            self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.connect(endpoint)

    def send(self, what: Message | bytes | list[bytes]) -> None:
        if isinstance(what, Message):
            self.sock.send(encode(what))
        elif isinstance(what, list):
            self.sock.send_multipart(what)
        else:
            self.sock.send(what)

    def recv(self, timeout_s: float = ANSWER_S) -> Message | None:
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        return decode(self.sock.recv(), max_bytes=64 << 20)

    def ask(self, what: Message | bytes, timeout_s: float = ANSWER_S) -> Message:
        self.send(what)
        answer = self.recv(timeout_s)
        assert answer is not None, f"no answer within {timeout_s}s"
        return answer

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def probes() -> Iterator[Any]:
    made: list[Probe] = []

    def make(endpoint: str, **kwargs: Any) -> Probe:
        made.append(Probe(endpoint, **kwargs))
        return made[-1]

    yield make
    for p in made:
        p.close()


class Hostile(Deployment):
    """A deployment with the checks the attacks end with."""

    steps = itertools.count(1)

    def endpoints(self) -> list[str]:
        return [
            self.config.barrier_endpoint(),
            *(self.config.endpoint(g, r) for g in self.config.groups for r in range(g.world_size)),
        ]

    def alive(self) -> None:
        """Every daemon process runs and answers a status query."""
        for daemon in self.cluster.daemons:
            assert daemon.popen.poll() is None, f"{daemon.name} exited with {daemon.popen.returncode}"
        daemon = security.credentials(self.config, "daemon")
        for endpoint in self.endpoints():
            creds = daemon if endpoint == self.config.barrier_endpoint() else self.creds
            assert status(endpoint, ANSWER_S, credentials=creds).state == "serving", endpoint

    def legit(self, rid: str) -> None:
        """One request, end to end: every rank ok, decode ready, the bytes in decode's blocks."""
        assert self.sched is not None and self.dec is not None
        step = next(self.steps)
        src, dst = [1, 2], [40 + step % 20, 10]
        for r, cache in enumerate(self.pcaches):
            fill(cache, src, seed=1000 * step + r)
        self.sched.submit(CacheInfo(rid, 0, step, 8, tuple(src), tuple(dst), self.peer))
        for worker in self.workers:
            for layer in range(self.config.kv.num_layers):
                worker.layer_ready(step, layer, (SlotChunk(0, 0, 8, step),) if layer == 0 else ())
        outcome = self.sched.wait(rid, ANSWER_S)
        assert outcome.ok, outcome.results
        assert self.dec.wait(rid, ANSWER_S).ready
        for r in range(self.prefill.world_size):
            p, d = self.pcaches[r].raw(), self.dcaches[r].raw()
            assert np.array_equal(p[:, :, src], d[:, :, dst]), f"rank {r}: decode blocks differ"

    def still_fine(self, rid: str) -> None:
        self.alive()
        self.legit(rid)


@pytest.fixture
def dep() -> Iterator[Hostile]:
    with deploy(HOSTILE, kind=Hostile) as d:
        assert isinstance(d, Hostile)
        d.steps = itertools.count(1)
        yield d
