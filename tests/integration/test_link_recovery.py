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


def test_a_link_ended_by_an_oversize_frame_comes_back_by_itself_and_asks_before_it_writes(tmp_path: Path) -> None:
    config = loads(CONFIG.format(run_dir=tmp_path))
    creds = security.credentials(config, "daemon")
    service = Service(shutdown_s=1.0, max_frame=config.limits.max_frame_bytes, queue=16, creds=creds)
    peers = Peers(service, config, group="prefill", rank=0, memory="host")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    auth = security.authenticator(ctx, creds)
    peer = ctx.socket(zmq.ROUTER)
    peer.setsockopt(zmq.LINGER, 0)
    creds.server(peer, "peer")
    decode_group = config.group("decode")
    peer.bind(config.peer_endpoint(decode_group, 0))
    kv = config.kv
    layout = CacheLayout(kv.num_layers, kv.num_blocks, kv.block_bytes(1), kv.planes)
    regions = tuple(
        Region(layer, k, "kvx-peer", (2 * layer + k) * layout.region_bytes) for layer in range(2) for k in (0, 1)
    )
    info = PeerInfo("decode", 0, host_id(), "host", layout, regions, {}, "g2")
    queries: list[bytes] = []

    def pump(what: str, done: Callable[[], bool], timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            for sock, _ in service.poller.poll(20):
                service._handlers[sock]()
            now = time.monotonic()
            peers.handle_answers(now)
            peers.tick(now)
            while peer.poll(0):
                identity, frame = peer.recv_multipart()
                if isinstance(decode(frame), PeerQuery):
                    queries.append(identity)

    try:
        peers.warm("decode", time.monotonic())  # the link opens and asks for the peer's cache
        pump("the first PeerQuery", lambda: len(queries) == 1)
        too_big = b"x" * (config.limits.max_frame_bytes + ENVELOPE + 64)
        peer.send_multipart([queries[0], too_big])  # the peer misbehaves once: the session ends
        link = peers.links["decode:0"]  # (decode rank 0: the link of prefill rank 0)
        pump("the link to be gone", lambda: link.gone)
        # the peer behaves from now on: the link must connect again and ask again by itself
        # (if the old socket reconnects before the peer saw its session end, the peer's ROUTER drops
        # what comes under the same name until it does: the query is not answered within peer_s,
        # and the link asks again after its backoff)
        pump("a new PeerQuery", lambda: len(queries) >= 2, config.timeouts.peer_s + 30.0)
        assert not link.gone
        peer.send_multipart([queries[-1], encode(info)])
        pump("the answer", lambda: link.machine.info == info)
    finally:
        peers.close()
        service.shutdown_sockets()
        peer.close()
        auth.stop()
        ctx.term()
