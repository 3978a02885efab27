"""``kvxferd serve`` for a decode rank: registers the decode cache, answers peers, tells the engine.

The decode daemon moves no data: prefill daemons write into the cache its
engine registered. It answers :class:`PeerQuery` with the cache's layout,
regions and transport metadata, and forwards what prefill daemons report
(:class:`KVReady`, or the failed :class:`TransferResult`) to its engine.

A prefill rank notifies the decode rank it writes into only after its own
writes stopped. So once *every* decode rank reported a failed request, no
prefill rank writes into its blocks any more and the engine may reuse them.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import zmq

from kvxferd.config import Config, GroupConfig
from kvxferd.errors import RemoteProtocolError, TransportError, TransportUnavailable
from kvxferd.protocol import (
    Ack,
    CacheLayout,
    Error,
    ErrorCode,
    KVReady,
    Message,
    PeerInfo,
    PeerQuery,
    RegisterCache,
    StatusQuery,
    StatusReply,
    TransferResult,
    decode,
)
from kvxferd.runtime import sockets
from kvxferd.runtime.barrier_link import BarrierLink
from kvxferd.runtime.logs import TRACE
from kvxferd.runtime.peers import host_id
from kvxferd.runtime.service import Service
from kvxferd.shm import Segment
from kvxferd.transports import Transport, load

log = logging.getLogger(__name__)

#: transports that need metadata published for a decode cache (shm and cuda_ipc use the regions)
PUBLISHERS = ("rdma",)


class DecodeDaemon(Service):
    role = "decode"

    def __init__(self, config: Config, group: GroupConfig, rank: int) -> None:
        super().__init__(shutdown_s=config.timeouts.shutdown_s)
        self.config, self.group, self.rank = config, group, rank
        kv = config.kv
        self.layout = CacheLayout(kv.num_layers, kv.num_blocks, kv.block_bytes(group.world_size))
        self.max_frame = config.limits.max_frame_bytes
        self.cache: RegisterCache | None = None
        self.published: dict[str, bytes] = {}
        self.exposers: list[Transport] = []
        self.engines: list[bytes] = []  # identities of the engines that registered, to notify
        self.counters: Counter[str] = Counter()
        self.endpoint = ""

    def start(self) -> None:
        self.router = self.own(sockets.socket(self.ctx, zmq.ROUTER, max_frame=self.max_frame))
        self.endpoint = sockets.bind(self.router, self.config.endpoint(self.group, self.rank))
        self.barrier = BarrierLink(
            self.ctx,
            self.config.barrier_endpoint(),
            group=self.group.name,
            rank=self.rank,
            world_size=self.group.world_size,
            role=self.role,
            max_frame=self.max_frame,
        )
        self.own(self.barrier.sock)
        self.barrier.startup(
            self.config.fingerprint(), self.config.timeouts.startup_s, lambda: self._stop_signal is not None
        )
        self.watch(self.router, self._on_router)
        self.watch(self.barrier.sock, self._on_barrier)

    def _on_barrier(self) -> None:
        for msg in self.barrier.recv_ready():  # nothing is expected after start-up
            log.debug("from the barrier service: %s", msg)

    def ready_info(self) -> dict[str, Any]:
        return {"group": self.group.name, "rank": self.rank, "endpoint": self.endpoint}

    def close(self) -> None:
        for transport in self.exposers:
            transport.close()
        self.exposers.clear()

    def _on_router(self) -> None:
        for _ in range(sockets.BATCH):
            try:
                identity, frame = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                continue
            try:
                msg = decode(frame, max_bytes=self.max_frame)
            except RemoteProtocolError as exc:
                log.warning("bad frame from %r: %s", identity, exc)
                self._send(identity, Error(ErrorCode.BAD_MESSAGE, str(exc)))
                continue
            log.log(TRACE, "<- %r %s", identity, msg)
            self.counters[type(msg).__name__] += 1
            self._handle(identity, msg)

    def _handle(self, identity: bytes, msg: Message) -> None:
        if isinstance(msg, (KVReady, TransferResult)):
            self._forward(msg)
        elif isinstance(msg, PeerQuery):
            self._send(
                identity,
                self._peer_info()
                or Error(
                    ErrorCode.NOT_REGISTERED, f"decode rank {self.rank} has no KV cache registered yet", "peer_query"
                ),
            )
        elif isinstance(msg, RegisterCache):
            self._register(identity, msg)
        elif isinstance(msg, StatusQuery):
            report = {
                "endpoint": self.endpoint,
                "registered": self.cache is not None,
                "engines": len(self.engines),
                "counters": dict(self.counters),
            }
            self._send(identity, StatusReply(self.role, self.group.name, self.rank, self.state, json.dumps(report)))
        else:
            self._send(identity, Error(ErrorCode.WRONG_ROLE, f"a decode daemon does not accept {type(msg).__name__}"))

    def _register(self, identity: bytes, msg: RegisterCache) -> None:
        problem = None
        if msg.memory != self.group.memory:
            problem = f"group {self.group.name!r} keeps its cache in {self.group.memory} memory, not {msg.memory}"
        elif msg.layout != self.layout:
            problem = f"the engine's cache is {msg.layout}, the config describes {self.layout}"
        else:
            problem = self._check_memory(msg)
        if problem is not None:
            self._send(identity, Error(ErrorCode.BAD_LAYOUT, problem, "register"))
            return
        self.close()
        self.published = {}
        offered = [n for n in PUBLISHERS if self.config.transport.prefer in ("auto", n)]
        for name in offered:
            try:
                transport = load(name)(self.config.transport, msg)
                blob = transport.publish()
            except (TransportUnavailable, TransportError) as exc:
                log.info("transport %s not offered to peers: %s", name, exc)
                continue
            self.exposers.append(transport)
            if blob is not None:
                self.published[name] = blob
        self.cache = msg
        if identity not in self.engines:
            self.engines.append(identity)
        log.info(
            "engine cache registered (%s memory; transports offered: shm/cuda_ipc by region%s)",
            msg.memory,
            "".join(f", {n}" for n in self.published),
        )
        self._send(identity, Ack("register"))

    def _check_memory(self, msg: RegisterCache) -> str | None:
        """For host memory, check that every segment exists and is large enough."""
        if msg.memory != "host":
            return None
        need: dict[str, int] = {}
        for region in msg.regions:
            if not isinstance(region.handle, str):
                return f"host-memory region of layer {region.layer} must name a shared-memory segment"
            need[region.handle] = max(need.get(region.handle, 0), region.offset + msg.layout.region_bytes)
        for name, size in need.items():
            try:
                Segment.attach(name, min_size=size, writable=False).close()
            except TransportError as exc:
                return str(exc)
        return None

    def _peer_info(self) -> PeerInfo | None:
        if self.cache is None:
            return None
        c = self.cache
        return PeerInfo(self.group.name, self.rank, host_id(), c.memory, c.layout, c.regions, self.published)

    def _forward(self, msg: KVReady | TransferResult) -> None:
        if not self.engines:
            log.warning("no engine registered to tell about request %s", msg.request_id)
            return
        for identity in list(self.engines):
            self._send(identity, msg)

    def _send(self, identity: bytes, msg: Message) -> None:
        try:
            sockets.send(self.router, msg, identity)
            log.log(TRACE, "-> %r %s", identity, msg)
        except zmq.ZMQError as exc:
            log.warning("%r unreachable (%s); dropped %s", identity, exc.strerror, type(msg).__name__)
            if identity in self.engines and isinstance(msg, (KVReady, TransferResult)):
                self.engines.remove(identity)
