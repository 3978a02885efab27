"""A prefill daemon's decode peers: discovery, transport choice, writes and notices.

Theory of operation: a peer is a decode rank's daemon, named by the endpoint
its requests carry (``{rank}`` replaced by our rank). The first write for a
peer opens a DEALER to it and asks for its :class:`PeerInfo`; writes wait,
queued, until it answers (or fail when ``peer_s`` passes, with the reason).
With the answer, each write picks its transport (:func:`kvxferd.transports.choose`),
opens the peer on that transport once, and is posted. Completions come back
at once (``shm``) or from polling (``rdma``, ``cuda_ipc``); polling backs off
from 50 µs to 2 ms while writes are pending and stops when none are.

A peer that failed to answer is forgotten, so a later write asks again.
"""

from __future__ import annotations

import logging
import socket as pysocket
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import zmq

from kvxferd.config import Config
from kvxferd.core import PostWrite
from kvxferd.errors import TransportError, TransportUnavailable
from kvxferd.protocol import Error, ErrorCode, Message, PeerInfo, PeerQuery, RegisterCache
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
    info: PeerInfo | None = None
    waiting: list[PostWrite] = field(default_factory=list)
    deadline: float | None = None  # for the PeerInfo answer
    retry_at: float | None = None
    opened: set[str] = field(default_factory=set)  # transports this peer is open on
    warm: bool = False  # open the preferred transport as soon as the peer answers


class Peers:
    def __init__(self, service: Service, config: Config, *, group: str, rank: int, memory: str) -> None:
        self.service = service
        self.config = config
        self.group, self.rank, self.memory = group, rank, memory
        self.max_frame = config.limits.max_frame_bytes
        self.links: dict[str, PeerLink] = {}
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

    def endpoint(self, template: str) -> str:
        return template.replace("{rank}", str(self.rank))

    def write(self, w: PostWrite, now: float) -> list[Completion]:
        try:
            link = self._link(self.endpoint(w.peer))
        except TransportError as exc:
            return [Completion(w.write_id, str(exc))]
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
        done = transport.post(w.write_id, link.endpoint, w.layer, w.runs)
        if done is not None:
            return [done]
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
        return done

    # -- notices to decode daemons ----------------------------------------------------

    def notify(self, template: str, msg: Message) -> None:
        try:
            link = self._link(self.endpoint(template))
            sockets.send(link.sock, msg)
        except TransportError as exc:
            log.error("%s; dropped %s", exc, msg)
        except zmq.Again:
            log.error("decode daemon %s is not reachable; dropped %s", link.endpoint, msg)

    # -- discovery -------------------------------------------------------------------------

    def _link(self, endpoint: str) -> PeerLink:
        link = self.links.get(endpoint)
        if link is None:
            sock = sockets.socket(self.service.ctx, zmq.DEALER, max_frame=self.max_frame)
            sock.setsockopt(zmq.IDENTITY, f"{self.group}:{self.rank}".encode())
            try:
                sock.connect(endpoint)
            except zmq.ZMQError as exc:
                sock.close(linger=0)  # a half-made socket would block the context's termination
                raise TransportError(f"cannot connect to peer {endpoint!r}: {exc}") from None
            link = self.links[endpoint] = PeerLink(endpoint, sock)
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

    def warm(self, template: str, now: float) -> None:
        """Discover a peer now and open it on the preferred transport, before any request needs it."""
        try:
            link = self._link(self.endpoint(template))
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

    def _fail(self, link: PeerLink, reason: str) -> list[Completion]:
        log.warning("%s", reason)
        waiting, link.waiting = link.waiting, []
        link.deadline = link.retry_at = None
        link.info = None
        return [Completion(w.write_id, reason) for w in waiting]

    def close(self) -> None:
        self.close_transports()
        for link in self.links.values():
            self.service.unwatch(link.sock)
            link.sock.close()
        self.links.clear()
