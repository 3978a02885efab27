"""Notices a decode daemon takes from prefill ranks: confirmed, and told to the engine once.

A prefill group of the config is *played* here by a raw DEALER holding the daemon keys and the
identity ``played:0``, so it can send one notice several times, as a prefill daemon does when a
decode daemon's connection comes back before it confirmed what it had been sent.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq

from kvxferd import security
from kvxferd.protocol import KVReady, Message, PeerInfo, PeerQuery, Received, Status, TransferResult, decode, encode
from tests.integration.conftest import SMALL, Deployment, deploy

PLAYED = (
    SMALL
    + """
groups:
  - {name: prefill, role: prefill, world_size: 2, endpoint: "ipc://{run_dir}/p-{rank}.sock", memory: host}
  - {name: played, role: prefill, world_size: 2, endpoint: "ipc://{run_dir}/x-{rank}.sock", memory: host}
  - {name: decode, role: decode, world_size: 2, endpoint: "ipc://{run_dir}/d-{rank}.sock", memory: host}
"""
)
ANSWER_S = 10.0


class Played(Deployment):
    skip = frozenset({"played"})


class PlayedPrefill:
    """Rank 0 of the group ``played``, talking to decode rank 0's peer socket."""

    def __init__(self, dep: Deployment) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        security.credentials(dep.config, "daemon").client(self.sock)
        self.sock.setsockopt(zmq.IDENTITY, b"played:0")
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(dep.config.peer_endpoint(dep.decode, 0))

    def send(self, msg: Message) -> None:
        self.sock.send(encode(msg))

    def recv(self) -> Message:
        assert self.sock.poll(int(ANSWER_S * 1000)), f"no answer within {ANSWER_S}s"
        return decode(self.sock.recv())

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def played() -> Iterator[tuple[Deployment, PlayedPrefill]]:
    with deploy(PLAYED, kind=Played) as dep:
        peer = PlayedPrefill(dep)
        try:
            yield dep, peer
        finally:
            peer.close()


def test_a_repeated_notice_is_confirmed_each_time_and_told_to_the_engine_once(played) -> None:
    dep, peer = played
    assert dep.dec is not None
    peer.send(PeerQuery("played", 0))
    info = peer.recv()
    assert isinstance(info, PeerInfo)
    notices: list[KVReady | TransferResult] = [
        KVReady("twice-ready", rank=0, bytes=64, generation=info.generation),
        TransferResult("twice-failed", Status.FAILED, "played failure", rank=0),
    ]
    for notice in notices:
        for _ in range(3):
            peer.send(notice)
            confirmed = peer.recv()
            # confirmed as the engine was told: the failure with its reason, the KVReady as ok
            said = (notice.status, notice.reason) if isinstance(notice, TransferResult) else (Status.OK, "")
            assert confirmed == Received(notice.request_id, 0, notice.instance, *said), confirmed
    dep.wait_until(
        "the engine to hear both notices", lambda: all(dep.dec.outcome(n.request_id) for n in notices), ANSWER_S
    )
    dep.dec.collect(0.2)  # the engine heard each once: a second copy (sent before its confirmation) shows here
    for notice in notices:
        out = dep.dec.outcome(notice.request_id)
        assert out is not None and out.reported == {0} and not out.duplicates, out
    assert dep.status(0, "decode")["counters"]["notice_repeated"] == 4
