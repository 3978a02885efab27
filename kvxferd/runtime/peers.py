"""A prefill daemon's decode peers: the shell around :class:`kvxferd.core.peer.PeerLink`.

Theory of operation: a peer is a decode rank's daemon: the rank of ours in a
decode group of the config, which a request's ``peer`` names (by the group's
name or its endpoint template; anything else is refused, so a cache_info can
never send writes or notices anywhere the config does not list). There is at
most one link per decode group. What a link knows and when it asks (the
PeerInfo, the question out, queued and in-flight writes, idleness) is the pure
state machine in :mod:`kvxferd.core.peer`; this module owns its DEALER socket
and the transports, feeds the machine events with ``now`` and carries out what
it returns. The PeerInfo is checked here against the group's layout and
memory, since only the shell knows the config.

With the peer's cache known, each write picks its transport
(:func:`kvxferd.transports.choose`), opens the peer on it once, and is posted.
Completions come back at once (``shm``) or from polling (``rdma``,
``cuda_ipc``), each stamped with the transport it went over; polling backs
off from 50 µs to 2 ms while writes are pending and stops when none are.

A link watches its socket's connection (a ZMQ socket monitor): once the decode
daemon's connection closes (the process died or stopped serving), writes for it
fail at once, "decode rank N at ENDPOINT is gone", instead of going into memory
nobody will report on; when it connects again they go as before.

Notices are kept until the decode daemon confirms them (:class:`Received`: it
handed them to its engine): a daemon killed with notices unread in its socket
loses none, since every unconfirmed notice for it is sent again when its
connection comes back (to its successor, which tells the engine that registers
with it). The decode daemon recognises a repeat and confirms it again without
telling its engine twice.
"""

from __future__ import annotations

import dataclasses
import logging
import socket as pysocket
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from kvxferd.config import Config, GroupConfig
from kvxferd.core import Write
from kvxferd.core.peer import Ask, Close, Drop, Fail, LinkEffect, LinkSettings, Note, PeerLink, Post, Warm
from kvxferd.errors import TransportError, TransportUnavailable
from kvxferd.protocol import (
    CacheLayout,
    Error,
    ErrorCode,
    KVReady,
    Message,
    PeerInfo,
    PeerQuery,
    Received,
    RegisterCache,
    TransferResult,
)
from kvxferd.protocol.fields import show
from kvxferd.runtime import sockets
from kvxferd.runtime.service import Service
from kvxferd.transports import Completion, Transport, choose, load

log = logging.getLogger(__name__)

POLL_MIN_S = 50e-6
POLL_MAX_S = 2e-3
#: the generation a notice names when its request's writes went into more than one registration
MIXED = "several registrations"
RETRY_S = 0.02  # a peer that is up but has no cache registered yet is asked again after this
#: notices kept until their decode daemon confirms them (the oldest is given up past this)
MAX_UNCONFIRMED = 8192

Notice = KVReady | TransferResult


@cache
def host_id() -> str:
    """Identifies this machine for this boot: peers with the same id share memory."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{pysocket.gethostname()}/{boot}"[:256]


@dataclass
class Link:
    """One decode group's link: the machine, and the plumbing it drives."""

    endpoint: str
    sock: zmq.Socket[bytes]
    group: GroupConfig
    layout: CacheLayout  # what the group's PeerInfo must describe
    machine: PeerLink
    monitor: zmq.Socket[bytes] | None = None  # connection events of ``sock``
    gone: bool = False  # the peer's connection closed and has not come back
    opened: set[str] = field(default_factory=set)  # transports this peer is open on

    @property
    def gone_text(self) -> str:
        return f"{self.machine.s.name} is gone (its connection closed)"


class Peers:
    def __init__(self, service: Service, config: Config, *, group: str, rank: int, memory: str) -> None:
        self.service = service
        self.config = config
        self.group, self.rank, self.memory = group, rank, memory
        self.max_frame = config.limits.max_frame_bytes
        self.links: dict[str, Link] = {}  # decode group name -> its rank of ours
        self.writes: dict[int, tuple[Link, str]] = {}  # write id -> (link, transport), until it completes
        self.transports: dict[str, Transport] = {}
        self.local: RegisterCache | None = None
        self.answers: list[tuple[Link, Message]] = []  # collected by the socket handlers
        #: request -> the decode registration (PeerInfo.generation) its writes went into, until its
        #: notice names it; MIXED if they went into more than one. Bounded by the core's requests.
        self.generations: dict[tuple[str, int], str] = {}
        #: notices not yet confirmed by their decode daemon, by (decode group, request instance):
        #: sent again whenever that daemon's connection (re)opens; at most MAX_UNCONFIRMED
        self.unconfirmed: OrderedDict[tuple[str, tuple[str, int]], Notice] = OrderedDict()
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
        """Close every transport; writes still in flight are forgotten (only when none is live,
        or the core is ending them all)."""
        for transport in self.transports.values():
            transport.close()
        self.transports.clear()
        for link in self.links.values():
            link.machine.writes_lost()
        self.writes.clear()
        self.generations.clear()  # (called only when the core ends every request, or has none)
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

    def write(self, w: Write, now: float) -> list[Completion]:
        try:
            link = self._link(w.peer, now)
        except TransportError as exc:
            return [Completion(w.write_id, str(exc))]
        if link.gone:
            return [Completion(w.write_id, link.gone_text)]
        return self._carry(link, link.machine.want(w, now), now)

    def warm(self, peer: str, now: float) -> None:
        """Discover a peer now and open it on the preferred transport, before any request needs it."""
        try:
            link = self._link(peer, now)
        except TransportError as exc:
            log.warning("%s", exc)
            return
        self._carry(link, link.machine.want(None, now), now)

    def poll(self, now: float) -> list[Completion]:
        """Completions from transports that finish asynchronously."""
        if self._next_poll is None or now < self._next_poll:
            return []
        done: list[Completion] = []
        pending = 0
        for name, transport in self.transports.items():
            done += [dataclasses.replace(c, transport=name) for c in transport.poll()]
            pending += transport.pending()
        if pending:
            self._poll_delay = POLL_MIN_S if done else min(self._poll_delay * 2, POLL_MAX_S)
            self._next_poll = now + self._poll_delay
        else:
            self._next_poll = None
        return self._settled(done, now)

    def _settled(self, done: list[Completion], now: float) -> list[Completion]:
        """Tell each write's link it completed; a failed one makes the peer be asked again."""
        out = list(done)
        for c in done:
            found = self.writes.pop(c.write_id, None)
            if found is not None:
                link = found[0]
                failed = c.error is not None and not c.refused
                out += self._carry(link, link.machine.completed(c.write_id, failed, now), now)
        return out

    def _choose(self, requested: str, info: PeerInfo) -> str:
        return choose(
            requested,
            self.config.transport.prefer,
            local_memory=self.memory,
            peer_memory=info.memory,
            same_host=info.host_id == host_id(),
        )

    def _post(self, link: Link, w: Write, info: PeerInfo, now: float) -> list[Completion]:
        name = self._choose(w.transport, info)
        try:
            transport = self._open(link, name, info)
        except (TransportError, TransportUnavailable) as exc:
            return [Completion(w.write_id, f"transport {name} to {link.endpoint}: {exc}", transport=name)]
        self.writes[w.write_id] = (link, name)
        for key in w.requests:
            if self.generations.setdefault(key, info.generation) != info.generation:
                self.generations[key] = MIXED
        link.machine.posted(w.write_id, now)
        done = transport.post(w.write_id, link.endpoint, w.layer, w.runs)
        if done is not None:
            return self._settled([dataclasses.replace(done, transport=name)], now)
        self._poll_delay = POLL_MIN_S
        self._next_poll = now + POLL_MIN_S
        return []

    def _open(self, link: Link, name: str, info: PeerInfo) -> Transport:
        """The transport ``name``, open on ``link``'s peer; raises TransportError/TransportUnavailable."""
        transport = self.transport(name)
        if name not in link.opened:
            transport.open_peer(link.endpoint, info)
            link.opened.add(name)
            log.info("peer %s (%s rank %d) open on %s", link.endpoint, info.group, info.rank, name)
        return transport

    def _drop(self, link: Link, now: float) -> None:
        """Close every transport opened on the link's peer. Writes in flight on them complete
        as failed from the transport's next poll."""
        for name in link.opened:
            transport = self.transports.get(name)
            if transport is not None:
                try:
                    transport.close_peer(link.endpoint)
                except (TransportError, TransportUnavailable) as exc:
                    log.warning("closing peer %s on %s: %s", link.endpoint, name, exc)
                if transport.pending():  # what was in flight on it completes at the next poll
                    self._next_poll = now
        link.opened.clear()

    # -- the machine's effects ----------------------------------------------------------

    def _carry(self, link: Link, effects: list[LinkEffect], now: float) -> list[Completion]:
        done: list[Completion] = []
        queue = list(effects)
        while queue:
            eff = queue.pop(0)
            if isinstance(eff, Ask):
                try:
                    sockets.send(link.sock, PeerQuery(self.group, self.rank))
                except zmq.Again:
                    queue += link.machine.blocked(now)
            elif isinstance(eff, Post):
                for w in eff.writes:
                    done += self._post(link, w, eff.info, now)
            elif isinstance(eff, Fail):
                done += [Completion(w.write_id, eff.reason) for w in eff.writes]
            elif isinstance(eff, Drop):
                self._drop(link, now)
            elif isinstance(eff, Warm):
                if self.local is not None:
                    name = self._choose("auto", eff.info)
                    try:
                        self._open(link, name, eff.info)
                    except (TransportError, TransportUnavailable) as exc:
                        log.warning("could not open peer %s on %s ahead of time: %s", link.endpoint, name, exc)
            elif isinstance(eff, Close):
                log.info("%s: closing the link", eff.reason)
                self._close_link(link, now)
            elif isinstance(eff, Note):
                log.warning("%s", eff.text)
        return done

    def _close_link(self, link: Link, now: float) -> None:
        self._drop(link, now)
        if link.monitor is not None:
            self.service.unwatch(link.monitor)
            link.sock.disable_monitor()
            link.monitor.close()
            link.monitor = None
        self.service.unwatch(link.sock)
        link.sock.close()
        if self.links.get(link.group.name) is link:
            del self.links[link.group.name]
        self.answers = [(lk, m) for lk, m in self.answers if lk is not link]

    # -- notices to decode daemons ----------------------------------------------------

    def notify(self, peer: str, msg: KVReady | TransferResult, now: float) -> None:
        """Send a request's notice to its decode rank; a KVReady names the registration its bytes
        went into (the current one if it wrote none), so the decode daemon can refuse a stale one."""
        written = self.generations.pop(msg.key, None)
        try:
            link = self._link(peer, now)
        except TransportError as exc:
            log.error("%s; dropped %s", exc, msg)
            return
        if isinstance(msg, KVReady):
            held = link.machine.info
            msg = dataclasses.replace(msg, generation=written or (held.generation if held is not None else ""))
        link.machine.last_used = now
        self._keep(link.group.name, msg)
        self._send_notice(link, msg)

    def _keep(self, group: str, msg: Notice) -> None:
        self.unconfirmed[(group, msg.key)] = msg
        self.unconfirmed.move_to_end((group, msg.key))
        while len(self.unconfirmed) > MAX_UNCONFIRMED:
            (lost_group, _), lost = self.unconfirmed.popitem(last=False)
            log.error(
                "%d notices unconfirmed: no longer keeping %s for decode %r (it is not sent again)",
                MAX_UNCONFIRMED,
                lost,
                lost_group,
            )

    def _send_notice(self, link: Link, msg: Notice) -> None:
        try:
            sockets.send(link.sock, msg)
        except zmq.Again:
            log.error("decode daemon %s is not taking messages; %s goes again when it connects", link.endpoint, msg)

    def _resend(self, link: Link) -> None:
        """Every notice for ``link``'s decode group it has not confirmed, again (its daemon
        connected anew: the one that was sent them may have died before reading them)."""
        again = [m for (group, _), m in self.unconfirmed.items() if group == link.group.name]
        if again:
            log.info("sending %d unconfirmed notices to %s again", len(again), link.machine.s.name)
        for msg in again:
            self._send_notice(link, msg)

    # -- discovery -------------------------------------------------------------------------

    def report(self) -> dict[str, dict[str, object]]:
        """Each link's state, for the status reply."""
        return {
            name: {
                "state": link.machine.state.value,
                "open_on": sorted(link.opened),
                "waiting": len(link.machine.waiting),
                "inflight": len(link.machine.inflight),
                "unconfirmed": sum(1 for group, _ in self.unconfirmed if group == name),
            }
            for name, link in self.links.items()
        }

    def _link(self, peer: str, now: float) -> Link:
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
            kv, t = self.config.kv, self.config.timeouts
            layout = CacheLayout(kv.num_layers, kv.num_blocks, kv.block_bytes(group.world_size), kv.planes)
            settings = LinkSettings(
                f"decode {group.name!r} rank {self.rank} at {endpoint}", t.peer_s, RETRY_S, t.peer_idle_s
            )
            link = self.links[group.name] = Link(endpoint, sock, group, layout, PeerLink(settings, now))
            self.service.watch(sock, lambda: self._on_link(link))
            link.monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            self.service.watch(link.monitor, lambda: self._on_monitor(link))
            self._resend(link)  # notices kept from an earlier link to this group (it closed idle)
        return link

    def _on_monitor(self, link: Link) -> None:
        """The link's connection opened or closed."""
        assert link.monitor is not None
        while link.monitor.poll(0):
            event = recv_monitor_message(link.monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED and not link.gone:
                link.gone = True
                log.warning("%s: writes for it fail until it connects again", link.gone_text)
            elif event == zmq.EVENT_CONNECTED and link.gone:
                link.gone = False
                log.info("%s connected again", link.machine.s.name)
                self._resend(link)

    def _on_link(self, link: Link) -> None:
        for inbound in sockets.receive(link.sock, max_frame=self.max_frame, router=False):
            if inbound.msg is None:
                log.error("bad frame from peer %s: %s", link.endpoint, inbound.error)
            else:
                self.answers.append((link, inbound.msg))

    def handle_answers(self, now: float) -> list[Completion]:
        """Act on what peers said since the last call."""
        done: list[Completion] = []
        answers, self.answers = self.answers, []
        for link, msg in answers:
            machine = link.machine
            if isinstance(msg, Received):
                self.unconfirmed.pop((link.group.name, msg.key), None)
                continue
            if isinstance(msg, PeerInfo):
                effects = machine.answered(msg, self._mismatch(link, msg), now)
            elif isinstance(msg, Error) and msg.code is ErrorCode.NOT_REGISTERED:
                effects = machine.not_registered(now)
            elif isinstance(msg, Error):
                effects = machine.refused(msg.detail, now)
            else:
                effects = [Note(f"unexpected {type(msg).__name__} from peer {link.endpoint}")]
            done += self._carry(link, effects, now)
        return done

    def tick(self, now: float) -> list[Completion]:
        done: list[Completion] = []
        for link in list(self.links.values()):
            due = link.machine.next_deadline()
            if due is not None and now >= due:
                done += self._carry(link, link.machine.on_timer(now), now)
        return done + self.poll(now)

    def next_wakeup(self) -> float | None:
        times = [self._next_poll] if self._next_poll is not None else []
        times += [t for link in self.links.values() if (t := link.machine.next_deadline()) is not None]
        return min(times, default=None)

    def _mismatch(self, link: Link, info: PeerInfo) -> str | None:
        """Why a PeerInfo is not what the config says this peer holds, if it is not."""
        if info.group != link.group.name or info.rank != self.rank:
            return f"answered as {show(info.group)} rank {info.rank}"
        if info.memory != link.group.memory:
            return f"its cache is in {info.memory} memory; the config says {link.group.memory}"
        if info.layout != link.layout:
            return f"its cache is {info.layout}; the config describes {link.layout}"
        return None

    def close(self) -> None:
        self.close_transports()
        for link in list(self.links.values()):
            self._close_link(link, 0.0)
        self.links.clear()
