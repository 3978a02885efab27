"""``kvxferd serve`` for a decode rank: the shell around :class:`kvxferd.core.decode.DecodeCore`.

The decode daemon moves no data: prefill daemons write into the cache its
engine registered. It answers :class:`PeerQuery` with the cache's layout,
regions and transport metadata, and carries notices from prefill daemons
(:class:`KVReady`, or the failed :class:`TransferResult`) to its engine. What
becomes of each notice (repeats, held notices, registration generations,
confirmations) is the pure core's decision; this shell owns the two sockets
and the transports that publish the cache, and carries out the core's effects.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time

import zmq

from kvxferd.config import Config, GroupConfig
from kvxferd.core.decode import Confirm, DecodeCore, DecodeEffect, Deliver, Push
from kvxferd.core.effects import Problem
from kvxferd.errors import TransportError, TransportUnavailable
from kvxferd.protocol import (
    STARTUP_KEY,
    Ack,
    Diverged,
    Error,
    ErrorCode,
    Expired,
    KVReady,
    Message,
    PeerInfo,
    PeerQuery,
    RegisterCache,
    Release,
    StatusQuery,
    StatusReply,
    TransferResult,
    encode,
)
from kvxferd.protocol.fields import show
from kvxferd.runtime import sockets
from kvxferd.runtime.daemon import GroupDaemon
from kvxferd.runtime.peers import host_id
from kvxferd.transports import Transport, load

log = logging.getLogger(__name__)

#: transports that need metadata published for a decode cache (shm and cuda_ipc use the regions)
PUBLISHERS = ("rdma",)


def registration_name(engine: bytes, msg: RegisterCache) -> str:
    """The generation of a cache registration: the same for the same engine (its connection's
    name) registering the same cache (memory, layout, regions), as when it registers again with
    a restarted daemon, whose blocks it reserved stay valid; different for anything else (a new
    cache, a new engine process), so nothing reserved or written in one is taken for another."""
    return hashlib.blake2b(engine + b"\0" + encode(msg), digest_size=6).hexdigest()


class DecodeDaemon(GroupDaemon):
    """Two sockets: the engine's (``endpoint``: registration, status) and the peers'
    (``peer_endpoint``: PeerQuery and notices, from prefill daemons only; see
    :mod:`kvxferd.security`). A notice is forwarded only if it came from our rank of a
    prefill group of the config and names that rank; a notice on the engine socket is refused."""

    role = "decode"

    def __init__(self, config: Config, group: GroupConfig, rank: int) -> None:
        super().__init__(config, group, rank)
        self.cache: RegisterCache | None = None
        self.published: dict[str, bytes] = {}
        self.exposers: list[Transport] = []
        self.engine: bytes | None = None  # the connection that registered the cache: the one engine told
        self.peer_router: zmq.Socket[bytes] | None = None
        self.peer_endpoint = ""
        #: the identities of the prefill ranks of this deployment that write into our rank (the rank
        #: maps of the config): the only ones that may speak on the peer socket
        self.prefills = config.writers(group, rank)
        # the barrier service may relay, for a prefill rank that died, any verdict it remembers (up to
        # max_keys per group): the notices seen must reach back as far, or one its rank did send
        # would be handed on again as a failure
        seen = max(4096, config.barrier.max_keys * len(self.prefills))
        # and as long: the barrier remembers a verdict for pending_s + verdict_s; twice that covers
        # a repeat sent on a reconnect just before its confirmation came
        seen_s = 2 * (config.timeouts.pending_s + config.timeouts.verdict_s)
        # a request's notices are gathered while its slowest writer still writes: as many as its
        # prefill groups may have in flight
        groups = len(set(self.prefills.values()))
        gathering = max(4096, config.limits.max_requests * groups)
        # a new process is told again, before its engine registers, every verdict the barrier told
        # its predecessor (up to max_keys per prefill group): held until then, as many
        self.core = DecodeCore(
            rank, self.prefills, max_held=seen, max_seen=seen, seen_s=seen_s, max_gathering=gathering
        )

    def start(self) -> None:
        self.peer_router, self.peer_endpoint = self.server_socket(
            self.config.peer_endpoint(self.group, self.rank), "peer"
        )
        super().start()
        self.watch(self.peer_router, self.on_peers)

    def ready_info(self) -> dict[str, object]:
        return {**super().ready_info(), "peer_endpoint": self.peer_endpoint}

    def close(self) -> None:
        for transport in self.exposers:
            transport.close()
        self.exposers.clear()

    # -- the engine socket ---------------------------------------------------------

    def handle(self, identity: bytes, msg: Message, now: float) -> None:
        self.counters[type(msg).__name__] += 1
        if isinstance(msg, RegisterCache):
            self._register(identity, msg)
        elif isinstance(msg, StatusQuery):
            report = {
                "endpoint": self.endpoint,
                "peer_endpoint": self.peer_endpoint,
                "registered": self.cache is not None,
                "engine": self.engine is not None,
                "held": len(self.core.held),
                "engine_reachable": self.core.retry_at is None,
                "counters": dict(self.counters + self.core.counts),
            }
            self.reply(identity, StatusReply(self.role, self.group.name, self.rank, self.state, json.dumps(report)))
        elif isinstance(msg, (KVReady, TransferResult, PeerQuery)):
            self.counters["refused_on_engine_socket"] += 1
            detail = f"{type(msg).__name__} is for prefill daemons, on the peer socket {self.peer_endpoint}"
            self.reply(identity, Error(ErrorCode.WRONG_ROLE, detail))
        else:
            super().handle(identity, msg, now)

    # -- the peer socket -------------------------------------------------------------

    def on_peers(self) -> None:
        assert self.peer_router is not None
        self.serve(self.peer_router)

    def handle_on(self, sock: zmq.Socket[bytes], identity: bytes, msg: Message, now: float) -> None:
        if sock is self.peer_router:
            self._from_peer(identity, msg, now)
        else:
            self.handle(identity, msg, now)

    def _from_peer(self, identity: bytes, msg: Message, now: float) -> None:
        assert self.peer_router is not None
        self.counters[f"peer_{type(msg).__name__}"] += 1
        if identity not in self.prefills:
            self.counters["refused_peer"] += 1
            log.warning(
                "refused %s from %s: not a prefill rank writing into decode rank %d of this deployment",
                type(msg).__name__,
                show(identity),
                self.rank,
            )
            self.answer(
                self.peer_router,
                identity,
                Error(
                    ErrorCode.WRONG_ROLE, f"only the prefill ranks writing into decode rank {self.rank} may speak here"
                ),
            )
            return
        if isinstance(msg, PeerQuery):
            info = self._peer_info()
            answer: Message = info or Error(
                ErrorCode.NOT_REGISTERED, f"decode rank {self.rank} has no KV cache registered yet", "peer_query"
            )
            self.answer(self.peer_router, identity, answer)
        elif isinstance(msg, (KVReady, TransferResult)):
            self._apply(self.core.notice(identity, msg, now))
        else:
            self.answer(
                self.peer_router, identity, Error(ErrorCode.WRONG_ROLE, f"{type(msg).__name__} is not a peer message")
            )

    def next_wakeup(self) -> float | None:
        times = [t for t in (super().next_wakeup(), self.core.next_deadline()) if t is not None]
        return min(times, default=None)

    def tick(self, now: float) -> None:
        super().tick(now)
        self._apply(self.core.on_timer(now))

    def from_barrier(self, msg: Message, now: float) -> None:
        """A verdict here is about a prefill rank writing to us whose process ended (see
        :meth:`DecodeCore.writer_gone`)."""
        if isinstance(msg, (Release, Diverged, Expired)) and msg.key != STARTUP_KEY:
            self._apply(self.core.writer_gone(msg, now))
        else:
            super().from_barrier(msg, now)

    def _apply(self, effects: list[DecodeEffect]) -> None:
        """Carry out what the core decided, in order."""
        assert self.peer_router is not None
        queue = list(effects)
        failed = False  # once the engine could not be handed one, the rest of this batch is held untried
        now = time.monotonic()
        while queue:
            eff = queue.pop(0)
            if isinstance(eff, Deliver):
                assert self.engine is not None, "the core delivers only once an engine registered"
                if not failed and self.reply(self.engine, eff.notice):
                    queue[:0] = self.core.delivered(eff, now)
                else:
                    failed = True
                    self.core.undelivered(eff, now)
            elif isinstance(eff, Confirm):
                self.answer(self.peer_router, eff.sender, eff.message)
            elif isinstance(eff, Push):
                info = self._peer_info()
                if info is not None:
                    with contextlib.suppress(zmq.ZMQError):  # not connected (yet): it asks when it writes
                        sockets.send(self.peer_router, info, eff.sender)
            elif isinstance(eff, Problem):
                log.warning("%s", eff.detail)

    def _register(self, identity: bytes, msg: RegisterCache) -> None:
        problem = self.registration_problem(msg)
        if problem is not None:
            self.reply(identity, Error(ErrorCode.BAD_LAYOUT, problem, "register"))
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
        generation = registration_name(identity, msg)
        if self.engine is not None and self.engine != identity:
            # one engine per decode rank: the newest registration is the engine; the other one
            # is told it will hear nothing more from this rank
            detail = f"another engine registered a cache with decode rank {self.rank}; it reports to that one now"
            self.reply(self.engine, Error(ErrorCode.NOT_REGISTERED, detail, "takeover"))
        self.engine = identity
        log.info(
            "engine cache registered (%s memory; transports offered: shm/cuda_ipc by region%s)",
            msg.memory,
            "".join(f", {n}" for n in self.published),
        )
        self.reply(identity, Ack("register", generation))
        # every prefill rank hears the new PeerInfo; notices held for an engine go to this one
        self._apply(self.core.registered(generation, time.monotonic()))

    def _peer_info(self) -> PeerInfo | None:
        if self.cache is None:
            return None
        c = self.cache
        return PeerInfo(
            self.group.name, self.rank, host_id(), c.memory, c.layout, c.regions, self.published, self.core.generation
        )
