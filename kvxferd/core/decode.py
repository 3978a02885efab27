"""A decode rank's core: notices from its prefill ranks, each handed to its one engine once.

Theory of operation
-------------------
A decode daemon moves no data: prefill daemons write into the cache its
engine registered, then send one *notice* per request instance, a KVReady
(naming the registration, its *generation*, its bytes went into) or the failed
result. This core decides what becomes of each notice:

* it must name this decode rank (a notice naming another is dropped);
* a repeat (a prefill rank sends the notices it has no confirmation for again
  when its connection comes back) is confirmed again, as the first was, and
  never handed on twice: the last ``max_seen`` notices are remembered, each
  for ``seen_s`` (as long as a repeat or a relayed verdict may still come);
* while no engine is registered, a notice is *held* (at most ``max_held``,
  oldest dropped first and counted) for the engine that registers next;
* a KVReady that names another generation than the current registration is
  handed on as the failure it is (its bytes are in a cache the engine no
  longer has), and its sender is given the current PeerInfo, at most once per
  ``push_every_s``, so its next writes go to the new cache;
* anything else is handed on (:class:`Deliver`); once the shell reports it
  handed (:meth:`DecodeCore.delivered`), it is confirmed to its sender
  (:class:`Confirm`), which stops keeping it; the confirmation says how the
  engine was told (``ok`` for a KVReady, else the failure and its reason), and
  a prefill rank reports ``ok`` to its scheduler only on an ``ok`` one;
* a notice the engine could not be handed (:meth:`DecodeCore.undelivered`: its
  connection is gone, or it does not read) is held like one that came before
  any registration, and so is every later one while the engine stays
  unreachable; every ``retry_s`` the oldest held notice is tried again (one
  send, whatever is held), and once one goes through the rest follow. So a
  dead engine costs one failed send per ``retry_s``, and its successor, when
  it registers, hears every held notice (as failures, where they name the old
  registration) and they are confirmed, so no prefill rank keeps them.

A prefill rank whose process ended (it stopped serving, or a new process
started in its place) may have died before it sent its notices: the barrier
service then sends this core the verdicts of its group (:meth:`DecodeCore.
writer_gone`), and each becomes that rank's failure notice, handed on unless
the rank's own notice came first (and its own one, if it comes later, is
only confirmed). So the engine hears of every request such a rank held, once.

A registration (:meth:`DecodeCore.registered`) starts a new generation,
pushes the new PeerInfo to every prefill rank of the deployment (they hold
the old one, if any) and hands on every held notice, checked against it.
Once every decode rank reported a request, no prefill rank writes into its
blocks any more: a prefill rank notifies only after its own writes stopped.
Nothing here reads a clock or touches a socket.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from kvxferd.core.effects import Problem
from kvxferd.core.memory import Memory
from kvxferd.protocol import Diverged, ErrorCode, Expired, Key, KVReady, Received, Release, Status, TransferResult
from kvxferd.protocol.fields import show

Notice = KVReady | TransferResult


@dataclass(frozen=True, slots=True)
class Deliver:
    """Hand ``notice`` to the engine; report with ``delivered`` or ``undelivered``
    (``confirm``: its sender is told once it is handed on; not for what the barrier relayed)."""

    sender: bytes
    notice: Notice
    confirm: bool = True


@dataclass(frozen=True, slots=True)
class Confirm:
    """Tell the prefill daemon ``sender`` its notice reached the engine."""

    sender: bytes
    message: Received


@dataclass(frozen=True, slots=True)
class Push:
    """Give the prefill daemon ``sender`` the current PeerInfo (it holds an older one)."""

    sender: bytes


DecodeEffect = Deliver | Confirm | Push | Problem


@dataclass(frozen=True, slots=True)
class _Held:
    sender: bytes
    notice: Notice


class DecodeCore:
    def __init__(
        self,
        rank: int,
        prefills: Mapping[bytes, str],
        *,
        max_held: int = 4096,
        max_seen: int = 4096,
        seen_s: float | None = None,
        push_every_s: float = 1.0,
        retry_s: float = 1.0,
    ) -> None:
        self.rank = rank
        self.prefills = dict(prefills)  # the identities our prefill ranks connect with -> their group
        self.push_every_s = push_every_s
        self.generation = ""  # the current registration's name; "" while none
        #: (sender, request instance) -> how it was confirmed once handed to the engine (OK for
        #: the common case, kept small: the Received is rebuilt from the notice), or None: held
        self.seen: Memory[tuple[bytes, Key], Received | bool | None] = Memory(limit=max_seen, ttl_s=seen_s)
        self.held: Memory[tuple[bytes, Key], _Held] = Memory(limit=max_held)
        self.pushed: dict[bytes, float] = {}  # sender -> when it was last given our PeerInfo unasked
        self.retry_s = retry_s
        #: when the held notices are next tried on the registered engine (None: it is reachable)
        self.retry_at: float | None = None
        self.counts: Counter[str] = Counter()

    @property
    def registered_engine(self) -> bool:
        return bool(self.generation)

    def notice(self, sender: bytes, msg: Notice, now: float) -> list[DecodeEffect]:
        """A notice from the prefill daemon ``sender`` (the shell checked it is one of ours)."""
        if msg.rank != self.rank:
            self.counts["refused_peer"] += 1
            return [
                Problem(
                    ErrorCode.WRONG_ROLE, f"refused a notice from {show(sender)} naming rank {msg.rank}", reply=False
                )
            ]
        if (sender, msg.key) in self.seen:
            self.counts["notice_repeated"] += 1
            confirmed = self.seen.get((sender, msg.key))
            if confirmed is None:
                return []  # held: confirmed once handed on
            if confirmed is True:
                return [Confirm(sender, Received(msg.request_id, msg.rank, msg.instance))]
            assert isinstance(confirmed, Received)
            return [Confirm(sender, confirmed)]
        if not self.registered_engine or self.retry_at is not None:
            # sent again (or queued) while this daemon restarted: kept for the engine that registers
            # next (they name an earlier registration, so it hears them as failures: blocks free again)
            # (or, while the engine is unreachable, for it or the next one)
            self._hold(sender, msg, now)
            return []
        return self._deliver(sender, msg, now)

    def writer_gone(self, verdict: Release | Diverged | Expired, now: float) -> list[DecodeEffect]:
        """The barrier's ``verdict`` for a request of prefill group ``verdict.group``, whose rank
        writing to us is absent: its failure notice (a Release too: the rank that would vouch for
        its bytes is gone before it said so), unless that rank's own notice came first."""
        sender = f"{verdict.group}:{self.rank}".encode()
        if sender not in self.prefills:
            return [
                Problem(
                    ErrorCode.WRONG_ROLE,
                    f"a verdict of {show(verdict.group)}: not a group that writes here",
                    reply=False,
                )
            ]
        if isinstance(verdict, Release):
            reason = (
                f"prefill {verdict.group} rank {self.rank}: its process ended before it told decode rank {self.rank}"
            )
            status, code = Status.FAILED, ErrorCode.UNAVAILABLE.value  # decided here, not by the group
        else:
            reason, status, code = verdict.reason, verdict.status, ""
        self.counts["notices_from_barrier"] += 1
        failure = TransferResult(verdict.key, status, reason, self.rank, 0, instance=verdict.instance, code=code)
        return [
            Deliver(e.sender, e.notice, confirm=False) if isinstance(e, Deliver) else e
            for e in self.notice(sender, failure, now)
            if not isinstance(e, Confirm)
        ]

    def _hold(self, sender: bytes, msg: Notice, now: float) -> None:
        dropped = self.held.put((sender, msg.key), _Held(sender, msg))
        if dropped is not None:  # its sender keeps it unconfirmed, and sends it on a reconnect
            self.counts["notices_dropped"] += 1
            self.seen.pop(dropped[0])
        self.seen.put((sender, msg.key), None, now)

    def delivered(self, sender: bytes, msg: Notice, now: float, confirm: bool = True) -> list[DecodeEffect]:
        """The engine was handed ``msg``: remember it, and confirm it to its sender (if the engine
        was unreachable until now, what was held for it follows)."""
        confirmed = self._confirm(sender, msg)
        told = confirmed.message
        self.seen.put((sender, msg.key), True if told.status is Status.OK else told, now)
        effects: list[DecodeEffect] = [confirmed] if confirm else []
        if self.retry_at is not None:
            self.retry_at = None
            effects += self._release(now)
        return effects

    def undelivered(self, sender: bytes, msg: Notice, now: float) -> None:
        """The engine could not be handed ``msg`` (not connected, or not reading): held, and
        tried again in ``retry_s`` (with every notice that comes meanwhile)."""
        self.counts["notices_undelivered"] += 1
        self._hold(sender, msg, now)
        self.retry_at = now + self.retry_s

    def next_deadline(self) -> float | None:
        times = (self.retry_at if self.held else None, self.seen.next_deadline())
        return min((t for t in times if t is not None), default=None)

    def on_timer(self, now: float) -> list[DecodeEffect]:
        """Forget notices seen long enough ago; try the oldest held notice on the engine again
        (only that one: it may still be gone)."""
        self.seen.expire(now)
        if self.retry_at is None or now < self.retry_at or not self.held or not self.registered_engine:
            return []
        self.retry_at = now + self.retry_s  # until the shell reports this try
        key, item = next(iter(self.held.items()))
        self.held.pop(key)
        return self._deliver(item.sender, item.notice, now)

    def registered(self, generation: str, now: float) -> list[DecodeEffect]:
        """An engine registered a cache, named ``generation``: every prefill rank hears the new
        PeerInfo, and every held notice is handed on."""
        self.generation = generation
        self.retry_at = None
        effects: list[DecodeEffect] = []
        for sender in self.prefills:
            self.pushed[sender] = now
            effects.append(Push(sender))
        return effects + self._release(now)

    def _release(self, now: float) -> list[DecodeEffect]:
        """Hand on every held notice (checked against the current registration)."""
        held = self.held.values()
        self.held.clear()
        effects: list[DecodeEffect] = []
        for item in held:
            effects += self._deliver(item.sender, item.notice, now)
        return effects

    def _deliver(self, sender: bytes, msg: Notice, now: float) -> list[DecodeEffect]:
        if not isinstance(msg, KVReady) or msg.generation == self.generation:
            return [Deliver(sender, msg)]
        self.counts["stale_generation"] += 1
        source = self.prefills.get(sender, "?")
        reason = (
            f"prefill {source} rank {msg.rank} wrote it into registration {show(msg.generation)} of "
            f"decode rank {self.rank}; the engine's cache is registration {show(self.generation)} now"
        )
        failure = TransferResult(
            msg.request_id, Status.FAILED, reason, msg.rank, msg.bytes, instance=msg.instance,
            code=ErrorCode.NOT_REGISTERED.value,
        )  # fmt: skip
        effects: list[DecodeEffect] = [
            Problem(ErrorCode.NOT_REGISTERED, f"request {msg.request_id}: {reason}", reply=False)
        ]
        if now - self.pushed.get(sender, -1e18) >= self.push_every_s:
            self.pushed[sender] = now  # a flood of stale notices needs one answer
            effects.append(Push(sender))  # so its next writes go to the current cache
        return [*effects, Deliver(sender, failure)]

    @staticmethod
    def _confirm(sender: bytes, msg: Notice) -> Confirm:
        """How ``msg`` was told to the engine, for its sender."""
        if isinstance(msg, KVReady):
            return Confirm(sender, Received(msg.request_id, msg.rank, msg.instance))
        return Confirm(sender, Received(msg.request_id, msg.rank, msg.instance, msg.status, msg.reason, msg.code))
