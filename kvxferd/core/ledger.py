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

A KVReady comes with the ``ok`` result for the prefill engine (``then``),
which the ledger keeps too: a request is ok on prefill only once every decode
rank it wrote into (one, or several when the decode group is larger:
:meth:`NoticeLedger.tell_all`) confirmed it told its engine the KVReady
(:meth:`NoticeLedger.confirmed` gives the result back, :class:`Report`, once
the last one did). If a decode engine was told a failure instead (the KVReady
named a registration it no longer holds), the result becomes that failure,
with its code. If no confirmation came within
``confirm_s`` (reported by the pass after that, so within ``confirm_s`` plus
at most ``retry_s``), the result is told as failed (code ``unavailable``) and
the notice kept for decode becomes that failure too, so a decode daemon that
only now reads it tells its engine the same. One that told its engine the
KVReady but whose confirmation was lost leaves decode ready and prefill failed:
the direction that loses a request, never one that serves wrong bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvxferd.core.effects import Problem, ToEngine
from kvxferd.core.memory import Memory
from kvxferd.protocol import ErrorCode, Key, KVReady, Received, Status, TransferResult

Notice = KVReady | TransferResult


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``notice`` to the decode daemon of ``link`` (a decode group's name)."""

    link: str
    notice: Notice


@dataclass(frozen=True, slots=True)
class Report:
    """Tell the prefill engine ``result`` now (it waited for the decode rank's confirmation)."""

    result: ToEngine


LedgerEffect = Send | Report | Problem


@dataclass(slots=True)
class _Waiting:
    """An ok result held until every decode rank its notices went to confirmed them."""

    then: ToEngine
    links: set[str]  # the decode ranks still to confirm
    failure: ToEngine | None = None  # how the first one that told its engine a failure makes it end
    told: bool = False  # reported (as ok or as failed): every later word about it is ignored


@dataclass(slots=True)
class _Kept:
    notice: Notice
    since: float
    again_at: float  # when it is sent again unless confirmed
    tries: int = 0
    waiting: _Waiting | None = None  # the ok result it holds back, with the other notices' links
    until: float = 0.0  # when the result is told as failed unless confirmed

    @property
    def then(self) -> ToEngine | None:
        """The ok result still held back by this notice (None: none, or told already)."""
        return None if self.waiting is None or self.waiting.told else self.waiting.then


class NoticeLedger:
    def __init__(self, limit: int, retry_s: float = 2.0, confirm_s: float = 10.0) -> None:
        self._kept: Memory[tuple[str, Key], _Kept] = Memory(limit=limit)
        self.retry_s = retry_s
        self.confirm_s = confirm_s
        self._next_pass: float | None = None  # the next pass over what is kept
        self.resent = 0
        self.unconfirmed_results = 0  # ok results told as failed: no confirmation in time
        self.holding = 0  # ok results kept until their decode rank confirms

    def tell(self, link: str, notice: Notice, now: float, then: ToEngine | None = None) -> list[LedgerEffect]:
        """Send ``notice`` to ``link``'s decode daemon and keep it until that daemon confirms it;
        ``then``, the ok result of a KVReady, is told once it confirms (see the module)."""
        return self.tell_all([(link, notice)], now, then)

    def tell_all(
        self, notices: list[tuple[str, Notice]], now: float, then: ToEngine | None = None
    ) -> list[LedgerEffect]:
        """Send each ``(link, notice)`` and keep it until its decode daemon confirms it; ``then``,
        the ok result of the KVReadys, is told once every one of them confirmed (as the first
        failure one of them told its engine, if one did), or told failed at once if there are none."""
        if then is not None and not notices:
            return [Report(then)]  # this rank writes into no decode rank: nobody to confirm
        waiting = _Waiting(then, {link for link, _ in notices}) if then is not None else None
        self.holding += waiting is not None
        effects: list[LedgerEffect] = []
        for link, notice in notices:
            effects.append(Send(link, notice))
            kept = _Kept(notice, now, now + self.retry_s, waiting=waiting, until=now + self.confirm_s)
            replaced = self._kept.pop((link, notice.key))  # (a notice is told once: never, but count right)
            if replaced is not None and replaced.then is not None:
                again = as_failed(replaced.then, f"its notice to decode {link!r} was replaced", ErrorCode.INTERNAL)
                effects += self._settle(replaced.waiting, link, again, at_once=True)
            pushed = self._kept.put((link, notice.key), kept)
            if pushed is not None:
                (lost_link, _), lost = pushed
                detail = (
                    f"{self._kept.limit} notices unconfirmed: no longer keeping {lost.notice} for decode "
                    f"{lost_link!r} (it is not sent again)"
                )
                effects.append(Problem(ErrorCode.TABLE_FULL, detail, lost.notice.request_id, reply=False))
                if lost.then is not None:
                    failed = as_failed(lost.then, f"{detail}; not confirmed ready", ErrorCode.TABLE_FULL)
                    effects += self._settle(lost.waiting, lost_link, failed, at_once=True)
        first = now + min(self.retry_s, self.confirm_s)
        if self._next_pass is None or self._next_pass > first:
            self._next_pass = first
        return effects

    def _settle(
        self, waiting: _Waiting | None, link: str, failure: ToEngine | None, *, at_once: bool = False
    ) -> list[LedgerEffect]:
        """``link`` answered for ``waiting`` (``failure``: as its engine was told a failure); the
        result, once the last link answered (``at_once``: now, as failed)."""
        if waiting is None or waiting.told:
            return []
        waiting.links.discard(link)
        if failure is not None and waiting.failure is None:
            waiting.failure = failure
        if waiting.links and not at_once:
            return []
        waiting.told = True
        self.holding -= 1
        return [Report(waiting.failure or waiting.then)]

    def confirmed(self, link: str, received: Received) -> list[LedgerEffect] | None:
        """``link``'s decode daemon confirmed the notice of ``received.key``, saying how its engine
        was told; the ok result it held back, as that, once the last of its decode ranks confirmed
        (None: no notice of it was kept)."""
        kept = self._kept.pop((link, received.key))
        if kept is None:
            return None
        if kept.then is None:
            return []
        failure = None
        if received.status is not Status.OK:
            code = ErrorCode(received.code) if received.code else ErrorCode.UNAVAILABLE
            failure = as_failed(kept.then, received.reason, code)
        return self._settle(kept.waiting, link, failure)

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
            if kept.waiting is not None and (kept.then is None or now >= kept.until):
                waiting = kept.waiting
                if not waiting.told:
                    self.unconfirmed_results += 1
                    why = (
                        f"decode {link!r} did not confirm within {self.confirm_s:g}s that its engine was told "
                        "KVReady; it is told the request failed"
                    )
                    out += self._settle(
                        waiting, link, as_failed(waiting.then, why, ErrorCode.UNAVAILABLE), at_once=True
                    )
                told = waiting.failure or waiting.then
                if told.result.status is not Status.OK and isinstance(kept.notice, KVReady):
                    # decode hears the same, at once (with its own rank number)
                    kept.notice = replace(told.result, rank=kept.notice.rank)
                    kept.again_at = now
                kept.waiting = None
            if now >= kept.again_at:
                kept.tries += 1
                kept.again_at = now + self.retry_s * (1 << min(kept.tries, 4))
                out.append(Send(link, kept.notice))
            due = kept.again_at if kept.then is None else min(kept.again_at, kept.until)
            earliest = due if earliest is None else min(earliest, due)
        self.resent += sum(isinstance(e, Send) for e in out)
        # (at most one pass per retry_s, whatever the notices' own times)
        self._next_pass = None if earliest is None else max(earliest, now + min(self.retry_s, self.confirm_s))
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


def as_failed(then: ToEngine, reason: str, code: ErrorCode) -> ToEngine:
    """The held ok result ``then``, told as failed instead."""
    result = replace(then.result, status=Status.FAILED, reason=reason, code=code.value)
    return ToEngine(result, then.origin)
