"""A prefill rank's link to a decode rank comes back by itself (issue 23, item 20): a decode peer
that sent one oversize frame ended the connection, libzmq did not reconnect a session it ended on a
protocol error, and every write to that decode rank failed at once ("is gone") for good, also once
the peer behaved again, until the prefill daemon restarted.

Driven through the real shell (``Peers`` over a real ``Service``'s poller) against a raw ROUTER with
the daemon keys standing for the decode daemon.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import zmq

from kvxferd import security
from kvxferd.config import loads
from kvxferd.protocol import CacheLayout, PeerInfo, PeerQuery, Region, decode, encode
from kvxferd.runtime.peers import Peers, host_id
from kvxferd.runtime.service import Service
from kvxferd.runtime.sockets import ENVELOPE

CONFIG = """
run_dir: {run_dir}
groups:
  - {{name: prefill, role: prefill, world_size: 1, endpoint: "ipc://{{run_dir}}/p-{{rank}}.sock", memory: host}}
  - {{name: decode, role: decode, world_size: 1, endpoint: "ipc://{{run_dir}}/d-{{rank}}.sock", memory: host}}
kv: {{num_layers: 2, kv_heads: 2, head_dim: 16, block_tokens: 4, num_blocks: 8, dtype: float32}}
"""


class Rig:
    """A prefill rank's ``Peers`` over a real ``Service``'s poller, and a raw ROUTER with the daemon
    keys standing for decode rank 0; every PeerQuery the ROUTER takes is kept (when, from whom)."""

    def __init__(self, tmp_path: Path, extra: str = "") -> None:
        self.config = config = loads(CONFIG.format(run_dir=tmp_path) + extra)
        creds = security.credentials(config, "daemon")
        self.service = Service(shutdown_s=1.0, max_frame=config.limits.max_frame_bytes, queue=16, creds=creds)
        self.peers = Peers(self.service, config, group="prefill", rank=0, memory="host")
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.auth = security.authenticator(self.ctx, creds)
        self.peer = self.ctx.socket(zmq.ROUTER)
        self.peer.setsockopt(zmq.LINGER, 0)
        creds.server(self.peer, "peer")
        self.peer.bind(config.peer_endpoint(config.group("decode"), 0))
        kv = config.kv
        layout = CacheLayout(kv.num_layers, kv.num_blocks, kv.block_bytes(1), kv.planes)
        regions = tuple(
            Region(layer, k, "kvx-peer", (2 * layer + k) * layout.region_bytes) for layer in range(2) for k in (0, 1)
        )
        self.info = PeerInfo("decode", 0, host_id(), "host", layout, regions, {}, "g2")
        self.queries: list[tuple[float, bytes]] = []

    def pump(self, what: str, done: Callable[[], bool], timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            for sock, _ in self.service.poller.poll(20):
                self.service._handlers[sock]()
            now = time.monotonic()
            self.peers.handle_answers(now)
            self.peers.tick(now)
            while self.peer.poll(0):
                identity, frame = self.peer.recv_multipart()
                if isinstance(decode(frame), PeerQuery):
                    self.queries.append((time.monotonic(), identity))

    def answer(self, frame: bytes) -> None:
        """Send ``frame`` to whoever asked last."""
        self.peer.send_multipart([self.queries[-1][1], frame])

    def close(self) -> None:
        self.peers.close()
        self.service.shutdown_sockets()
        self.peer.close()
        self.auth.stop()
        self.ctx.term()


def test_a_link_ended_by_an_oversize_frame_comes_back_by_itself_and_asks_before_it_writes(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    try:
        rig.peers.warm("decode", time.monotonic())  # the link opens and asks for the peer's cache
        rig.pump("the first PeerQuery", lambda: len(rig.queries) == 1)
        too_big = b"x" * (rig.config.limits.max_frame_bytes + ENVELOPE + 64)
        rig.answer(too_big)  # the peer misbehaves once: the session ends
        link = rig.peers.links["decode:0"]  # (decode rank 0: the link of prefill rank 0)
        rig.pump("the link to be gone", lambda: link.gone)
        # the peer behaves from now on: the link must connect again and ask again by itself
        # (if the old socket reconnects before the peer saw its session end, the peer's ROUTER drops
        # what comes under the same name until it does: the query is not answered within peer_s,
        # and the link asks again after its backoff; the next test holds that on its own)
        rig.pump("a new PeerQuery", lambda: len(rig.queries) >= 2, rig.config.timeouts.peer_s + 30.0)
        assert not link.gone
        rig.answer(encode(rig.info))
        rig.pump("the answer", lambda: link.machine.info == rig.info)
    finally:
        rig.close()


def test_a_warm_link_whose_question_is_lost_asks_again_by_itself(tmp_path: Path) -> None:
    """The peer takes the first PeerQuery and never answers it (as a ROUTER still holding an ended
    session under the same name drops it): the link warmed at registration asks again after
    ``peer_s``, and takes the answer to that question."""
    rig = Rig(tmp_path, "timeouts: {peer_s: 0.3}\n")
    try:
        rig.peers.warm("decode", time.monotonic())
        rig.pump("the first PeerQuery", lambda: len(rig.queries) == 1)  # taken, not answered
        rig.pump("the PeerQuery asked again", lambda: len(rig.queries) == 2)
        assert rig.queries[1][0] - rig.queries[0][0] >= 0.3  # not before the first one's answer was due
        assert rig.peers.report()["decode:0"]["unanswered"] == 1  # (what `kvxferd status` shows)
        rig.answer(encode(rig.info))
        link = rig.peers.links["decode:0"]
        rig.pump("the answer", lambda: link.machine.info == rig.info)
    finally:
        rig.close()
