"""The table of a prefill rank's live requests: their two states and their one deadline each.

Theory of operation: every request instance the rank holds lives here from its
cache_info to its ending. :meth:`Lifecycle.move` is the only way its states
change: it applies a data event and/or an agreement event along the tables of
:mod:`kvxferd.core.states` (an event a state does not take raises
:class:`~kvxferd.errors.StateError` naming the request and both states, and
changes nothing), then arms the deadline the new pair waits on
(:data:`~kvxferd.core.states.WAITS`). No other code sets or clears a
request's deadline. :meth:`Lifecycle.end` lets a request go, which it may only
from ``(QUIET, DECIDED)``. Nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Iterator

from kvxferd.core.deadlines import Deadlines
from kvxferd.core.request import Request
from kvxferd.core.settings import RankSettings
from kvxferd.core.states import (
    AGREEMENT,
    DATA,
    END,
    RESTARTS,
    WAITS,
    Agreement,
    AgreementEvent,
    Data,
    DataEvent,
    Timer,
    writing,
)
from kvxferd.errors import StateError
from kvxferd.protocol import CacheInfo, Key


class Lifecycle:
    """The table of live requests: moves each along the two tables and keeps its one deadline."""

    def __init__(self, settings: RankSettings) -> None:
        self.s = settings
        self.requests: dict[Key, Request] = {}
        self._deadlines: Deadlines[Key] = Deadlines()
        #: timer -> (counted from the cache_info, rather than from the move; how long)
        self._spans = {
            Timer.SIGNAL: (True, settings.pending_timeout_s),
            Timer.ADMISSION: (True, settings.verdict_timeout_s),
            Timer.PROGRESS: (False, settings.progress_timeout_s),
            Timer.DRAIN: (False, settings.progress_timeout_s),
            Timer.VERDICT: (False, settings.verdict_timeout_s),
        }

    def enter(self, info: CacheInfo, now: float, origin: bytes | None) -> Request:
        """A new live request, waiting for its signal and its admission."""
        req = self.requests[info.key] = Request(info, now, origin=origin)
        self._arm(req, now, restart=False)
        return req

    def move(
        self,
        req: Request,
        now: float,
        data: DataEvent | None = None,
        agreement: AgreementEvent | None = None,
    ) -> None:
        """Apply ``data`` then ``agreement`` (either may be None), then arm the pair's deadline.
        An event the state does not take raises StateError and changes nothing."""
        if data is DataEvent.PROGRESS and agreement is None and req.timer is Timer.PROGRESS:
            # the hot path (a write confirmed): (active, admitted) stays, its timer starts again
            self._deadlines.set(req.key, now + self._spans[Timer.PROGRESS][1])
            return
        new_data, new_agreement = req.data, req.agreement
        if data is not None:
            target = DATA[req.data].get(data)
            if target is None:
                raise self._illegal(req, data.value, req.data.value)
            new_data = target
        if agreement is not None:
            target_agreement = AGREEMENT[req.agreement].get(agreement)
            if target_agreement is None:
                raise self._illegal(req, agreement.value, req.agreement.value)
            new_agreement = target_agreement
        req.data, req.agreement = new_data, new_agreement
        req.writing = writing(req)
        self._arm(req, now, restart=data in RESTARTS or agreement in RESTARTS)

    def abandon(self, req: Request, now: float) -> None:
        """A forced stop: the request's data machine halts (or gives up its drain) and it is
        decided, along the tables, whatever it waited for; it may then end."""
        data = {Data.WAIT_SIGNAL: DataEvent.HALT, Data.ACTIVE: DataEvent.HALT, Data.DRAINING: DataEvent.DRAINED}
        decide = AgreementEvent.DECIDE if req.agreement is not Agreement.DECIDED else None
        self.move(req, now, data.get(req.data), decide)

    def end(self, req: Request) -> None:
        """The request ends now, which it may only in :data:`END`: it leaves the table."""
        if (req.data, req.agreement) != END:
            raise self._illegal(req, "end", f"{req.data.value}")
        req.timer = None
        self._deadlines.cancel(req.key)
        del self.requests[req.key]

    def due(self, now: float) -> Iterator[Key]:
        """Requests whose deadline is at or before ``now``, earliest first (each popped)."""
        return self._deadlines.pop_due(now)

    def next_deadline(self) -> float | None:
        return self._deadlines.earliest()

    def holds(self, key: Key) -> bool:
        """Whether ``key`` has a deadline armed."""
        return key in self._deadlines

    @property
    def armed(self) -> int:
        """Deadlines armed (one per live request in a waiting pair)."""
        return len(self._deadlines)

    def _illegal(self, req: Request, what: str, state: str) -> StateError:
        info = req.info
        return StateError(
            f"request {info.request_id} instance {info.instance} on {self.s.who}: cannot {what} while {state} "
            f"(data {req.data.value}, agreement {req.agreement.value})"
        )

    def _arm(self, req: Request, now: float, *, restart: bool) -> None:
        wait = WAITS.get((req.data, req.agreement))
        timer = wait.timer if wait is not None else None
        if timer is None:
            req.timer = None
            self._deadlines.cancel(req.key)
            return
        if timer is req.timer and not restart:
            return
        from_created, span = self._spans[timer]
        req.timer = timer
        self._deadlines.set(req.key, (req.created if from_created else now) + span)
