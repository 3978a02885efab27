"""``kvxferd serve`` for a decode rank: registers the decode cache, answers peers, tells the engine.

The decode daemon moves no data: prefill daemons write into the cache its
engine registered. It answers :class:`PeerQuery` with the cache's layout,
regions and transport metadata, and forwards what prefill daemons report
(:class:`KVReady`, or the failed :class:`TransferResult`) to its engine.

Each registration is a new *generation* (a random name, so a restarted daemon
never repeats one), published in the PeerInfo. A KVReady names the generation
its bytes went into; one that names another than the current registration is
told to the engine as a failure (the bytes are in a cache it no longer has),
and the prefill daemon that sent it is given the current PeerInfo.

Every notice handed to the engine is confirmed to the prefill daemon that
sent it (:class:`Received`); that daemon sends unconfirmed ones again when
this daemon's connection (re)opens, so a daemon killed with notices unread
loses none. A repeat of a notice already handed on is confirmed again and not
told twice (the last :data:`MAX_SEEN` are remembered); one held for an engine
not registered yet is kept once.

A prefill rank notifies the decode rank it writes into only after its own
writes stopped. So once *every* decode rank reported a failed request, no
prefill rank writes into its blocks any more and the engine may reuse them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from collections import OrderedDict, deque

import zmq

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
    Received,
    RegisterCache,
    Status,
    StatusQuery,
    StatusReply,
    TransferResult,
)
from kvxferd.protocol.fields import show
from kvxferd.runtime import sockets
from kvxferd.runtime.daemon import GroupDaemon
from kvxferd.runtime.peers import host_id
from kvxferd.transports import Transport, load

log = logging.getLogger(__name__)

#: transports that need metadata published for a decode cache (shm and cuda_ipc use the regions)
PUBLISHERS = ("rdma",)
#: notices kept while no engine is registered (oldest dropped first, counted)
MAX_HELD = 4096
#: notices remembered as handed to the engine, so a repeat is not told twice (oldest forgotten)
MAX_SEEN = 4096


class DecodeDaemon(GroupDaemon):
    """Two sockets: the engine's (``endpoint``: registration, status) and the peers'
    (``peer_endpoint``: PeerQuery and notices, from prefill daemons only; see
    :mod:`kvxferd.security`). A notice is forwarded only if it came from our rank of a
    prefill group of the config and names that rank; a notice on the engine socket is refused."""

    role = "decode"

    def __init__(self, config: Config, group: GroupConfig, rank: int) -> None:
        super().__init__(config, group, rank)
        self.cache: RegisterCache | None = None
        self.generation = ""  # names the current registration (see the module's docstring)
        self.published: dict[str, bytes] = {}
        self.exposers: list[Transport] = []
        self.engine: bytes | None = None  # the connection that registered the cache: the one engine told
        self.peer_router: zmq.Socket[bytes] | None = None
        self.peer_endpoint = ""
        self.queried: set[bytes] = set()  # prefill daemons that asked for our PeerInfo
        #: notices that came before any engine registered (identity, prefill group, notice)
        self.held: deque[tuple[bytes, str, KVReady | TransferResult]] = deque(maxlen=MAX_HELD)
        #: (prefill daemon, request instance) of the notices handed on (True) or held (False)
        self.seen: OrderedDict[tuple[bytes, tuple[str, int]], bool] = OrderedDict()
        #: prefill daemon -> when it was last given our PeerInfo unasked (bounded by the config's ranks)
        self.pushed: dict[bytes, float] = {}
        #: the identities prefill daemons of this deployment connect with, for our rank
        self.prefills = {
            f"{g.name}:{rank}".encode(): g.name for g in config.groups if g.role == "prefill" and rank < g.world_size
        }

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
                "counters": dict(self.counters),
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
            self._from_peer(identity, msg)
        else:
            self.handle(identity, msg, now)

    def _from_peer(self, identity: bytes, msg: Message) -> None:
        assert self.peer_router is not None
        self.counters[f"peer_{type(msg).__name__}"] += 1
        source = self.prefills.get(identity)
        if source is None:
            self.counters["refused_peer"] += 1
            log.warning(
                "refused %s from %s: not a prefill rank %d of this deployment",
                type(msg).__name__,
                show(identity),
                self.rank,
            )
            self.answer(
                self.peer_router,
                identity,
                Error(ErrorCode.WRONG_ROLE, f"only prefill ranks {self.rank} may speak here"),
            )
            return
        if isinstance(msg, PeerQuery):
            self.queried.add(identity)
            info = self._peer_info()
            answer: Message = info or Error(
                ErrorCode.NOT_REGISTERED, f"decode rank {self.rank} has no KV cache registered yet", "peer_query"
            )
            self.answer(self.peer_router, identity, answer)
        elif isinstance(msg, (KVReady, TransferResult)):
            if msg.rank != self.rank:
                self.counters["refused_peer"] += 1
                log.warning("refused a notice from %s naming rank %d", show(identity), msg.rank)
                return
            handed = self.seen.get((identity, msg.key))
            if handed is not None:
                self.counters["notice_repeated"] += 1
                if handed:
                    self._confirm(identity, msg)
                return
            if self.engine is None:
                # notices sent again (or queued) while this daemon restarted: kept for the engine
                # that registers next (they name an earlier registration, so it hears them as
                # failures, and the blocks are free again)
                if len(self.held) == self.held.maxlen:
                    self.counters["notices_dropped"] += 1
                    who, _, dropped = self.held[0]
                    self.seen.pop((who, dropped.key), None)
                self.held.append((identity, source, msg))
                self._remember(identity, msg, False)
                return
            self._forward(identity, self._checked(identity, source, msg))
        else:
            self.answer(
                self.peer_router, identity, Error(ErrorCode.WRONG_ROLE, f"{type(msg).__name__} is not a peer message")
            )

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
        self.generation = secrets.token_hex(6)
        if self.engine is not None and self.engine != identity:
            # one engine per decode rank: the newest registration is the engine; the other one
            # is told it will hear nothing more from this rank
            detail = f"another engine registered a cache with decode rank {self.rank}; it reports to that one now"
            self.reply(self.engine, Error(ErrorCode.NOT_REGISTERED, detail, "register"))
        self.engine = identity
        log.info(
            "engine cache registered (%s memory; transports offered: shm/cuda_ipc by region%s)",
            msg.memory,
            "".join(f", {n}" for n in self.published),
        )
        self.reply(identity, Ack("register"))
        info = self._peer_info()
        assert self.peer_router is not None and info is not None
        now = time.monotonic()
        for prefill in self.queried:  # they hold our old PeerInfo: give them the new one
            if self.answer(self.peer_router, prefill, info):
                self.pushed[prefill] = now
        for prefill in set(self.prefills) - self.queried:
            # a prefill rank connected to an earlier run of this daemon holds that run's PeerInfo;
            # one not connected (yet) asks when it first writes
            with contextlib.suppress(zmq.ZMQError):
                sockets.send(self.peer_router, info, prefill)
                self.pushed[prefill] = now
        held, self.held = list(self.held), deque(maxlen=MAX_HELD)
        for who, source, notice in held:
            self._forward(who, self._checked(who, source, notice))

    def _peer_info(self) -> PeerInfo | None:
        if self.cache is None:
            return None
        c = self.cache
        return PeerInfo(
            self.group.name, self.rank, host_id(), c.memory, c.layout, c.regions, self.published, self.generation
        )

    def _checked(self, identity: bytes, source: str, msg: KVReady | TransferResult) -> KVReady | TransferResult:
        """A KVReady that names another registration than the current one, as the failure it is
        (and that prefill rank is given the current PeerInfo); anything else unchanged."""
        if not isinstance(msg, KVReady) or msg.generation == self.generation:
            return msg
        self.counters["stale_generation"] += 1
        reason = (
            f"prefill {source} rank {msg.rank} wrote it into registration {show(msg.generation)} of "
            f"decode rank {self.rank}; the engine's cache is registration {show(self.generation)} now"
        )
        log.warning("request %s: %s", msg.request_id, reason)
        info, now = self._peer_info(), time.monotonic()
        if info is not None and self.peer_router is not None and now - self.pushed.get(identity, -1e9) >= 1.0:
            self.pushed[identity] = now  # at most once a second: a flood of stale notices needs one answer
            self.answer(self.peer_router, identity, info)  # so its next writes go to this one
        return TransferResult(msg.request_id, Status.FAILED, reason, msg.rank, msg.bytes, instance=msg.instance)

    def _forward(self, sender: bytes, msg: KVReady | TransferResult) -> None:
        """Hand a notice to the engine and confirm it to the prefill daemon that sent it."""
        assert self.engine is not None
        if not self.reply(self.engine, msg):
            self.counters["notices_dropped"] += 1
            return
        self._remember(sender, msg, True)
        self._confirm(sender, msg)

    def _remember(self, sender: bytes, msg: KVReady | TransferResult, handed: bool) -> None:
        self.seen[(sender, msg.key)] = handed
        self.seen.move_to_end((sender, msg.key))
        while len(self.seen) > MAX_SEEN:
            self.seen.popitem(last=False)

    def _confirm(self, sender: bytes, msg: KVReady | TransferResult) -> None:
        assert self.peer_router is not None
        self.answer(self.peer_router, sender, Received(msg.request_id, msg.rank, msg.instance))
