"""A prefill rank's link to one decode peer, as a pure, table-driven state machine.

A *link* is what a prefill rank knows of its rank of one decode group: whether
it has that peer's :class:`PeerInfo` (the cache it writes into), whether a
question is out, which writes wait for the answer, how many of its writes are
in flight (a count, so it is not closed under them: what each write carries is
the rank core's table alone, :mod:`kvxferd.core.writes`), and when the link
was last used. The shell (:mod:`kvxferd.runtime.peers`) owns the
socket and the transports; it feeds this machine events with ``now`` and
carries out the effects it returns, in order. Nothing here reads a clock.

::

    IDLE --want--> ASKING --info--> READY --write failed--> STALE --want--> ASKING
      ^              |  ^  \\                                   |
      |   not registered |   deadline / refused / bad info       |
      |              v  |     (queued writes fail)               |
      +----------- BACKOFF --retry--+                            |
                     ^  ASKING --unanswered, warm (queued writes fail)
    IDLE / READY / STALE --idle for idle_s--> CLOSED <-----------+
    READY --want, for another registration than the one known--> ASKING

- IDLE: nothing known of the peer's cache and no question out.
- ASKING: a PeerQuery is out; writes queue until the answer or the deadline.
  Asked from READY (a write named another registration), the PeerInfo known
  stays until the answer (or while the question waits in BACKOFF to be sent
  again), and so do the transports opened on it: writes in flight there
  complete as they would. An answer that no cache is registered drops it.
- BACKOFF: the peer answered that its engine has no cache yet, or the query
  could not be sent; it is asked again at ``retry_at``. The deadline set when
  the first question went out still runs. Also where a *warm* link (one opened
  ahead of any write, at registration) goes when its question is unanswered: a
  question can be lost on the way (a peer's ROUTER drops what comes under a
  name it still holds for a session that ended), and a warm link should not go
  quiet until a write needs it. It asks again after ``retry_s``, doubling with
  every unanswered question up to ``answer_s``, as long as the next question
  goes before the link would idle out; then it gives up as an unused link
  does. A PeerInfo resets the backoff; "no cache yet" does not (a warm link
  whose peer's engine has not registered asks every ``retry_s`` until the first
  deadline, then ever less often), and the backoff never holds a write: while
  one waits, "no cache yet" is asked again every ``retry_s`` until its
  deadline. A write that comes while such a link backs off, or the peer's
  connection coming back, asks at once; a link that gave up (deadline,
  refusal, a PeerInfo that does not fit) starts its backoff over. A link
  without warm-up goes IDLE and the next write asks.
- READY: the PeerInfo is known; a write goes at once, unless it names another
  registration than the one known (its blocks were reserved in a cache the
  peer's engine registered before or after this PeerInfo): then the peer is
  asked again, and the write waits for the answer.
- STALE: a write failed for a reason that may be the peer's (its engine may
  have registered a new cache), or the peer's connection came back after it
  closed (it may be a new run of the daemon, with a new registration): the
  PeerInfo is asked again before the next write, and the transports opened on
  the old one are dropped, so no write goes into a registration decode no
  longer holds.
- CLOSED: the link sat unused for ``idle_s`` with nothing queued or in flight;
  the shell closes its socket and transports, and a later write opens a new
  link. Closed is final.

A PeerInfo that differs from the one held (the decode engine registered a new
cache and its daemon pushed the new one) replaces it, and the transports
opened on the old one are dropped first. A write is released only into the
registration it names (``Write.generation``; "" names none): one that names
another than the PeerInfo answered fails, since the decode engine reserved its
blocks in a cache it no longer holds there (or not yet, as far as this rank can
tell), and the same block ids may belong to other requests in the new one. A
PeerInfo that does not match the config (checked by the shell, which knows the
config) fails the queued writes and forgets the peer. Events a state does not list are ignored and reported as
a :class:`Note`, never raised: they come from outside.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kvxferd.core.effects import Write
from kvxferd.protocol import PeerInfo
from kvxferd.protocol.fields import show


class LinkState(enum.Enum):
    IDLE = "idle"
    ASKING = "asking"
    BACKOFF = "backoff"
    READY = "ready"
    STALE = "stale"
    CLOSED = "closed"


class LinkEvent(enum.Enum):
    WANT = "want"  # a write (or a warm-up) needs the peer
    OTHER_REGISTRATION = "other_registration"  # a write names a registration the PeerInfo held is not
    INFO = "info"  # a PeerInfo that matches the config
    BAD_INFO = "bad_info"  # a PeerInfo that does not
    NOT_REGISTERED = "not_registered"  # the peer's engine has no cache yet
    REFUSED = "refused"  # any other error the peer answered
    BLOCKED = "blocked"  # the query could not be sent (the socket would block)
    RETRY = "retry"  # retry_at passed
    DEADLINE = "deadline"  # the answer's deadline passed
    UNANSWERED = "unanswered"  # the same, on a warm link not yet idle: ask again after a backoff
    WRITE_FAILED = "write_failed"  # a posted write failed for a reason that may be the peer's
    RECONNECTED = "reconnected"  # the connection came back after it closed: the peer may be a new run
    IDLE_OUT = "idle_out"  # unused for idle_s, nothing queued or in flight


L, E = LinkState, LinkEvent

#: state -> event -> next state. An event a state does not list is ignored (and noted).
TRANSITIONS: dict[LinkState, dict[LinkEvent, LinkState]] = {
    L.IDLE: {E.WANT: L.ASKING, E.INFO: L.READY, E.BAD_INFO: L.IDLE, E.IDLE_OUT: L.CLOSED},
    L.ASKING: {
        E.WANT: L.ASKING,
        E.RECONNECTED: L.ASKING,
        E.INFO: L.READY,
        E.BAD_INFO: L.IDLE,
        E.NOT_REGISTERED: L.BACKOFF,
        E.REFUSED: L.IDLE,
        E.BLOCKED: L.BACKOFF,
        E.DEADLINE: L.IDLE,
        E.UNANSWERED: L.BACKOFF,
    },
    L.BACKOFF: {
        E.WANT: L.BACKOFF,
        E.INFO: L.READY,
        E.BAD_INFO: L.IDLE,
        E.NOT_REGISTERED: L.BACKOFF,
        E.REFUSED: L.IDLE,
        E.RETRY: L.ASKING,
        E.DEADLINE: L.IDLE,
        E.UNANSWERED: L.BACKOFF,
    },
    L.READY: {
        E.WANT: L.READY,
        E.OTHER_REGISTRATION: L.ASKING,
        E.INFO: L.READY,
        E.BAD_INFO: L.IDLE,
        E.WRITE_FAILED: L.STALE,
        E.RECONNECTED: L.STALE,
        E.IDLE_OUT: L.CLOSED,
    },
    L.STALE: {E.WANT: L.ASKING, E.INFO: L.READY, E.BAD_INFO: L.IDLE, E.IDLE_OUT: L.CLOSED},
    L.CLOSED: {},
}


# -- effects ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ask:
    """Send a PeerQuery on the link; report ``blocked(now)`` if it cannot be sent."""


@dataclass(frozen=True, slots=True)
class Start:
    """Start ``writes`` on the peer whose cache ``info`` describes."""

    writes: tuple[Write, ...]
    info: PeerInfo


@dataclass(frozen=True, slots=True)
class Fail:
    """``writes`` never started: complete each as failed with ``reason``."""

    writes: tuple[Write, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class Drop:
    """Close every transport opened on the peer: the cache they point at is no longer the peer's."""

    reason: str


@dataclass(frozen=True, slots=True)
class Warm:
    """Open the preferred transport on the peer now, before a write needs it."""

    info: PeerInfo


@dataclass(frozen=True, slots=True)
class Close:
    """Close the link: its socket and every transport opened on the peer."""

    reason: str


@dataclass(frozen=True, slots=True)
class Note:
    """Something to log: an event the link did not expect, or why it changed."""

    text: str


LinkEffect = Ask | Start | Fail | Drop | Warm | Close | Note


@dataclass(frozen=True, slots=True)
class LinkSettings:
    name: str  # for reasons: "decode 'decode' rank 0 at ipc://..."
    answer_s: float = 10.0  # a PeerQuery must be answered within this
    retry_s: float = 0.02  # ask again this soon after "no cache registered yet"
    idle_s: float = 300.0  # close a link unused this long


@dataclass
class PeerLink:
    """One link's state. Every input is a method taking ``now``; each returns the effects."""

    s: LinkSettings
    last_used: float
    state: LinkState = LinkState.IDLE
    info: PeerInfo | None = None
    waiting: list[Write] = field(default_factory=list)
    inflight: int = 0  # writes posted and not yet completed
    deadline: float | None = None  # for the answer to the question out
    retry_at: float | None = None
    warm: bool = False  # open the preferred transport as soon as the peer's cache is known
    misses: int = 0  # deadlines missed in a row (a warm link's backoff doubles with each)
    unregistered: bool = False  # the peer answered "no cache yet" since the deadline was set

    # -- inputs ---------------------------------------------------------------------------

    def want(self, write: Write | None, now: float) -> list[LinkEffect]:
        """A write needs the peer (``None``: warm it up, open it before any write does)."""
        self.last_used = now
        if write is None:
            self.warm = True
        prior = self.state
        if not self._step(E.WANT):
            return self._ignored(E.WANT)
        if self.state is L.READY:
            assert self.info is not None
            if write is None:
                return [Warm(self.info)]
            if write.generation in ("", self.info.generation):
                return [Start((write,), self.info)]
            self._step(E.OTHER_REGISTRATION)  # the peer may have registered since: ask, then decide
            self.waiting.append(write)
            return self._ask(now)
        if write is not None:
            self.waiting.append(write)
        if prior is L.STALE:
            self.info = None
            return [Drop(f"a write to {self.s.name} failed; asking for its cache again"), *self._ask(now)]
        if prior is L.IDLE:
            return self._ask(now)
        if prior is L.BACKOFF and write is not None and self.misses and self._step(E.RETRY):
            # a warm link backing off after unanswered questions: a write wants the peer now, not
            # after the backoff (its engine may have come back meanwhile); the cadence starts over
            self.misses, self.deadline = 0, None
            return self._ask(now)
        return []  # a question is out already, or goes within retry_s: wait for its answer

    def answered(self, info: PeerInfo, problem: str | None, now: float) -> list[LinkEffect]:
        """The peer sent ``info`` (asked or pushed); ``problem``: why it does not match the config."""
        self.last_used = now
        if problem is not None:
            if not self._step(E.BAD_INFO):
                return self._ignored(E.BAD_INFO)
            return self._forget(f"{self.s.name}: {problem}")
        if not self._step(E.INFO):
            return self._ignored(E.INFO)
        effects: list[LinkEffect] = []
        if self.info is not None and self.info != info:
            effects.append(Drop(f"{self.s.name} registered a new cache"))
        self.info, self.deadline, self.retry_at, self.misses = info, None, None, 0
        if self.warm:
            effects.append(Warm(info))
        waiting, self.waiting = self.waiting, []
        fits = tuple(w for w in waiting if w.generation in ("", info.generation))
        if fits:
            effects.append(Start(fits, info))
        for gen in dict.fromkeys(w.generation for w in waiting if w.generation not in ("", info.generation)):
            reason = (
                f"its blocks were reserved in registration {show(gen)} of {self.s.name}; that rank holds "
                f"registration {show(info.generation)} now"
            )
            effects.append(Fail(tuple(w for w in waiting if w.generation == gen), reason))
        return effects

    def not_registered(self, now: float) -> list[LinkEffect]:
        """The peer answered that its engine has not registered a cache yet: ask again soon."""
        if not self._step(E.NOT_REGISTERED):
            return self._ignored(E.NOT_REGISTERED)
        self.retry_at = now + self._backoff()
        self.unregistered = True
        if self.info is not None:  # asked again while it held one: that cache is gone
            self.info = None
            return [Drop(f"{self.s.name} has no cache registered now")]
        return []

    def refused(self, detail: str, now: float) -> list[LinkEffect]:
        """The peer answered with an error. While a question is out, the queued writes fail."""
        if not self._step(E.REFUSED):
            return [Note(f"{self.s.name} answered an error: {detail}")]
        return self._forget(f"{self.s.name} refused: {detail}")

    def blocked(self, now: float) -> list[LinkEffect]:
        """The query could not be sent (the socket would block): try again at the retry time."""
        if not self._step(E.BLOCKED):
            return self._ignored(E.BLOCKED)
        self.retry_at = now + self._backoff()
        return []

    def posted(self, now: float) -> None:
        """A write the link released (in a :class:`Start`) went to the transport."""
        self.inflight += 1
        self.last_used = now

    def writes_lost(self) -> None:
        """Every transport was closed: no posted write will complete (the core ends their requests)."""
        self.inflight = 0

    def completed(self, failed: bool, now: float) -> list[LinkEffect]:
        """A posted write finished. ``failed``: for a reason that may be the peer's (not one of
        our own checks refusing it before it started)."""
        self.inflight = max(0, self.inflight - 1)
        self.last_used = now
        if not failed or not self._step(E.WRITE_FAILED):
            return []  # one failure is enough: it is stale already, or a question is out
        return [Note(f"a write to {self.s.name} failed; its cache will be asked for again")]

    def reconnected(self, now: float) -> list[LinkEffect]:
        """The peer's connection came back after it closed: ask for its cache before writing again
        (a question out went, or was answered, on the connection that closed: it is asked again)."""
        self.last_used = now
        asking = self.state is L.ASKING
        if self.state is L.BACKOFF and self.misses and self._step(E.RETRY):
            # a warm link backing off after unanswered questions: its peer is back, ask now
            self.misses, self.deadline = 0, None
            return [Note(f"{self.s.name} connected again while backing off: asking now"), *self._ask(now)]
        if not self._step(E.RECONNECTED):
            return []  # nothing known to be stale: the next write asks anyway
        if asking:
            return [Note(f"{self.s.name} connected again while asked: asking again"), *self._ask(now)]
        return [Note(f"{self.s.name} connected again; its cache will be asked for before the next write")]

    def on_timer(self, now: float) -> list[LinkEffect]:
        """Whatever is due at ``now``: the answer's deadline, a retry, closing when idle."""
        if self.deadline is not None and now >= self.deadline:
            if self.unregistered:
                reason = f"{self.s.name} had no cache registered by its engine within {self.s.answer_s:g}s"
            else:
                reason = f"{self.s.name} did not answer within {self.s.answer_s:g}s"
            backoff, misses = self._warm_backoff(), self.misses
            if self.warm and now + backoff < self.last_used + self.s.idle_s and self._step(E.UNANSWERED):
                effects = self._forget(reason)
                self.misses = misses + 1
                self.retry_at = now + backoff
                self.deadline = now + backoff + self.s.answer_s  # the next question's
                return effects
            if self._step(E.DEADLINE):
                return self._forget(reason)
        if self.retry_at is not None and now >= self.retry_at and self._step(E.RETRY):
            return self._ask(now)
        idle_at = self._idle_at()
        if idle_at is not None and now >= idle_at and self._step(E.IDLE_OUT):
            self.info = None
            return [Close(f"{self.s.name} unused for {self.s.idle_s:g}s")]
        return []

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` has something to do next, if ever."""
        times = [t for t in (self.deadline, self.retry_at, self._idle_at()) if t is not None]
        return min(times, default=None)

    # -- internals ------------------------------------------------------------------------

    def _backoff(self) -> float:
        """How long to wait before asking again: ``retry_s`` while a write waits for the answer
        (it is failed at the deadline, never kept waiting past it by a backoff), else a warm
        link's backoff."""
        return self.s.retry_s if self.waiting else self._warm_backoff()

    def _warm_backoff(self) -> float:
        """``retry_s``, doubled for every deadline a warm link's questions missed in a row, at
        most ``answer_s``."""
        return min(self.s.retry_s * (1 << min(self.misses, 32)), self.s.answer_s)  # (no float overflow)

    def _idle_at(self) -> float | None:
        if self.waiting or self.inflight or E.IDLE_OUT not in TRANSITIONS[self.state]:
            return None
        return self.last_used + self.s.idle_s

    def _step(self, event: LinkEvent) -> bool:
        """Move along the table; False (and no change) if ``event`` is not one of this state's."""
        target = TRANSITIONS[self.state].get(event)
        if target is None:
            return False
        self.state = target
        return True

    def _ignored(self, event: LinkEvent) -> list[LinkEffect]:
        return [Note(f"{self.s.name}: {event.value} ignored while {self.state.value}")]

    def _ask(self, now: float) -> list[LinkEffect]:
        if self.deadline is None:
            self.deadline, self.unregistered = now + self.s.answer_s, False
        self.retry_at = None
        return [Ask()]

    def _forget(self, reason: str) -> list[LinkEffect]:
        """Back to IDLE: the queued writes fail with ``reason``; what was known of the peer goes."""
        waiting, self.waiting = self.waiting, []
        self.deadline = self.retry_at = None
        self.info, self.misses = None, 0
        effects: list[LinkEffect] = [Note(reason), Drop(reason)]
        if waiting:
            effects.append(Fail(tuple(waiting), reason))
        return effects
