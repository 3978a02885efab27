"""A prefill daemon's decode peers: discovery, transport choice, writes and notices.

Theory of operation: a peer is a decode rank's daemon: the rank of ours in a
decode group of the config, which a request's ``peer`` names (by the group's
name or its endpoint template; anything else is refused, so a cache_info can
never send writes or notices anywhere the config does not list). The first
write for a peer opens a DEALER to the group's peer endpoint and asks for its
:class:`PeerInfo`, which must match that group's layout; writes wait,
queued, until it answers (or fail when ``peer_s`` passes, with the reason).
With the answer, each write picks its transport (:func:`kvxferd.transports.choose`),
opens the peer on that transport once, and is posted. Completions come back
at once (``shm``) or from polling (``rdma``, ``cuda_ipc``); polling backs off
from 50 µs to 2 ms while writes are pending and stops when none are.

A peer that failed to answer is forgotten, so a later write asks again; so is
one whose write failed (its cache may have changed: the next write asks
again). A decode daemon whose engine registers a new cache sends its new
PeerInfo unasked; the transports open on the old one are closed.
"""

from __future__ import annotations

import logging
import socket as pysocket
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import zmq

from kvxferd.config import Config, GroupConfig
from kvxferd.core import PostWrite
from kvxferd.errors import TransportError, TransportUnavailable
from kvxferd.protocol import CacheLayout, Error, ErrorCode, Message, PeerInfo, PeerQuery, RegisterCache
from kvxferd.protocol.fields import show
from kvxferd.runtime import sockets
from kvxferd.runtime.service import Service
from kvxferd.transports import Completion, Transport, choose, load

log = logging.getLogger(__name__)

POLL_MIN_S = 50e-6
POLL_MAX_S = 2e-3
RETRY_S = 0.02  # a peer that is up but has no cache registered yet is asked again after this


@cache
def host_id() -> str:
    """Identifies this machine for this boot: peers with the same id share memory."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{pysocket.gethostname()}/{boot}"[:256]


@dataclass
class PeerLink:
    endpoint: str
    sock: zmq.Socket[bytes]
    group: GroupConfig
    layout: CacheLayout  # what the group's PeerInfo must describe
    info: PeerInfo | None = None
    waiting: list[PostWrite] = field(default_factory=list)
    deadline: float | None = None  # for the PeerInfo answer
    retry_at: float | None = None
    opened: set[str] = field(default_factory=set)  # transports this peer is open on
    warm: bool = False  # open the preferred transport as soon as the peer answers
    stale: bool = False  # a write failed: ask for the PeerInfo again before the next write


class Peers:
    def __init__(self, service: Service, config: Config, *, group: str, rank: int, memory: str) -> None:
        self.service = service
        self.config = config
        self.group, self.rank, self.memory = group, rank, memory
        self.max_frame = config.limits.max_frame_bytes
        self.links: dict[str, PeerLink] = {}  # decode group name -> its rank of ours
        self.writes: dict[int, PeerLink] = {}  # write id -> the peer it went to, until it completes
        self.transports: dict[str, Transport] = {}
        self.local: RegisterCache | None = None
        self.used: dict[tuple[str, int], str] = {}  # request instance -> transport its writes went over
        self.answers: list[tuple[PeerLink, Message]] = []  # collected by the socket handlers
        self._poll_delay = POLL_MIN_S
        self._next_poll: float | None = None

    # -- local cache ---------------------------------------------------------------

    def set_local(self, local: RegisterCache) -> None:
        """A (new) engine cache: every transport and every peer opening starts over.

        The transport this daemon will most likely use is set up at once, so the
        first request does not pay for importing it and mapping the cache.
        """
        self.close_transports()
        self.local = local
        likely = self.config.transport.prefer
        if likely == "auto":
            likely = "cuda_ipc" if self.memory == "gpu" else "shm"
        try:
            self.transport(likely).prepare()
        except (TransportError, TransportUnavailable) as exc:
            log.warning("transport %s cannot be prepared: %s", likely, exc)

    def close_transports(self) -> None:
        for transport in self.transports.values():
            transport.close()
        self.transports.clear()
        self.writes.clear()  # only when no write is live, or the core is ending them all
        for link in self.links.values():
            link.opened.clear()

    def transport(self, name: str) -> Transport:
        found = self.transports.get(name)
        if found is None:
            assert self.local is not None, "writes exist only once a cache is registered"
            found = self.transports[name] = load(name)(self.config.transport, self.local)
            log.info("transport %s ready", name)
        return found

    # -- writes --------------------------------------------------------------------

    def group_of(self, peer: str) -> GroupConfig:
        """The decode group a request's ``peer`` names; TransportError if none does."""
        group = self.config.decode_group_named(peer)
        if group is None:
            names = ", ".join(g.name for g in self.config.groups if g.role == "decode") or "none"
            raise TransportError(f"peer {show(peer)} names no decode group of this deployment (decode groups: {names})")
        if self.rank >= group.world_size:
            raise TransportError(f"decode group {group.name!r} has no rank {self.rank}")
        return group

    def write(self, w: PostWrite, now: float) -> list[Completion]:
        try:
            link = self._link(w.peer)
        except TransportError as exc:
            return [Completion(w.write_id, str(exc))]
        if link.stale and link.info is not None:
            self._forget(link)
        link.stale = False
        if link.info is None:
            link.waiting.append(w)
            if link.deadline is None:
                self._query(link, now)
            return []
        return self._dispatch(link, w, now)

    def _choose(self, requested: str, info: PeerInfo) -> str:
        return choose(
            requested,
            self.config.transport.prefer,
            local_memory=self.memory,
            peer_memory=info.memory,
            same_host=info.host_id == host_id(),
        )

    def _open(self, link: PeerLink, name: str) -> Transport:
        """The transport ``name``, open on ``link``'s peer; raises TransportError/TransportUnavailable."""
        transport = self.transport(name)
        if name not in link.opened:
            assert link.info is not None
            transport.open_peer(link.endpoint, link.info)
            link.opened.add(name)
            log.info("peer %s (%s rank %d) open on %s", link.endpoint, link.info.group, link.info.rank, name)
        return transport

    def _dispatch(self, link: PeerLink, w: PostWrite, now: float) -> list[Completion]:
        assert link.info is not None
        name = self._choose(w.transport, link.info)
        try:
            transport = self._open(link, name)
        except (TransportError, TransportUnavailable) as exc:
            return [Completion(w.write_id, f"transport {name} to {link.endpoint}: {exc}")]
        for key in w.requests:
            self.used.setdefault(key, name)
        self.writes[w.write_id] = link
        done = transport.post(w.write_id, link.endpoint, w.layer, w.runs)
        if done is not None:
            return self.settled([done])
        self._poll_delay = POLL_MIN_S
        self._next_poll = now + POLL_MIN_S
        return []

    def poll(self, now: float) -> list[Completion]:
        """Completions from transports that finish asynchronously."""
        if self._next_poll is None or now < self._next_poll:
            return []
        done: list[Completion] = []
        pending = 0
        for transport in self.transports.values():
            done += transport.poll()
            pending += transport.pending()
        if pending:
            self._poll_delay = POLL_MIN_S if done else min(self._poll_delay * 2, POLL_MAX_S)
            self._next_poll = now + self._poll_delay
        else:
            self._next_poll = None
        return self.settled(done)

    def settled(self, done: list[Completion]) -> list[Completion]:
        """Forget completed writes; a failed one makes its peer be asked again before the next write."""
        for c in done:
            link = self.writes.pop(c.write_id, None)
            if c.error is not None and not c.refused and link is not None and not link.stale:
                log.warning("a write to %s failed; its PeerInfo will be asked again", link.endpoint)
                link.stale = True
        return done

    def _forget(self, link: PeerLink) -> None:
        """Drop what we know of the peer's cache and every transport opened on it."""
        link.info = None
        for name in link.opened:
            transport = self.transports.get(name)
            if transport is not None:
                try:
                    transport.close_peer(link.endpoint)
                except (TransportError, TransportUnavailable) as exc:
                    log.warning("closing peer %s on %s: %s", link.endpoint, name, exc)
        link.opened.clear()

    # -- notices to decode daemons ----------------------------------------------------

    def notify(self, peer: str, msg: Message) -> None:
        try:
            link = self._link(peer)
            sockets.send(link.sock, msg)
        except TransportError as exc:
            log.error("%s; dropped %s", exc, msg)
        except zmq.Again:
            log.error("decode daemon %s is not reachable; dropped %s", link.endpoint, msg)

    # -- discovery -------------------------------------------------------------------------

    def _link(self, peer: str) -> PeerLink:
        """The link to our rank of the decode group ``peer`` names (one per group, so at most as
        many links as the config has decode groups)."""
        group = self.group_of(peer)
        link = self.links.get(group.name)
        if link is None:
            endpoint = self.config.peer_endpoint(group, self.rank)
            try:
                sock = self.service.client_socket(endpoint, f"{self.group}:{self.rank}")
            except zmq.ZMQError as exc:
                raise TransportError(
                    f"cannot connect to decode {group.name!r} rank {self.rank} at {endpoint}: {exc}"
                ) from None
            kv = self.config.kv
            layout = CacheLayout(kv.num_layers, kv.num_blocks, kv.block_bytes(group.world_size))
            link = self.links[group.name] = PeerLink(endpoint, sock, group, layout)
            self.service.watch(sock, lambda: self._on_link(link))
        return link

    def _query(self, link: PeerLink, now: float) -> None:
        if link.deadline is None:
            link.deadline = now + self.config.timeouts.peer_s
        link.retry_at = None
        try:
            sockets.send(link.sock, PeerQuery(self.group, self.rank))
        except zmq.Again:
            link.retry_at = now + RETRY_S

    def _on_link(self, link: PeerLink) -> None:
        for inbound in sockets.receive(link.sock, max_frame=self.max_frame, router=False):
            if inbound.msg is None:
                log.error("bad frame from peer %s: %s", link.endpoint, inbound.error)
            else:
                self.answers.append((link, inbound.msg))

    def warm(self, peer: str, now: float) -> None:
        """Discover a peer now and open it on the preferred transport, before any request needs it."""
        try:
            link = self._link(peer)
        except TransportError as exc:
            log.warning("%s", exc)
            return
        link.warm = True
        if link.info is None and link.deadline is None:
            self._query(link, now)

    def handle_answers(self, now: float) -> list[Completion]:
        """Act on what peers said since the last call."""
        done: list[Completion] = []
        answers, self.answers = self.answers, []
        for link, msg in answers:
            if isinstance(msg, PeerInfo):
                problem = self._mismatch(link, msg)
                if problem is not None:
                    done += self._fail(
                        link, f"decode {link.group.name!r} rank {self.rank} at {link.endpoint}: {problem}"
                    )
                    continue
                if link.info is not None and link.info != msg:
                    log.info("decode %r rank %d registered a new cache", link.group.name, self.rank)
                    self._forget(link)
                link.info, link.deadline, link.retry_at = msg, None, None
                if link.warm and self.local is not None:
                    name = self._choose("auto", msg)
                    try:
                        self._open(link, name)
                    except (TransportError, TransportUnavailable) as exc:
                        log.warning("could not open peer %s on %s ahead of time: %s", link.endpoint, name, exc)
                waiting, link.waiting = link.waiting, []
                for w in waiting:
                    done += self._dispatch(link, w, now)
            elif isinstance(msg, Error) and msg.code is ErrorCode.NOT_REGISTERED and link.deadline is not None:
                link.retry_at = now + RETRY_S  # the decode engine has not registered its cache yet
            elif isinstance(msg, Error):
                done += self._fail(link, f"peer {link.endpoint} refused: {msg.detail}")
            else:
                log.warning("unexpected %s from peer %s", type(msg).__name__, link.endpoint)
        return done

    def tick(self, now: float) -> list[Completion]:
        done: list[Completion] = []
        for link in list(self.links.values()):
            if link.deadline is not None and now >= link.deadline:
                done += self._fail(link, f"peer {link.endpoint} did not answer within {self.config.timeouts.peer_s:g}s")
            elif link.retry_at is not None and now >= link.retry_at:
                self._query(link, now)
        return done + self.poll(now)

    def next_wakeup(self) -> float | None:
        times = [self._next_poll] if self._next_poll is not None else []
        for link in self.links.values():
            times += [t for t in (link.deadline, link.retry_at) if t is not None]
        return min(times, default=None)

    def _mismatch(self, link: PeerLink, info: PeerInfo) -> str | None:
        """Why a PeerInfo is not what the config says this peer holds, if it is not."""
        if info.group != link.group.name or info.rank != self.rank:
            return f"answered as {show(info.group)} rank {info.rank}"
        if info.memory != link.group.memory:
            return f"its cache is in {info.memory} memory; the config says {link.group.memory}"
        if info.layout != link.layout:
            return f"its cache is {info.layout}; the config describes {link.layout}"
        return None

    def _fail(self, link: PeerLink, reason: str) -> list[Completion]:
        log.warning("%s", reason)
        waiting, link.waiting = link.waiting, []
        link.deadline = link.retry_at = None
        self._forget(link)
        return [Completion(w.write_id, reason) for w in waiting]

    def close(self) -> None:
        self.close_transports()
        for link in self.links.values():
            self.service.unwatch(link.sock)
            link.sock.close()
        self.links.clear()
