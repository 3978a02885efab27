"""The notice ledger: what a prefill rank told decode daemons, kept until they confirm it.

Theory of operation: a request's ending is told to each decode rank it wrote
into by one *notice* (a KVReady, or the failed result). A notice is kept here
from the moment it is sent until that decode daemon confirms it handed it to
its engine (``Received``). Whenever the daemon's connection (re)opens, every
notice it has not confirmed is sent again (:meth:`NoticeLedger.reconnected`):
a decode daemon killed with notices unread in its socket loses none, and the
one started in its place hands them on. The decode side recognises a repeat
and confirms it without telling its engine twice. A notice unconfirmed
``retry_s`` after it was sent (dropped because the daemon's queue was full,
or lost in a socket) is sent again (:meth:`NoticeLedger.due`), then after
twice as long each time, up to 16 x ``retry_s``. The ledger is bounded
(:class:`~kvxferd.core.memory.Memory`): past ``limit`` the oldest notice is
given up, loudly. Nothing here reads a clock; ``now`` stamps when a notice was
first sent, so the oldest wait can be reported.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvxferd.core.effects import Problem
from kvxferd.core.memory import Memory
from kvxferd.protocol import ErrorCode, Key, KVReady, TransferResult

Notice = KVReady | TransferResult


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``notice`` to the decode daemon of ``link`` (a decode group's name)."""

    link: str
    notice: Notice


LedgerEffect = Send | Problem


@dataclass(slots=True)
class _Kept:
    notice: Notice
    since: float
    again_at: float  # when it is sent again unless confirmed
    tries: int = 0


class NoticeLedger:
    def __init__(self, limit: int, retry_s: float = 2.0) -> None:
        self._kept: Memory[tuple[str, Key], _Kept] = Memory(limit=limit)
        self.retry_s = retry_s
        self._next_pass: float | None = None  # the next pass over what is kept
        self.resent = 0

    def tell(self, link: str, notice: Notice, now: float) -> list[LedgerEffect]:
        """Send ``notice`` to ``link``'s decode daemon and keep it until that daemon confirms it."""
        effects: list[LedgerEffect] = [Send(link, notice)]
        pushed = self._kept.put((link, notice.key), _Kept(notice, now, now + self.retry_s))
        if self._next_pass is None or self._next_pass > now + self.retry_s:
            self._next_pass = now + self.retry_s
        if pushed is not None:
            (lost_link, _), lost = pushed
            detail = (
                f"{self._kept.limit} notices unconfirmed: no longer keeping {lost.notice} for decode "
                f"{lost_link!r} (it is not sent again)"
            )
            effects.append(Problem(ErrorCode.TABLE_FULL, detail, lost.notice.request_id, reply=False))
        return effects

    def confirmed(self, link: str, key: Key) -> bool:
        """``link``'s decode daemon confirmed the notice of ``key``; False if none was kept."""
        return self._kept.pop((link, key)) is not None

    def reconnected(self, link: str) -> list[LedgerEffect]:
        """``link``'s decode daemon connected (again): every notice it has not confirmed, again."""
        return [Send(link, kept.notice) for (where, _), kept in self._kept.items() if where == link]

    def next_deadline(self) -> float | None:
        return self._next_pass if len(self._kept) else None

    def due(self, now: float) -> list[LedgerEffect]:
        """Every notice unconfirmed past its time, sent again (its next time twice as far off)."""
        if self._next_pass is None or now < self._next_pass:
            return []
        out: list[LedgerEffect] = []
        earliest: float | None = None
        for (link, _), kept in self._kept.items():
            if now >= kept.again_at:
                kept.tries += 1
                kept.again_at = now + self.retry_s * (1 << min(kept.tries, 4))
                out.append(Send(link, kept.notice))
            earliest = kept.again_at if earliest is None else min(earliest, kept.again_at)
        self.resent += len(out)
        # (at most one pass per retry_s, whatever the notices' own times)
        self._next_pass = None if earliest is None else max(earliest, now + self.retry_s)
        return out

    def unconfirmed(self, link: str) -> int:
        return sum(1 for where, _ in self._kept if where == link)

    def oldest_s(self, now: float) -> float | None:
        """How long the oldest unconfirmed notice has waited (None: none waits)."""
        oldest = self._kept.oldest()
        return None if oldest is None else now - oldest[1].since

    @property
    def given_up(self) -> int:
        return self._kept.evicted

    def __len__(self) -> int:
        return len(self._kept)
