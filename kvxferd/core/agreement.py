"""Agreement: what a prefill rank says at the barrier, and what it remembers of endings.

Theory of operation
-------------------
A rank says one word per round about a request instance (see
:mod:`kvxferd.core.barrier`): ``Admit`` with the terms it holds the moment it
takes the cache_info, ``Arrive`` with a digest once it wrote everything, or
``Withdraw`` with a status and reason once it stopped and nothing it posted
is in flight. The digest depends only on the request and the steps that
computed it, never on message order, so ranks that did the same job agree.
Saying a word moves the request's agreement state (:mod:`kvxferd.core.states`).

A verdict decides the instance; every rank reports the status and reason it
carries. :class:`Words` also keeps the two bounded memories a rank needs about
instances it does not hold: aborts that came before their cache_info, and how
an instance ended (:class:`~kvxferd.core.request.Ended`), so that a late
message of it (a repeated cache_info, a verdict, an abort) is recognised, and
a withdrawal no verdict answered yet is said again if the barrier service
restarts (:meth:`Words.again`). A verdict for an instance this rank never held
(its cache_info never came) still tells its decode rank, named in the verdict.
"""

from __future__ import annotations

from kvxferd.core import reporting
from kvxferd.core.blocks import fingerprint
from kvxferd.core.effects import Problem, RankEffect, ToBarrier, ToEngine, ToPeer
from kvxferd.core.lifecycle import Lifecycle
from kvxferd.core.memory import Memory
from kvxferd.core.request import Ended, Ending, Request, terms_of
from kvxferd.core.settings import RankSettings
from kvxferd.core.states import Agreement, AgreementEvent, DataEvent, allows
from kvxferd.protocol import (
    Abort,
    Admit,
    Arrive,
    CacheInfo,
    Digest,
    Diverged,
    ErrorCode,
    Expired,
    Key,
    Release,
    Status,
    TransferResult,
    Withdraw,
)
from kvxferd.protocol.fields import clip

Verdict = Release | Diverged | Expired
VERDICTS = (Release, Diverged, Expired)


class Words:
    def __init__(self, settings: RankSettings, life: Lifecycle) -> None:
        self.sp = settings
        self.life = life
        self.aborts: Memory[Key, str] = Memory(limit=settings.max_requests, ttl_s=settings.pending_timeout_s)
        #: how this rank's own instances ended (its engine told): what ``forgetful`` guards
        self.ended: Memory[Key, Ended] = Memory(limit=settings.max_ended, ttl_s=settings.ended_memory_s)
        #: verdicts learned for instances this process never held (a joining rank hears
        #: every one its group remembers, tens of thousands at once): kept apart, so they never
        #: crowd this rank's own endings out and never make it refuse new requests (forgetful);
        #: one of them pushed out early only means a late cache_info of it asks the barrier again
        self.learned: Memory[Key, Ended] = Memory(limit=settings.max_ended, ttl_s=settings.ended_memory_s)

    # -- the words ---------------------------------------------------------------------

    def admit(self, info: CacheInfo) -> ToBarrier:
        """The word of a request just taken in (it is UNADMITTED from its start)."""
        sp = self.sp
        return ToBarrier(Admit(sp.group, info.request_id, info.instance, sp.rank, terms_of(info)))

    def admitted(self, req: Request, now: float) -> bool:
        """``Admitted`` came: True if it moved the request (not a repeat, not a stopping request)."""
        if not allows(req, AgreementEvent.ADMIT):
            return False
        req.admitted = now
        self.life.move(req, now, agreement=AgreementEvent.ADMIT)
        return True

    def arrive(self, req: Request, now: float) -> list[RankEffect]:
        """Every layer is written: the request goes quiet and arrives with its digest."""
        req.sent = now
        self.life.move(req, now, data=DataEvent.FINISH, agreement=AgreementEvent.ARRIVE)
        return [self._arrival(req)]

    def withdraw(self, req: Request, ending: Ending, now: float, data: DataEvent | None = None) -> list[RankEffect]:
        """This rank stopped the request (``data``: how its data machine stops, if it did not yet)."""
        req.stop = ending
        self.life.move(req, now, data=data, agreement=AgreementEvent.WITHDRAW)
        return [ToBarrier(self.withdrawal(req.info, ending, req.admitted is not None))]

    def withdrawal(self, info: CacheInfo, ending: Ending, admitted: bool = False) -> Withdraw:
        sp = self.sp
        reason = clip(ending.reason)
        return Withdraw(sp.group, info.request_id, info.instance, sp.rank, ending.status, reason, admitted, info.peer)

    def decide(self, req: Request, ending: Ending, now: float, data: DataEvent | None = None) -> None:
        """The request's ending is known (a verdict, or this rank's own last decision)."""
        req.outcome = ending
        self.life.move(req, now, data=data, agreement=AgreementEvent.DECIDE)

    def reannounce(self, requests: list[Request], now: float) -> list[RankEffect]:
        """The barrier service restarted: the word each request waits on a verdict for (an
        admission not yet answered, the arrival, the withdrawal), and the withdrawals of instances
        that ended here before any verdict answered them. A request admitted before the restart
        has no word out until it arrives or withdraws."""
        effects: list[RankEffect] = []
        for req in requests:
            word: ToBarrier | None = None
            if req.agreement is Agreement.UNADMITTED:
                word = self.admit(req.info)
            elif req.agreement is Agreement.ARRIVED:
                word = self._arrival(req)
            elif req.agreement is Agreement.WITHDRAWN and req.stop is not None:
                word = ToBarrier(self.withdrawal(req.info, req.stop, req.admitted is not None))
            if word is not None:
                effects.append(word)
                self.life.move(req, now, agreement=AgreementEvent.REANNOUNCE)
        return effects + [ToBarrier(ended.word) for ended in self.ended.values() if ended.word is not None]

    def _arrival(self, req: Request) -> ToBarrier:
        info, sp = req.info, self.sp
        chunks = [(c.step, c.token_offset, c.token_count) for c in req.chunks]
        fp = fingerprint(info.request_id, info.num_tokens, info.src_blocks, info.dst_blocks, chunks, sp.num_layers)
        digest = Digest(sp.num_layers, req.blocks_assigned, req.bytes_done, fp)
        return ToBarrier(Arrive(sp.group, info.request_id, info.instance, sp.rank, digest, peer=info.peer))

    # -- verdicts ----------------------------------------------------------------------

    def outcome(self, req: Request, verdict: Verdict) -> Ending:
        """Every rank reports the status and reason the verdict carries. A Release to a rank that
        did not arrive means the instance was released before this process took it (the service
        answered its admission with the remembered verdict): it wrote nothing and cannot vouch."""
        if isinstance(verdict, Release) and req.agreement is not Agreement.ARRIVED:
            if req.agreement is Agreement.UNADMITTED:
                return self._restarted()
            state = f"{req.data.value}, {req.agreement.value}"
            reason = f"released by the barrier while this rank was {state} (barrier bug?)"
            return Ending(Status.FAILED, reason, ErrorCode.INTERNAL.value)
        others = set(range(self.sp.world_size)) - {self.sp.rank}
        if isinstance(verdict, Expired) and others and set(verdict.missing) == others and req.admitted is None:
            # every other rank was silent in the admission round: no group decided this with it
            # (its cache_info came to this process only, or after the group's verdict was
            # forgotten): an ending of its own
            return Ending(verdict.status, verdict.reason, ErrorCode.UNAVAILABLE.value)
        return Ending(verdict.status, verdict.reason)

    def _restarted(self) -> Ending:
        """The ending a process reports for an instance released before it held it: its predecessor
        wrote it, and only the writer could vouch for the registration the bytes went into. Decided
        here alone (the group's ending is ok): code ``unavailable``."""
        return Ending(
            Status.FAILED,
            f"prefill rank {self.sp.rank} restarted after the request was released; "
            "its notice was lost with the process that wrote it",
            ErrorCode.UNAVAILABLE.value,
        )

    def ending_of(self, key: Key) -> Ended | None:
        """How instance ``key`` ended here, or was learned to have ended (None: neither)."""
        return self.ended.get(key) or self.learned.get(key)

    def learn(self, key: Key, verdict: Verdict, now: float) -> list[RankEffect]:
        """A final verdict for an instance this rank does not hold."""
        ended = self.ending_of(key)
        if ended is not None:
            ended.word = None  # the service has the word: nothing to say again after a restart
            return []  # it ended here already: a repeated or late verdict
        self.aborts.pop(key)
        # a Release: every rank arrived, this one included: it is a new process of this rank
        ending = self._restarted() if isinstance(verdict, Release) else Ending(verdict.status, clip(verdict.reason))
        self.learned.put(key, Ended(ending, False, verdict.peer), now)
        if not verdict.peer:
            return []
        notice = TransferResult(key[0], ending.status, ending.reason, self.sp.rank, instance=key[1], code=ending.code)
        return [ToPeer(verdict.peer, notice)]

    def repeat(self, info: CacheInfo, live: Request | None) -> Problem | None:
        """A cache_info of an instance in flight here, or one whose ending its engine was told."""
        rid, instance = info.request_id, info.instance
        if live is not None:
            detail = f"request {rid} instance {instance} is already in flight ({live.data.value})"
            return Problem(ErrorCode.DUPLICATE_REQUEST, detail, rid)
        ended = self.ending_of(info.key)
        if ended is not None and ended.told_engine:
            detail = (
                f"request {rid} instance {instance} already ended ({ended.ending.status.value}): cache_info dropped"
            )
            return Problem(ErrorCode.DUPLICATE_REQUEST, detail, rid)
        return None

    def straggler(self, info: CacheInfo, ended: Ended, origin: bytes | None, now: float) -> list[RankEffect]:
        """A cache_info of an instance that already ended here, or was learned to have ended: the
        engine is told that ending (once), and the decode peer if nobody told it yet. A learned
        one told so moves among this rank's own endings (guarded by ``forgetful``), unless those
        are full (it would push one out early); it stays with the learned then."""
        rid = info.request_id
        ending = ended.ending
        ended.told_engine = True
        if self.learned.get(info.key) is ended and not self.ended.full:
            self.learned.pop(info.key)
            self.ended.put(info.key, ended, now)
        result = TransferResult(
            rid, ending.status, ending.reason, self.sp.rank, 0, info.transport, instance=info.instance,
            code=ending.code,
        )  # fmt: skip
        effects: list[RankEffect] = [ToEngine(result, origin)]
        if ended.told_peer != info.peer:  # nobody yet, or the group's peer where this rank's differs
            other = ended.told_peer
            ended.told_peer = info.peer
            effects.append(ToPeer(info.peer, result))
            if other:
                # the verdict learned named another decode peer (a divergence): this one's ranks
                # have writers that told the other, or no one; the barrier service, hearing this
                # rank's word name it, tells them for every writer
                effects.append(ToBarrier(self.withdrawal(info, ending)))
        return effects

    def refuse(
        self, info: CacheInfo, code: ErrorCode, detail: str, now: float, origin: bytes | None
    ) -> list[RankEffect]:
        """A cache_info refused without keeping it: an error reply, the failed result to the engine
        and to the decode peer at once, and a withdrawal, so that the verdict every other rank
        reports is ``failed`` too. Only a short memory of the ending is kept."""
        ending = Ending(Status.FAILED, clip(detail))
        withdraw = self.withdrawal(info, ending)
        if not self.ended.full:  # (full: see forgetful; a repeat is refused again, never taken as new)
            self.remember(info.key, Ended(ending, True, info.peer, withdraw), now)
        self.aborts.pop(info.key)
        problem = Problem(code, ending.reason, info.request_id)
        return [problem, *reporting.refused(info, code, ending.reason, self.sp.rank, origin), ToBarrier(withdraw)]

    def early_abort(self, msg: Abort, reason: str, now: float) -> list[RankEffect]:
        """An abort of an instance this rank does not hold: remembered until its cache_info comes
        (then it ends as aborted at once), unless the instance already ended here."""
        key = msg.key
        if key in self.ended or key in self.learned:
            return []  # a late abort of an instance that already ended: nothing to do
        if self.aborts.full and key not in self.aborts:
            detail = f"abort for request {msg.request_id} instance {msg.instance} not kept: "
            detail += f"{self.aborts.limit} aborts of unseen instances are already remembered"
            return [Problem(ErrorCode.TABLE_FULL, detail, msg.request_id)]
        self.aborts.put(key, reason, now)
        return []

    def forgetful(self, info: CacheInfo, live: int, now: float) -> tuple[ErrorCode, str] | None:
        """Why ``info`` may not be taken now, if the memory of endings, with room kept for the
        ``live`` requests' own, is full of endings still within their time: taking it would push
        one out early, and a repeat of that one would then be taken as new and end twice."""
        if len(self.ended) + live < self.ended.limit:
            return None
        self.ended.expire(now)
        if len(self.ended) + live < self.ended.limit:
            return None
        s = self.sp
        return ErrorCode.TABLE_FULL, (
            f"request {info.request_id}: this rank remembers {s.max_ended} endings of the last "
            f"{s.ended_memory_s:g}s (limits.max_ended) and takes no new request until the oldest is forgotten"
        )

    def remember(self, key: Key, ended: Ended, now: float) -> None:
        self.ended.put(key, ended, now)

    # -- time ----------------------------------------------------------------------------

    def on_timer(self, now: float) -> None:
        self.aborts.expire(now)
        self.ended.expire(now)
        self.learned.expire(now)

    def next_deadline(self) -> float | None:
        memories = (self.aborts, self.ended, self.learned)
        times = [t for t in (m.next_deadline() for m in memories) if t is not None]
        return min(times, default=None)
