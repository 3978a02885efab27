"""The prefill rank's core: from signals and cache_infos to writes, words and endings.

Theory of operation: inputs are protocol messages and write completions, each
with ``now``; outputs are effects (:mod:`kvxferd.core.effects`). Nothing here
reads a clock, touches a socket or starts a thread. :class:`RankCore` is a
façade over the jobs of a rank, one module each: :mod:`~kvxferd.core.intake`
(signals and cache_infos into single-request jobs), :mod:`~kvxferd.core.lifecycle`
(the live requests, their two states and one deadline each, along the tables of
:mod:`~kvxferd.core.states`), :mod:`~kvxferd.core.writes` (writes planned, and
the one table of writes in flight), :mod:`~kvxferd.core.agreement` (the words
said at the barrier, the memory of endings) and :mod:`~kvxferd.core.reporting`.

One request's path: its cache_info is admitted at the barrier and pairs with its
layer-0 signal; nothing is written before ``Admitted``; every ready layer is then
posted; once all are confirmed the rank arrives with a digest; the verdict ends
it, told to the engine and the decode peer (the README walks through it).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from kvxferd.core import reporting, verdicts
from kvxferd.core.agreement import VERDICTS, Verdict, Words
from kvxferd.core.effects import Problem, RankEffect, ToBarrier, ToEngine, ToPeer
from kvxferd.core.intake import Intake, Item
from kvxferd.core.lifecycle import Lifecycle
from kvxferd.core.pending import PendingSignal
from kvxferd.core.request import Ended, Ending, Request
from kvxferd.core.settings import RankSettings
from kvxferd.core.states import Agreement, AgreementEvent, Data, DataEvent, Timer, allows
from kvxferd.core.writes import Writes
from kvxferd.protocol import (
    Abort,
    Admitted,
    CacheInfo,
    ErrorCode,
    Key,
    LayerSignal,
    Message,
    RankView,
    Status,
    Withdraw,
)
from kvxferd.protocol.fields import clip

DE, GE = DataEvent, AgreementEvent
FAILED, ABORTED = Status.FAILED, Status.ABORTED


class RankCore:
    """Pure state of one prefill rank. See the module docstring."""

    def __init__(self, settings: RankSettings) -> None:
        self.s = settings
        self.life = Lifecycle(settings)
        self._requests = self.life.requests  # the live requests, by key (read here; changed by life)
        self.intake = Intake(settings)
        self.writes = Writes(settings)
        self.words = Words(settings, self.life)
        #: layers that may be written, gathered between ``hold`` and ``flush`` (None: planned at once)
        self._held: list[Item] | None = None

    def handle(self, msg: Message, now: float) -> list[RankEffect]:
        """Dispatch one inbound message."""
        if isinstance(msg, LayerSignal):
            return self.on_layer(msg, now)
        if isinstance(msg, CacheInfo):
            return self.on_cache_info(msg, now)
        if isinstance(msg, Abort):
            return self.on_abort(msg, now)
        if isinstance(msg, (Admitted, *VERDICTS)):
            return self.on_verdict(msg, now)
        return [Problem(ErrorCode.WRONG_ROLE, f"a prefill rank does not accept {type(msg).__name__}")]

    def on_cache_info(
        self, info: CacheInfo, now: float, refusal: tuple[ErrorCode, str] | None = None, origin: bytes | None = None
    ) -> list[RankEffect]:
        """A cache_info from the scheduler connection ``origin`` (the shell's name for it; the
        request's result goes there). ``refusal`` (code, detail): the shell cannot take requests
        now; the cache_info is refused unless it repeats a live or ended instance."""
        repeat = self.words.repeat(info, self._requests.get(info.key))
        if repeat is not None:
            return [repeat]
        ended = self.words.ending_of(info.key)
        if ended is not None:  # ended before its cache_info came here: its signals have nothing to join
            self.intake.close_start(info, now)
            return self.words.straggler(info, ended, origin, now)
        if refusal is None:
            reason = self.words.aborts.pop(info.key)
            if reason is not None:  # aborted before it got here: end as aborted at once, everywhere
                # (kept even with the table full, to report the verdict: at most twice its limit)
                req = self._enter(info, now, origin)
                self.intake.discard_parked(info)
                return self._stop(req, Ending(ABORTED, reason), now)
            live = len(self._requests)
            refusal = self.intake.check(info, live) or self.words.forgetful(info, live, now)
        if refusal is not None:
            return self.refuse(info, *refusal, now, origin=origin)
        req = self._enter(info, now, origin)
        admit = self.words.admit(info)
        signal = self.intake.claim(info)
        if signal is None:
            return [admit]
        stopped, items = self._recover(req, signal, True, now)
        return [admit, *stopped, *self._post(items, now)]

    def on_layer(self, sig: LayerSignal, now: float) -> list[RankEffect]:
        problems, matches, items = self.intake.layer(sig, now, self._requests)
        effects: list[RankEffect] = list(problems)
        for m in matches:
            req = self._requests[m.key]
            if m.first:
                stopped, more = self._recover(req, PendingSignal(m.step, m.chunk, now), False, now)
            else:
                reason, more = self.intake.attach(req, m.step, m.chunk)
                stopped = self._bad_chunk(req, reason, now)
            effects += stopped
            items += more
        if sig.layer == 0:
            self.intake.done_with_step(sig.step)
        return effects + self._post(items, now)

    def on_layers(self, step: int, layers: Sequence[int], now: float) -> list[RankEffect]:
        """The signals of ``layers`` (each above 0, so with no slot table) of step ``step``, in the
        order they came: what one :meth:`on_layer` each returns, taken at once (the shell reads a
        model worker's signals in bursts)."""
        problems, items = self.intake.later(step, layers)
        effects: list[RankEffect] = list(problems)
        return effects + self._post(items, now)

    def on_abort(self, msg: Abort, now: float) -> list[RankEffect]:
        key, reason = msg.key, msg.reason or "aborted by the engine"
        req = self._requests.get(key)
        if req is not None:
            return self._stop(req, Ending(ABORTED, reason), now)
        return self.words.early_abort(msg, reason, now)

    def write_done(
        self, write_id: int, now: float, error: str | None = None, transport: str | None = None,
        generation: str | None = None,
    ) -> list[RankEffect]:  # fmt: skip
        """The transport finished write ``write_id``: ``error`` says why it failed, if it did;
        ``transport`` and ``generation`` name where it went (the result and notice report them)."""
        done = self.writes.complete(write_id, self._requests, error, transport, generation)
        if done is None:
            return [Problem(ErrorCode.INTERNAL, f"completion for unknown write {write_id}", reply=False)]
        touched, failed = done
        effects: list[RankEffect] = []
        lost: dict[Key, tuple[Request, list[int]]] = {}  # (one ending per request, naming its layers)
        for req, layer in failed:
            lost.setdefault(req.key, (req, []))[1].append(layer)
        for req, which in lost.values():
            why = f"write of {_layers(sorted(which))} to {req.info.peer} failed: {error}"
            effects += self._stop(req, Ending(FAILED, why), now)
        for req in touched:
            if req.data is Data.ACTIVE:
                self.life.move(req, now, data=DE.PROGRESS)
                effects += self._maybe_arrive(req, now)
            elif req.data is Data.DRAINING and req.inflight == 0:
                effects += self._drained(req, now)
        return effects

    def on_verdict(self, verdict: Admitted | Verdict, now: float) -> list[RankEffect]:
        if verdict.group != self.s.group:
            detail = f"verdict for group {verdict.group!r} reached group {self.s.group!r}"
            return [Problem(ErrorCode.BAD_MESSAGE, detail, verdict.key, reply=False)]
        key = (verdict.key, verdict.instance)
        req = self._requests.get(key)
        if isinstance(verdict, Admitted):  # every layer that became ready meanwhile goes now
            if req is None or not self.words.admitted(req, now):
                return []
            return self._stop(req, req.unfit, now) if req.unfit else self._post(self.intake.ready(req), now)
        if req is None:
            return self.words.learn(key, verdict, now)
        if not allows(req, GE.DECIDE):
            return []  # decided already (it drains): a repeated verdict
        data = {Data.WAIT_SIGNAL: DE.HALT, Data.ACTIVE: DE.DRAIN if req.inflight else DE.HALT}.get(req.data)
        self.intake.detach(req)
        self.words.decide(req, ending := self.words.outcome(req, verdict), now, data)
        return self._end(req, ending, now) if req.data is Data.QUIET else []  # else: it drains first

    def hold(self) -> None:
        """Plan nothing until :meth:`flush`: what becomes writable meanwhile (signals, admissions
        of a whole wake-up of messages) is gathered and planned together, so a step's requests
        admitted one verdict after another still share one write per layer, and every layer
        ready at once goes in as few writes as the runs allow."""
        if self._held is None:
            self._held = []

    def flush(self, now: float) -> list[RankEffect]:
        """Plan what was gathered since :meth:`hold` (the writes, and the arrivals of requests
        with nothing to send); planning is immediate again. Items of requests that ended or
        stopped meanwhile are skipped (a request that may no longer write plans nothing)."""
        items, self._held = self._held or [], None
        live = self._requests
        return self._post([item for item in items if item[0] in live], now)

    def on_timer(self, now: float) -> list[RankEffect]:
        self.words.on_timer(now)
        effects: list[RankEffect] = list(self.intake.on_timer(now))
        for key in self.life.due(now):
            if (req := self._requests.get(key)) is not None:
                effects += self._overdue(req, now)
        return effects

    def next_deadline(self) -> float | None:
        times = (self.life.next_deadline(), self.intake.next_deadline(), self.words.next_deadline())
        return min((t for t in times if t is not None), default=None)

    def refuse(
        self, info: CacheInfo, code: ErrorCode, detail: str, now: float, *, origin: bytes | None = None
    ) -> list[RankEffect]:
        """Refuse a cache_info without keeping it (see Words.refuse): the request ends at once."""
        if code is not ErrorCode.SLOT_BUSY:  # a busy slot's signals belong to the request holding it
            self.intake.close_start(info, now)
        return self.words.refuse(info, code, detail, now, origin)

    def close(self, reason: str, now: float, *, report: bool = True) -> list[RankEffect]:
        """Forced stop: end every live request as failed with ``reason`` and clear every table;
        one not yet arrived or withdrawn is withdrawn, so the other ranks' verdict is ``failed``
        too. Writes in flight are forgotten: call this only once the transports are stopped.

        This rank cannot wait for the verdict. A process that exits now (``report=False``) tells
        nobody: the group's verdict is the one ending, reported by the ranks that stay; its
        scheduler sees its connection close (the rank is *gone* for what it held), and the
        barrier service tells its decode rank the verdict once it is absent. One that goes on
        (a new worker's cache) reports what the verdict says when it is the only rank to withdraw
        ("rank R failed: ..."), with code ``unavailable``, which marks an ending decided alone."""
        self.writes.clear()
        effects: list[RankEffect] = []
        said = Ending(FAILED, clip(reason))
        alone = verdicts.withdrawn([RankView(self.s.rank, FAILED, reason=said.reason)])
        assert alone is not None
        ending = Ending(FAILED, alone.reason, ErrorCode.UNAVAILABLE.value)
        for req in list(self._requests.values()):
            word = None
            if req.agreement not in (Agreement.ARRIVED, Agreement.WITHDRAWN):
                word = self.words.withdrawal(req.info, said, req.admitted is not None)
                effects.append(ToBarrier(word))
            req.inflight, req.outcome = 0, ending
            self.life.abandon(req, now)
            told = self._end(req, ending, now, word=word)
            effects += told if report else [e for e in told if not isinstance(e, (ToEngine, ToPeer))]
        return effects

    def stalled(self, reason: str, now: float) -> list[RankEffect]:
        """This process did not run for a while (the shell saw it wake late): every request still
        writing or waiting for a signal stops (drains what is in flight, withdraws with
        ``reason``) and waits for the verdict. Its rounds may have ended without it, and its decode
        rank been told: no byte written now could be trusted to land in blocks still reserved."""
        effects: list[RankEffect] = []
        for req in list(self._requests.values()):
            if req.data in (Data.WAIT_SIGNAL, Data.ACTIVE):
                effects += self._stop(req, Ending(FAILED, clip(reason)), now)
        return effects

    def reannounce(self, now: float) -> list[RankEffect]:
        """The barrier service restarted: every word no verdict answered yet, again (see Words)."""
        return self.words.reannounce(list(self._requests.values()), now)

    def sizes(self) -> dict[str, int]:
        """Entries in every table (see reporting.sizes)."""
        return reporting.sizes(self.life, self.intake, self.writes, self.words)

    def new_worker(self) -> int:
        """A model worker (re)registered: a new step sequence (see Intake.new_worker)."""
        return self.intake.new_worker()

    def origin_of(self, key: Key) -> bytes | None:
        """The connection request instance ``key``'s cache_info came from, while it is live here."""
        return req.origin if (req := self._requests.get(key)) is not None else None

    def origins(self) -> dict[Key, bytes | None]:
        """Every live request instance and its origin: what a shell whose core broke still needs."""
        return {key: req.origin for key, req in self._requests.items()}

    def holds(self, key: Key) -> list[str]:
        """Names of the tables that still hold request instance ``key`` as live."""
        return reporting.holds(key, self.life, self.intake, self.writes, self.words)

    def snapshot(self, now: float, limit: int | None = None) -> list[dict[str, Any]]:
        """One line per live request, oldest first, for operators: its states, age, what it waits
        for (``limit``: only that many, and only those built)."""
        live = self._requests.values()
        return reporting.snapshot(live if limit is None else itertools.islice(live, limit), now, self.s.num_layers)

    def _enter(self, info: CacheInfo, now: float, origin: bytes | None) -> Request:
        self.intake.enter(info)
        return self.life.enter(info, now, origin)

    def _recover(
        self, req: Request, signal: PendingSignal, parked: bool, now: float
    ) -> tuple[list[RankEffect], list[Item]]:
        """Both halves are here: the single-request job, with every chunk that waits for it."""
        self.life.move(req, now, data=DE.RECOVER)
        req.recovered = now
        reason, items = self.intake.recover(req, signal, parked)
        return self._bad_chunk(req, reason, now), items

    def _bad_chunk(self, req: Request, reason: str | None, now: float) -> list[RankEffect]:
        """A chunk that does not fit stops the request once admitted (before, the admission names
        the cache_infos' divergence it may be; nothing is written meanwhile)."""
        if reason is None:
            return []
        problem, ending = Problem(ErrorCode.BAD_LAYOUT, reason, req.info.request_id), Ending(FAILED, reason)
        if req.agreement is Agreement.UNADMITTED:
            req.unfit = req.unfit or ending
            return [problem]
        return [problem, *self._stop(req, ending, now)]

    def _post(self, items: list[Item], now: float) -> list[RankEffect]:
        if self._held is not None:  # (see hold)
            self._held += items
            return []
        writes, finished = self.writes.plan(items, self._requests, self.intake.steps)
        effects: list[RankEffect] = list(writes)
        for req in finished:
            effects += self._maybe_arrive(req, now)
        return effects

    def _maybe_arrive(self, req: Request, now: float) -> list[RankEffect]:
        return self.words.arrive(req, now) if req.writing and self.writes.written(req) else []

    def _stop(self, req: Request, ending: Ending, now: float) -> list[RankEffect]:
        """This rank will not finish the request: drain its writes, then withdraw."""
        if req.data is Data.WAIT_SIGNAL:
            self.intake.pending.drop_info(req.info.slot, req.info.step, req.key)
            return self.words.withdraw(req, ending, now, DE.HALT)
        if req.data is not Data.ACTIVE:
            return []  # already stopping, or arrived: the verdict decides
        self.intake.detach(req)
        if not req.inflight:
            return self.words.withdraw(req, ending, now, DE.HALT)
        req.stop = ending
        self.life.move(req, now, data=DE.DRAIN)
        return []

    def _drained(self, req: Request, now: float) -> list[RankEffect]:
        self.life.move(req, now, data=DE.DRAINED)
        if req.outcome is not None:
            return self._end(req, req.outcome, now)
        assert req.stop is not None, "a request drains because it stopped or was decided"
        return self.words.withdraw(req, req.stop, now)

    def _end(self, req: Request, ending: Ending, now: float, *, word: Withdraw | None = None) -> list[RankEffect]:
        """End ``req`` here; ``word``: the withdrawal it ends on, when no verdict came (see Ended)."""
        ending = ending._replace(reason=clip(ending.reason))
        self.life.end(req)
        self.intake.release(req, now)
        self.words.remember(req.key, Ended(ending, True, req.info.peer, word), now)
        return reporting.ended(req, ending, self.s.rank, now)

    def _overdue(self, req: Request, now: float) -> list[RankEffect]:
        ending = Ending(FAILED, reporting.overdue(req, self.s))
        if req.timer in (Timer.ADMISSION, Timer.VERDICT):  # it ends without the group's word: alone
            ending = ending._replace(code=ErrorCode.UNAVAILABLE.value)
        if req.timer is Timer.ADMISSION:  # the service is gone or cut off: withdraw (so one that comes
            self.intake.detach(req)  # back fails the others too) and end without waiting longer
            said = self.words.withdraw(req, ending, now, DE.HALT)
            self.words.decide(req, ending, now)
            return said + self._end(req, ending, now, word=self.words.withdrawal(req.info, ending))
        if req.timer is Timer.DRAIN:  # the transport never reported: give its writes up to end
            detail = f"{self.writes.give_up(req)} writes of request {req.info.request_id} {ending.reason}"
            return [Problem(ErrorCode.INTERNAL, detail, req.info.request_id, reply=False), *self._drained(req, now)]
        if req.timer is Timer.VERDICT:
            self.words.decide(req, ending, now)
            return self._end(req, ending, now)
        return self._stop(req, ending, now)  # no signal, no progress: stop, drain, withdraw


def _layers(which: list[int]) -> str:
    """``which`` (sorted) for a reason: "layer 3", "layers 0..31" when consecutive, else listed."""
    if len(which) == 1:
        return f"layer {which[0]}"
    if which[-1] - which[0] == len(which) - 1:
        return f"layers {which[0]}..{which[-1]}"
    return "layers " + ",".join(map(str, which))
