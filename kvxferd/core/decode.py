"""A decode rank's core: notices from its prefill ranks, one per request instance to its engine.

Theory of operation
-------------------
A decode daemon moves no data: prefill daemons write into the cache its
engine registered, then send one *notice* per request instance, a KVReady
(naming the registration, its *generation*, its bytes went into) or the failed
result. This core decides what becomes of each notice:

* it must name this decode rank (a notice naming another is dropped);
* a decode rank may have several *writers* in one prefill group (the group
  has more ranks than decode, each writing its heads into a slice of every
  block; see :mod:`kvxferd.core.rankmap`): their notices for an instance are
  *gathered*, and the engine is told once, only when every writer's notice is
  here, so only once no writer writes into the blocks any more. The one
  notice is a KVReady (bytes summed) if every writer sent one naming the same
  registration, else the first failure (the group's verdict, the same on
  every rank). Gatherings are bounded (``max_gathering``): one dropped is
  counted, and its writers, still unconfirmed, send their notices again;
* a repeat (a prefill rank sends the notices it has no confirmation for again
  when its connection comes back, or after a while) is confirmed again, as the
  first was, and never handed on twice: the last ``max_seen`` instances told
  are remembered per prefill group, each for ``seen_s`` (as long as a repeat
  or a relayed verdict may still come);
* while no engine is registered, a notice is *held* (at most ``max_held``,
  oldest dropped first and counted) for the engine that registers next;
* a KVReady that names another generation than the current registration is
  handed on as the failure it is (its bytes are in a cache the engine no
  longer has), and its writers are given the current PeerInfo, at most once
  per ``push_every_s`` each, so their next writes go to the new cache;
* anything else is handed on (:class:`Deliver`); once the shell reports it
  handed (:meth:`DecodeCore.delivered`), it is confirmed to each of its
  writers (:class:`Confirm`), which stop keeping it; the confirmation says how
  the engine was told (``ok`` for a KVReady, else the failure and its
  reason), and a prefill rank reports ``ok`` to its scheduler only on an
  ``ok`` one;
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
service then sends this core the verdicts of its group, naming the absent
writers (:meth:`DecodeCore.writer_gone`), and each becomes that writer's
failure notice in its gathering, unless the writer's own notice came first
(its own one, if it comes later than the engine was told, is only confirmed).
So the engine hears of every request such a rank held, once.

A registration (:meth:`DecodeCore.registered`) starts a new generation,
pushes the new PeerInfo to every prefill rank of the deployment (they hold
the old one, if any) and hands on every held notice, checked against it.
Nothing here reads a clock or touches a socket.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace

from kvxferd.core.effects import Problem
from kvxferd.core.memory import Memory
from kvxferd.protocol import Diverged, ErrorCode, Expired, Key, KVReady, Received, Release, Status, TransferResult
from kvxferd.protocol.fields import show

Notice = KVReady | TransferResult


@dataclass(frozen=True, slots=True)
class Deliver:
    """Hand ``notice``, prefill group ``source``'s one notice for the instance, to the engine;
    report with ``delivered`` or ``undelivered``. ``confirm``: the writers told once it is handed
    on (not those the barrier spoke for)."""

    source: str
    notice: Notice
    confirm: tuple[bytes, ...] = ()


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

#: a gathering: writer -> its notice, and whether it is to be confirmed (False: the barrier spoke for it)
Parts = dict[bytes, tuple[Notice, bool]]


class DecodeCore:
    def __init__(
        self,
        rank: int,
        prefills: Mapping[bytes, str],
        *,
        max_held: int = 4096,
        max_seen: int = 4096,
        max_gathering: int = 4096,
        seen_s: float | None = None,
        push_every_s: float = 1.0,
        retry_s: float = 1.0,
    ) -> None:
        """``prefills``: the identity of every prefill rank that writes into this decode rank ->
        its group (a group's writers are the identities naming it)."""
        self.rank = rank
        self.prefills = dict(prefills)
        self.writers: dict[str, frozenset[bytes]] = {}
        for sender, group in self.prefills.items():
            self.writers[group] = self.writers.get(group, frozenset()) | {sender}
        self.push_every_s = push_every_s
        self.generation = ""  # the current registration's name; "" while none
        #: (prefill group, request instance) -> the notices of its writers so far (not all here yet)
        self.gathering: Memory[tuple[str, Key], Parts] = Memory(limit=max_gathering)
        #: (prefill group, request instance) -> how it was confirmed once handed to the engine (OK
        #: for the common case, kept small: the Received is rebuilt from the notice), or None: held
        self.seen: Memory[tuple[str, Key], Received | bool | None] = Memory(limit=max_seen, ttl_s=seen_s)
        self.held: Memory[tuple[str, Key], Deliver] = Memory(limit=max_held)
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
        group = self.prefills.get(sender)
        if msg.rank != self.rank or group is None:
            self.counts["refused_peer"] += 1
            return [
                Problem(
                    ErrorCode.WRONG_ROLE, f"refused a notice from {show(sender)} naming rank {msg.rank}", reply=False
                )
            ]
        return self._part(group, sender, msg, True, now)

    def _part(self, group: str, sender: bytes, msg: Notice, confirm: bool, now: float) -> list[DecodeEffect]:
        """Writer ``sender``'s notice for its gathering; the engine is told once all are here."""
        key = (group, msg.key)
        if key in self.seen or key in self.held:  # told to the engine already, or held for it (held
            # longer than seen_s, its mark may be gone: the held table says it all the same)
            self.counts["notice_repeated"] += 1
            confirmed = self.seen.get(key)
            if confirmed is None or not confirm:
                return []  # held: confirmed once handed on (or the barrier's word: nobody to confirm)
            if confirmed is True:
                return [Confirm(sender, Received(msg.request_id, msg.rank, msg.instance))]
            assert isinstance(confirmed, Received)
            return [Confirm(sender, confirmed)]
        parts = self.gathering.get(key)
        if parts is None:
            parts = {}
        elif sender in parts:
            self.counts["notice_repeated"] += 1
            if not confirm or parts[sender][1]:
                return []  # a repeat, or the barrier's word for a writer whose own notice came
        parts[sender] = (msg, confirm)
        if len(parts) < len(self.writers[group]):
            if self.gathering.put(key, parts) is not None:  # its writers send theirs again
                self.counts["gatherings_dropped"] += 1
            return []
        self.gathering.pop(key)
        told = Deliver(group, self._one(group, parts), tuple(s for s, (_, c) in sorted(parts.items()) if c))
        if not self.registered_engine or self.retry_at is not None:
            # sent again (or queued) while this daemon restarted: kept for the engine that registers
            # next (they name an earlier registration, so it hears them as failures: blocks free again)
            # (or, while the engine is unreachable, for it or the next one)
            self._hold(told, now)
            return []
        return self._deliver(told, now)

    def _one(self, group: str, parts: Parts) -> Notice:
        """The one notice of a gathering: a KVReady if every writer sent one into the same
        registration (bytes summed), else the first failure (with this rank's number)."""
        notices = [n for _, (n, _) in sorted(parts.items())]
        if len(notices) == 1:
            return notices[0]
        first = notices[0]
        failures = [n for n in notices if isinstance(n, TransferResult)]
        total = sum(n.bytes for n in notices)
        if failures:
            return replace(failures[0], rank=self.rank, bytes=total)
        generations = sorted({n.generation for n in notices if isinstance(n, KVReady)})
        if len(generations) > 1:
            reason = (
                f"prefill {group}'s ranks wrote it into different registrations of decode rank {self.rank} "
                f"({', '.join(map(show, generations))})"
            )
            return TransferResult(
                first.request_id, Status.FAILED, reason, self.rank, total, instance=first.instance,
                code=ErrorCode.NOT_REGISTERED.value,
            )  # fmt: skip
        return KVReady(first.request_id, self.rank, total, first.instance, generations[0])

    def writer_gone(self, verdict: Release | Diverged | Expired, now: float) -> list[DecodeEffect]:
        """The barrier's ``verdict`` for a request of prefill group ``verdict.group``, whose writers
        ``verdict.absent`` (empty: our own rank number) are absent: each one's failure notice (a
        Release too: the rank that would vouch for its bytes is gone before it said so), unless its
        own notice came first."""
        effects: list[DecodeEffect] = []
        for writer in verdict.absent or (self.rank,):
            sender = f"{verdict.group}:{writer}".encode()
            if self.prefills.get(sender) != verdict.group:
                effects.append(
                    Problem(
                        ErrorCode.WRONG_ROLE,
                        f"a verdict of {show(verdict.group)} for rank {writer}: not a prefill rank that writes here",
                        reply=False,
                    )
                )
                continue
            if isinstance(verdict, Release):
                reason = (
                    f"prefill {verdict.group} rank {writer}: its process ended before it told decode rank {self.rank}"
                )
                status, code = Status.FAILED, ErrorCode.UNAVAILABLE.value  # decided here, not by the group
            else:
                reason, status, code = verdict.reason, verdict.status, ""
            self.counts["notices_from_barrier"] += 1
            failure = TransferResult(verdict.key, status, reason, self.rank, 0, instance=verdict.instance, code=code)
            effects += self._part(verdict.group, sender, failure, False, now)
        return effects

    def _hold(self, told: Deliver, now: float) -> None:
        key = (told.source, told.notice.key)
        dropped = self.held.put(key, told)
        if dropped is not None:  # its writers keep it unconfirmed, and send it again
            self.counts["notices_dropped"] += 1
            self.seen.pop(dropped[0])
        self.seen.put(key, None, now)

    def delivered(self, told: Deliver, now: float) -> list[DecodeEffect]:
        """The engine was handed ``told``: remember it, and confirm it to its writers (if the
        engine was unreachable until now, what was held for it follows)."""
        received = self._received(told.notice)
        self.seen.put((told.source, told.notice.key), True if received.status is Status.OK else received, now)
        effects: list[DecodeEffect] = [Confirm(sender, received) for sender in told.confirm]
        if self.retry_at is not None:
            self.retry_at = None
            effects += self._release(now)
        return effects

    def undelivered(self, told: Deliver, now: float) -> None:
        """The engine could not be handed ``told`` (not connected, or not reading): held, and
        tried again in ``retry_s`` (with every notice that comes meanwhile)."""
        self.counts["notices_undelivered"] += 1
        self._hold(told, now)
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
        key, told = next(iter(self.held.items()))
        self.held.pop(key)
        return self._deliver(told, now)

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
        for told in held:
            effects += self._deliver(told, now)
        return effects

    def _deliver(self, told: Deliver, now: float) -> list[DecodeEffect]:
        msg = told.notice
        if not isinstance(msg, KVReady) or msg.generation == self.generation:
            return [told]
        self.counts["stale_generation"] += 1
        reason = (
            f"prefill group {show(told.source)} wrote it into registration {show(msg.generation)} of "
            f"decode rank {self.rank}; the engine's cache is registration {show(self.generation)} now"
        )
        failure = TransferResult(
            msg.request_id, Status.FAILED, reason, msg.rank, msg.bytes, instance=msg.instance,
            code=ErrorCode.NOT_REGISTERED.value,
        )  # fmt: skip
        effects: list[DecodeEffect] = [
            Problem(ErrorCode.NOT_REGISTERED, f"request {msg.request_id}: {reason}", reply=False)
        ]
        for sender in told.confirm:
            if now - self.pushed.get(sender, -1e18) >= self.push_every_s:
                self.pushed[sender] = now  # a flood of stale notices needs one answer
                effects.append(Push(sender))  # so its next writes go to the current cache
        return [*effects, replace(told, notice=failure)]

    @staticmethod
    def _received(msg: Notice) -> Received:
        """How ``msg`` was told to the engine, for its writers."""
        if isinstance(msg, KVReady):
            return Received(msg.request_id, msg.rank, msg.instance)
        return Received(msg.request_id, msg.rank, msg.instance, msg.status, msg.reason, msg.code)
