"""A prefill daemon's decode peers: the shell around :class:`kvxferd.core.peer.PeerLink`.

Theory of operation: a peer is a decode rank's daemon, in a decode group of
the config, which a request's ``peer`` names (by the group's name or its
endpoint template; anything else is refused, so a cache_info can never send
writes or notices anywhere the config does not list). Which ranks of that
group this rank writes into, and which bytes of each block, is the config's
rank map (:mod:`kvxferd.core.rankmap`): rank r of ours alone when both groups
have the same size; several (a slice of each block, its heads, into each)
when the decode group is larger; one (its heads into a slice of each decode
block) when it is smaller; none when another replica of its heads writes
them. There is one link per decode rank written, and a ``peer`` string is
resolved to its targets once.

**Fan-out.** A write of the core goes to every target: one transport write
per link, each with an id of its own, and the core hears of its write once,
when the last of them completed (failed if any failed, naming it). A notice
goes to every target too, each with that decode rank's number, and an ok
result waits for every one of them to confirm (:mod:`kvxferd.core.ledger`).

What a link knows and when it asks (the PeerInfo, the question out, the
writes waiting for the answer, idleness) is the pure state machine in
:mod:`kvxferd.core.peer`; this module owns its DEALER socket and the
transports, feeds the machine events with ``now`` and carries out what it
returns. The PeerInfo is checked here against the group's layout and memory,
since only the shell knows the config.

**Routes.** Once a link knows its peer's cache, the transport each requested
name maps to (:func:`kvxferd.transports.choose`) is decided and opened once for
that PeerInfo, under a key that names its registration (``endpoint#generation``),
and every write goes straight to it. A transport's completion names that key,
so it says which link and which decode registration the write went into
without this shell remembering any write: the core's table of writes in
flight is the only one. A new PeerInfo (the decode engine registered again)
drops the routes of the old one.

A link watches its socket's connection (a ZMQ socket monitor): once the decode
daemon's connection closes, writes for it fail at once, "decode rank N at
ENDPOINT is gone", instead of going into memory nobody will report on; when it
connects again they go as before, and the notices it never confirmed are sent
again (:mod:`kvxferd.core.ledger`).
"""

from __future__ import annotations

import logging
import socket as pysocket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from kvxferd.config import Config, GroupConfig
from kvxferd.core import Problem, ToEngine, Write
from kvxferd.core.ledger import LedgerEffect, Notice, NoticeLedger, Report, as_failed
from kvxferd.core.memory import Memory
from kvxferd.core.peer import Ask, Close, Drop, Fail, LinkEffect, LinkSettings, Note, PeerLink, Start, Warm
from kvxferd.core.rankmap import Cut
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
)
from kvxferd.protocol.fields import show
from kvxferd.runtime import sockets
from kvxferd.runtime.service import Service
from kvxferd.transports import Completion, Transport, choose, load

log = logging.getLogger(__name__)

POLL_MIN_S = 50e-6
POLL_MAX_S = 2e-3
RETRY_S = 0.02  # a peer that is up but has no cache registered yet is asked again after this
#: a link whose connection closed and did not come back within this long gets a new socket (libzmq
#: does not reconnect a session it ended on a protocol error, say an oversize frame), and again
RENEW_S = 1.0
#: notices kept until their decode daemon confirms them (the oldest is given up past this)
MAX_UNCONFIRMED = 8192
#: route keys remembered (a few per decode rank: one per registration of its cache lately)
MAX_ROUTE_KEYS = 256
#: transport write ids of fanned-out writes start here (the core's own ids stay far below)
FIRST_PART_ID = 1 << 62


@cache
def host_id() -> str:
    """Identifies this machine for this boot: peers with the same id share memory."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{pysocket.gethostname()}/{boot}"[:256]


@dataclass(frozen=True, slots=True)
class Route:
    """Where a write to a link goes: the transport (opened on the peer under ``key``), and the
    decode registration (``generation``) that key names."""

    name: str
    transport: Transport
    key: str
    generation: str


@dataclass
class Link:
    """The link to one decode rank: the machine, and the plumbing it drives."""

    endpoint: str
    sock: zmq.Socket[bytes]
    group: GroupConfig
    rank: int  # the decode rank
    cut: Cut | None  # the bytes of each block this rank writes there (None: whole blocks)
    layout: CacheLayout  # what its PeerInfo must describe
    machine: PeerLink
    monitor: zmq.Socket[bytes] | None = None  # connection events of ``sock``
    gone: bool = False  # the peer's connection closed and has not come back
    renew_at: float | None = None  # while gone: when the link gets a new socket
    key: str = ""  # the key its peer is open under on ``open_on`` (endpoint#generation)
    open_on: set[str] = field(default_factory=set)  # transports its peer is open on, for one PeerInfo
    routes: dict[str, Route] = field(default_factory=dict)  # requested transport -> route, for that PeerInfo

    @property
    def name(self) -> str:
        """``group:rank``: the key of its link, its ledger entries and its status."""
        return f"{self.group.name}:{self.rank}"

    @property
    def gone_text(self) -> str:
        return f"{self.machine.s.name} is gone (its connection closed)"


@dataclass
class _Fan:
    """A write of the core fanned out to several links: what is left of it."""

    parts: int
    left: int
    error: str | None = None
    transport: str | None = None
    generations: dict[int, str] = field(default_factory=dict)  # decode rank -> registration written


class Peers:
    def __init__(self, service: Service, config: Config, *, group: str, rank: int, memory: str) -> None:
        self.service = service
        self.config = config
        self.group, self.rank, self.memory = group, rank, memory
        self.max_frame = config.limits.max_frame_bytes
        self.links: dict[str, Link] = {}  # group:rank -> the link to that decode rank
        #: a request's peer -> the decode group it names (only strings that name one are kept: at most
        #: two per decode group of the config, its name and its endpoint template)
        self.names: dict[str, GroupConfig] = {}
        #: decode group -> the decode ranks this rank writes into, and what of each block
        self.targets: dict[str, dict[int, Cut | None]] = {}
        #: fanned-out writes: transport write id -> the core's, and the core's -> what is left
        self.parts: dict[int, tuple[int, int]] = {}
        self.fans: dict[int, _Fan] = {}
        self._next_part = FIRST_PART_ID
        #: route key (endpoint#generation) -> (link, generation): where a completion's write went (the
        #: keys of earlier registrations stay a while, for writes that complete after a new one)
        self.opened: Memory[str, tuple[Link, str]] = Memory(limit=MAX_ROUTE_KEYS)
        self.transports: dict[str, Transport] = {}
        self.local: RegisterCache | None = None
        self.answers: list[tuple[Link, Message]] = []  # collected by the socket handlers
        #: notices kept until decode confirms them, with the ok results that wait for that
        self.ledger = NoticeLedger(MAX_UNCONFIRMED, confirm_s=config.timeouts.peer_s)
        #: where an ok result goes once its decode rank confirmed it (the prefill daemon sets it)
        self.on_report: Callable[[ToEngine], None] = lambda result: None
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
            link.routes.clear()
            link.open_on.clear()
            link.machine.writes_lost()
        self.opened.clear()
        self.parts.clear()  # (the core ends the writes they were parts of)
        self.fans.clear()

    def transport(self, name: str) -> Transport:
        found = self.transports.get(name)
        if found is None:
            assert self.local is not None, "writes exist only once a cache is registered"
            found = self.transports[name] = load(name)(self.config.transport, self.local)
            found.interrupted = self._waiting
            log.info("transport %s ready", name)
        return found

    def cancel(self, reason: str) -> None:
        """No more bytes of the writes in flight, where a transport can stop them (see
        Transport.cancel); they complete as failed with ``reason``."""
        for transport in self.transports.values():
            transport.cancel(reason)
        self._next_poll = time.monotonic()  # (their failures at the next turn)

    def _waiting(self) -> bool:
        """Whether any socket of the daemon has something to read (a transport copying in poll
        stops for it)."""
        return bool(self.service.poller.poll(0))

    # -- writes --------------------------------------------------------------------

    def group_of(self, peer: str) -> GroupConfig:
        """The decode group a request's ``peer`` names; TransportError if none does."""
        group = self.names.get(peer)
        if group is not None:
            return group
        group = self.config.decode_group_named(peer)
        if group is not None:
            self.names[peer] = group
        else:
            names = ", ".join(g.name for g in self.config.groups if g.role == "decode") or "none"
            raise TransportError(f"peer {show(peer)} names no decode group of this deployment (decode groups: {names})")
        return group

    def targets_of(self, group: GroupConfig) -> dict[int, Cut | None]:
        """The decode ranks of ``group`` this rank writes into, and what of each block (the rank
        map, decided by the config at load)."""
        found = self.targets.get(group.name)
        if found is None:
            prefill = self.config.group(self.group)
            found = self.targets[group.name] = self.config.cuts(prefill, self.rank, group)
        return found

    def write(self, w: Write, now: float) -> list[Completion]:
        """Post ``w`` to every decode rank this rank writes into; its completion comes once all
        of them completed (at once, if it goes nowhere: another replica writes those heads)."""
        try:
            links = self._links(w.peer, now)
        except TransportError as exc:
            return [Completion(w.write_id, str(exc))]
        if len(links) == 1:  # the common case: the core's write is the transport's
            return self._joined(self._post(links[0], w, w.write_id, now))
        if not links:
            return [Completion(w.write_id)]
        self.fans[w.write_id] = _Fan(len(links), len(links))
        done: list[Completion] = []
        for link in links:
            part, self._next_part = self._next_part, self._next_part + 1
            self.parts[part] = (w.write_id, link.rank)
            done += self._post(link, w, part, now)
        return self._joined(done)

    def _post(self, link: Link, w: Write, write_id: int, now: float) -> list[Completion]:
        """Write ``w`` (as transport write ``write_id``) to ``link``'s decode rank, into the
        registration its blocks were reserved in there."""
        generation = w.generations[link.rank] if link.rank < len(w.generations) else ""
        if link.gone:
            return [Completion(write_id, link.gone_text)]
        same = write_id == w.write_id and generation == w.generation
        mine = (
            w
            if same
            else Write(  # (dataclasses.replace costs µs; by name, so a field added or moved cannot shift them)
                write_id=write_id,
                peer=w.peer,
                transport=w.transport,
                layers=w.layers,
                runs=w.runs,
                requests=w.requests,
                nbytes=w.nbytes,
                generations=w.generations,
                generation=generation,
            )
        )
        return self._carry(link, link.machine.want(mine, now), now)

    def _joined(self, done: list[Completion]) -> list[Completion]:
        """Completions as the core knows its writes: the parts of a fanned-out write become one
        completion once the last of them came (its error the first part's that failed)."""
        if not self.parts:
            return done
        out: list[Completion] = []
        for c in done:
            part = self.parts.pop(c.write_id, None)
            if part is None:
                out.append(c)
                continue
            write_id, rank = part
            fan = self.fans[write_id]
            fan.left -= 1
            if c.error is not None and fan.error is None:
                fan.error = c.error
            fan.transport = fan.transport or c.transport
            generation = self.generation_of(c)
            if generation is not None:
                fan.generations[rank] = generation
            if fan.left == 0:
                del self.fans[write_id]
                out.append(Completion(write_id, fan.error, False, fan.transport, _fanned(fan)))
        return out

    def warm(self, peer: str, now: float) -> None:
        """Discover a peer now and open it on the preferred transport, before any request needs it."""
        try:
            links = self._links(peer, now)
        except TransportError as exc:
            log.warning("%s", exc)
            return
        for link in links:
            self._carry(link, link.machine.want(None, now), now)

    def poll(self, now: float) -> list[Completion]:
        """Completions from transports that finish asynchronously."""
        return self._joined(self._poll(now))

    def _poll(self, now: float) -> list[Completion]:
        if self._next_poll is None or now < self._next_poll:
            return []
        done: list[Completion] = []
        pending = 0
        for transport in self.transports.values():
            done += transport.poll()
            pending += transport.pending()
        if pending:  # a transport copying a slice at a time (busy) is polled again at the next turn
            busy = any(transport.busy() for transport in self.transports.values())
            self._poll_delay = POLL_MIN_S if done or busy else min(self._poll_delay * 2, POLL_MAX_S)
            self._next_poll = now if busy else now + self._poll_delay
        else:
            self._next_poll = None
        return self._settled(done, now)

    def generation_of(self, done: Completion) -> str | None:
        """The decode registration a completed write went into (None: it never reached a route);
        for a fanned-out write, each decode rank's in rank order, joined by commas (``notify``
        gives each decode rank its own)."""
        if done.peer is not None and done.peer.startswith(FANNED):
            return done.peer[len(FANNED) :] or None
        found = self.opened.get(done.peer) if done.peer is not None else None
        return found[1] if found is not None else None

    def _settled(self, done: list[Completion], now: float) -> list[Completion]:
        """Tell each write's link it completed; a failed one makes the peer be asked again."""
        out = list(done)
        for c in done:
            found = self.opened.get(c.peer) if c.peer is not None else None
            if found is not None:
                link = found[0]
                failed = c.error is not None and not c.refused
                out += self._carry(link, link.machine.completed(failed, now), now)
        return out

    def _route(self, link: Link, requested: str, info: PeerInfo) -> Route:
        """The route of writes that asked for ``requested`` to the peer ``info`` describes: chosen and
        opened once per PeerInfo. Raises TransportError/TransportUnavailable."""
        route = link.routes.get(requested)
        if route is None:
            name = choose(
                requested,
                self.config.transport.prefer,
                local_memory=self.memory,
                peer_memory=info.memory,
                same_host=info.host_id == host_id(),
            )
            transport = self.transport(name)
            key = f"{link.endpoint}#{info.generation}"
            if name not in link.open_on:
                transport.open_peer(key, info, link.cut)
                link.key = key
                link.open_on.add(name)
                self.opened.put(key, (link, info.generation))
                log.info("peer %s (%s rank %d) open on %s", link.endpoint, info.group, info.rank, name)
            route = link.routes[requested] = Route(name, transport, key, info.generation)
        return route

    def _start(self, link: Link, w: Write, info: PeerInfo, now: float) -> list[Completion]:
        try:
            route = self._route(link, w.transport, info)
        except (TransportError, TransportUnavailable) as exc:
            return [Completion(w.write_id, f"transport {w.transport} to {link.endpoint}: {exc}")]
        link.machine.posted(now)
        done = route.transport.post(w.write_id, route.key, w.layers, w.runs)
        if done is not None:
            return self._settled([done], now)
        self._poll_delay = POLL_MIN_S
        self._next_poll = now if route.transport.busy() else now + POLL_MIN_S
        return []

    def _drop(self, link: Link, now: float) -> None:
        """Close the link's peer on every transport it is open on (its cache is no longer the one
        the routes point at). Writes in flight on them complete as failed from the next poll."""
        for name in link.open_on:
            transport = self.transports.get(name)
            if transport is not None:
                try:
                    transport.close_peer(link.key)
                except (TransportError, TransportUnavailable) as exc:
                    log.warning("closing peer %s on %s: %s", link.key, name, exc)
                if transport.pending():  # what was in flight on it completes at the next poll
                    self._next_poll = now
        link.open_on.clear()
        link.routes.clear()

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
            elif isinstance(eff, Start):
                for w in eff.writes:
                    done += self._start(link, w, eff.info, now)
            elif isinstance(eff, Fail):
                done += [Completion(w.write_id, eff.reason) for w in eff.writes]
            elif isinstance(eff, Drop):
                self._drop(link, now)
            elif isinstance(eff, Warm):
                if self.local is not None:
                    try:
                        self._route(link, "auto", eff.info)
                    except (TransportError, TransportUnavailable) as exc:
                        log.warning("could not open peer %s ahead of time: %s", link.endpoint, exc)
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
        if self.links.get(link.name) is link:
            del self.links[link.name]
        self.answers = [(lk, m) for lk, m in self.answers if lk is not link]

    # -- notices to decode daemons ----------------------------------------------------

    def notify(self, peer: str, msg: Notice, now: float, then: ToEngine | None = None) -> None:
        """Send a request's notice to every decode rank this rank writes into (each with its own
        rank number, and the registration its bytes went into there), kept until each confirms
        it; ``then``, the ok result of a KVReady, goes to ``on_report`` once all did (see
        core.ledger)."""
        try:
            links = self._links(peer, now)
        except TransportError as exc:
            log.error("%s; dropped %s", exc, msg)
            if then is not None:
                self.on_report(as_failed(then, f"{exc}: decode was not told", ErrorCode.UNAVAILABLE))
            return
        generations = msg.generation.split(",") if isinstance(msg, KVReady) else []
        notices: list[tuple[str, Notice]] = []
        for i, link in enumerate(links):
            link.machine.last_used = now
            notice = msg if msg.rank == link.rank else replace(msg, rank=link.rank)
            if isinstance(notice, KVReady) and len(generations) == len(links) > 1:
                notice = replace(notice, generation=generations[i])
            notices.append((link.name, notice))
        self._send(self.ledger.tell_all(notices, now, then))

    def _send(self, effects: list[LedgerEffect]) -> None:
        for eff in effects:
            if isinstance(eff, Problem):
                log.error("%s", eff.detail)
                continue
            if isinstance(eff, Report):
                self.on_report(eff.result)
                continue
            link = self.links.get(eff.link)
            if link is None:
                continue  # no link now: the notice goes when one opens (see _link)
            try:
                sockets.send(link.sock, eff.notice)
            except zmq.Again:
                log.error(
                    "decode daemon %s is not taking messages; %s is kept and sent again", link.endpoint, eff.notice
                )

    # -- discovery -------------------------------------------------------------------------

    def report(self) -> dict[str, dict[str, object]]:
        """Each link's state (by ``group:rank``), for the status reply."""
        return {
            name: {
                "state": link.machine.state.value,
                "connected": not link.gone,
                "open_on": sorted(link.open_on),
                "waiting": len(link.machine.waiting),
                "inflight": link.machine.inflight,
                "unanswered": link.machine.misses,  # deadlines in a row a warm link got no PeerInfo by
                "unconfirmed": self.ledger.unconfirmed(name),
            }
            for name, link in self.links.items()
        }

    def _links(self, peer: str, now: float) -> list[Link]:
        """The links to the decode ranks of the group ``peer`` names that this rank writes into,
        in rank order (one per decode rank, so at most as many links as the config has decode
        ranks); a peer string is resolved once."""
        group = self.group_of(peer)
        links = []
        for rank, cut in self.targets_of(group).items():
            link = self.links.get(f"{group.name}:{rank}")
            links.append(link if link is not None else self._open_link(group, rank, cut, now))
        return links

    def _open_link(self, group: GroupConfig, rank: int, cut: Cut | None, now: float) -> Link:
        endpoint = self.config.peer_endpoint(group, rank)
        try:
            sock = self.service.client_socket(endpoint, f"{self.group}:{self.rank}")
        except zmq.ZMQError as exc:
            raise TransportError(f"cannot connect to decode {group.name!r} rank {rank} at {endpoint}: {exc}") from None
        kv, t = self.config.kv, self.config.timeouts
        layout = CacheLayout(kv.num_layers, kv.num_blocks, kv.block_bytes(group.world_size), kv.planes, kv.order)
        settings = LinkSettings(f"decode {group.name!r} rank {rank} at {endpoint}", t.peer_s, RETRY_S, t.peer_idle_s)
        link = Link(endpoint, sock, group, rank, cut, layout, PeerLink(settings, now))
        self.links[link.name] = link
        self.service.watch(sock, lambda: self._on_link(link))
        link.monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.service.watch(link.monitor, lambda: self._on_monitor(link))
        self._send(self.ledger.reconnected(link.name))  # notices kept from an earlier link (it closed idle)
        return link

    def _on_monitor(self, link: Link) -> None:
        """The link's connection opened or closed."""
        assert link.monitor is not None
        while link.monitor.poll(0):
            event = recv_monitor_message(link.monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED and not link.gone:
                link.gone, link.renew_at = True, time.monotonic() + RENEW_S
                log.warning("%s: writes for it fail until it connects again", link.gone_text)
            elif event == zmq.EVENT_CONNECTED and link.gone:
                link.gone, link.renew_at = False, None
                log.info("%s connected again", link.machine.s.name)
                self._carry(link, link.machine.reconnected(time.monotonic()), time.monotonic())
                again = self.ledger.reconnected(link.name)
                if again:
                    log.info("sending %d unconfirmed notices to %s again", len(again), link.machine.s.name)
                self._send(again)

    def _on_link(self, link: Link) -> None:
        for inbound in sockets.receive(link.sock, max_frame=self.max_frame, router=False):
            if inbound.msg is None:
                log.error("bad frame from peer %s: %s", link.endpoint, inbound.error)
            else:
                self.answers.append((link, inbound.msg))

    def handle_answers(self, now: float) -> list[Completion]:
        """Act on what peers said since the last call."""
        return self._joined(self._answers(now))

    def _answers(self, now: float) -> list[Completion]:
        done: list[Completion] = []
        answers, self.answers = self.answers, []
        for link, msg in answers:
            machine = link.machine
            if isinstance(msg, Received):
                told = self.ledger.confirmed(link.name, msg)
                if told is None:
                    log.debug("confirmation of %s from %s: nothing kept for it", msg, link.endpoint)
                self._send(told or [])
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
            if link.gone and link.renew_at is not None and now >= link.renew_at:
                self._renew(link, now)
        self._send(self.ledger.due(now))  # notices unconfirmed too long: dropped somewhere, again
        return self._joined(done + self._poll(now))

    def next_wakeup(self) -> float | None:
        times = [self._next_poll] if self._next_poll is not None else []
        times += [t for link in self.links.values() if (t := link.machine.next_deadline()) is not None]
        times += [link.renew_at for link in self.links.values() if link.gone and link.renew_at is not None]
        if (again := self.ledger.next_deadline()) is not None:
            times.append(again)
        return min(times, default=None)

    def _renew(self, link: Link, now: float) -> None:
        """A new socket for a link whose connection closed and stayed closed (the old one may never
        reconnect), and again every RENEW_S while it does not connect."""
        link.renew_at = now + RENEW_S
        if link.monitor is not None:
            self.service.unwatch(link.monitor)
            link.sock.disable_monitor()
            link.monitor.close()
        self.service.unwatch(link.sock)
        link.sock.close(linger=0)
        self.answers = [(lk, m) for lk, m in self.answers if lk is not link]
        try:
            link.sock = self.service.client_socket(link.endpoint, f"{self.group}:{self.rank}")
        except zmq.ZMQError as exc:
            log.error("cannot connect to %s again: %s", link.machine.s.name, exc)
            return
        self.service.watch(link.sock, lambda: self._on_link(link))
        link.monitor = link.sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.service.watch(link.monitor, lambda: self._on_monitor(link))
        log.info("%s: a new connection, the old one did not come back", link.machine.s.name)

    def _mismatch(self, link: Link, info: PeerInfo) -> str | None:
        """Why a PeerInfo is not what the config says this peer holds, if it is not."""
        if info.group != link.group.name or info.rank != link.rank:
            return f"answered as {show(info.group)} rank {info.rank}"
        if info.memory != link.group.memory:
            return f"its cache is in {info.memory} memory; the config says {link.group.memory}"
        if info.layout.unpadded() != link.layout:
            return f"its cache is {info.layout}; the config describes {link.layout}"
        return None

    def close(self) -> None:
        self.close_transports()
        for link in list(self.links.values()):
            self._close_link(link, 0.0)
        self.links.clear()


#: the ``peer`` of the completion of a fanned-out write: this, then the registrations it went into
FANNED = "fanned:"


def _fanned(fan: _Fan) -> str:
    """The completion's ``peer`` of a fanned-out write: the registration of each decode rank, in
    rank order, joined by commas (empty where one part never reached a route)."""
    if len(fan.generations) < fan.parts:
        return FANNED
    return FANNED + ",".join(fan.generations[r] for r in sorted(fan.generations))
