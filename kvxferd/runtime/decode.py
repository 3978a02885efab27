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

from kvxferd.config import Config, GroupConfig
from kvxferd.errors import TransportError, TransportUnavailable
from kvxferd.protocol import (
    Ack,
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
)
from kvxferd.runtime.daemon import GroupDaemon
from kvxferd.runtime.peers import host_id
from kvxferd.transports import Transport, load

log = logging.getLogger(__name__)

#: transports that need metadata published for a decode cache (shm and cuda_ipc use the regions)
PUBLISHERS = ("rdma",)


class DecodeDaemon(GroupDaemon):
    role = "decode"

    def __init__(self, config: Config, group: GroupConfig, rank: int) -> None:
        super().__init__(config, group, rank)
        self.cache: RegisterCache | None = None
        self.published: dict[str, bytes] = {}
        self.exposers: list[Transport] = []
        self.engines: list[bytes] = []  # identities of the engines that registered, to notify

    def close(self) -> None:
        for transport in self.exposers:
            transport.close()
        self.exposers.clear()

    def handle(self, identity: bytes, msg: Message, now: float) -> None:
        self.counters[type(msg).__name__] += 1
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
            super().handle(identity, msg, now)

    def _register(self, identity: bytes, msg: RegisterCache) -> None:
        problem = self.registration_problem(msg)
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
        if not self.reply(identity, msg) and identity in self.engines and isinstance(msg, (KVReady, TransferResult)):
            self.engines.remove(identity)  # that engine is gone; stop addressing it
