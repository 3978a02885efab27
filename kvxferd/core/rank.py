"""The prefill rank's brain: from signals and cache_infos to writes, arrivals and results.

Theory of operation
-------------------
Inputs are protocol messages plus write completions, each with ``now``;
outputs are effects (:mod:`kvxferd.core.effects`). Nothing here reads a clock,
touches a socket or starts a thread. A request *instance* is named by
``(request_id, instance)``; every table is keyed by it, so an id reused with
a new instance starts clean and a late message of the old one is never
credited to it.

1. A layer-0 signal names slots. A slot entry whose ``start_step`` is the
   signal's step is a request's first chunk: it pairs with a parked cache_info
   for ``(slot, step)`` or is parked itself; a cache_info pairs with a parked
   signal or is parked. Pairing recovers a single-request job
   (:mod:`kvxferd.core.pending`). Any other slot entry is a later chunk of the
   request that began at ``(slot, start_step)``: it joins that job, or is
   parked until the job is recovered.
2. **No byte before agreement.** The moment a rank accepts a cache_info it
   *admits* it at the barrier with the terms it holds, and goes on pairing and
   collecting ready layers. Nothing is written until the barrier answers
   ``Admitted`` (every rank holds the same cache_info); then every layer that
   became ready meanwhile is posted at once. The round trip overlaps compute.
3. A job's chunk sends the blocks it completed. When layer L of a step is
   ready, every admitted job chunk of that step posts layer L at once: one
   write per (peer, transport, layer), runs merged across requests.
4. When every layer of every chunk is confirmed written, the rank *arrives*
   at the barrier with a digest. It never waits there: the verdict comes back
   as a message. A rank that stops a request (abort, failure, timeout) first
   waits for its in-flight writes, then *withdraws*.
5. **One ending, the same everywhere.** The final verdict carries the status
   and reason; the rank reports exactly those to its engine and sends one
   notice to its decode peer, and keeps no trace of the instance but a short
   memory of how it ended. A cache_info the rank *refuses* (bad layout, full
   table, shutting down...) keeps no state: the rank reports ``failed`` to the
   engine and its decode peer at once and withdraws; a failed withdrawal
   decides the verdict (:mod:`kvxferd.core.verdicts`), so every other rank
   reports ``failed`` too.
6. An Abort for an instance not seen yet is remembered; its cache_info then
   withdraws as aborted at once. A verdict for an instance this rank never held
   (it never got the cache_info) still tells its decode peer, named in the
   verdict, and is remembered so a straggling cache_info is answered with it.
7. Every waiting request has a deadline; :meth:`RankCore.on_timer` settles the
   overdue ones. Tables are bounded; overflow is refused loudly.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import count
from typing import Any

from kvxferd.core.blocks import blocks_complete, blocks_needed, fingerprint, merge_runs, runs_of
from kvxferd.core.deadlines import Deadlines
from kvxferd.core.effects import Effect, PostWrite, Problem, Run, ToBarrier, ToEngine, ToPeer
from kvxferd.core.lifecycle import Action, State, next_state
from kvxferd.core.pending import PendingSignal, PendingTable
from kvxferd.core.progress import StepTable
from kvxferd.core.recall import Recall
from kvxferd.core.request import Chunk, Ending, Key, Part, Request, terms_of
from kvxferd.protocol import (
    Abort,
    Admit,
    Admitted,
    Arrive,
    CacheInfo,
    Digest,
    Diverged,
    ErrorCode,
    Expired,
    KVReady,
    LayerSignal,
    Message,
    Release,
    SlotChunk,
    Status,
    TransferResult,
    Withdraw,
)
from kvxferd.protocol.fields import clip


@dataclass(frozen=True, slots=True)
class RankSettings:
    """What the core needs to know about its rank; the runtime builds it from the config."""

    group: str
    rank: int
    world_size: int
    num_layers: int
    num_blocks: int  # blocks in this rank's (source) cache
    block_tokens: int  # tokens per block
    block_bytes: int  # bytes of one block of one region (K or V; both when packed), one layer, this rank
    max_requests: int = 4096
    max_pending_signals: int = 4096
    max_steps: int = 1024
    max_step_gap: int = 1 << 16  # a layer-0 signal this far past the last step is refused, not adopted
    pending_timeout_s: float = 30.0  # a half job waiting for its other half; an abort waiting for its request
    progress_timeout_s: float = 30.0  # a job, or its drain, without progress
    verdict_timeout_s: float = 60.0  # an admission, arrival or withdrawal without a verdict
    planes: int = 2  # regions per layer: K and V (2), or one holding both (1)

    @property
    def ended_memory_s(self) -> float:
        """How long an ending is remembered: past any straggler the barrier could still answer."""
        return self.pending_timeout_s + self.verdict_timeout_s


class RankCore:
    """Pure state of one prefill rank. See the module docstring."""

    def __init__(self, settings: RankSettings) -> None:
        self.s = settings
        self._requests: dict[Key, Request] = {}
        self._starts: dict[tuple[int, int], Key] = {}  # (slot, first step) -> live request instance
        self._pending = PendingTable()
        self._steps = StepTable()
        self._writes: dict[int, tuple[Part, ...]] = {}
        self._write_ids = count(1)
        self._deadlines: Deadlines[Key] = Deadlines()  # one per live request
        self._signal_deadlines: Deadlines[tuple[int, int]] = Deadlines()  # one per parked (slot, step)
        self._aborts: Recall[Key, str] = Recall(ttl_s=settings.pending_timeout_s, limit=settings.max_requests)
        self._ended: Recall[Key, Ending] = Recall(ttl_s=settings.ended_memory_s, limit=4 * settings.max_requests)
        # (slot, first step) of requests that ended or were refused here: their late signals are dropped
        self._closed: Recall[tuple[int, int], bool] = Recall(
            ttl_s=settings.pending_timeout_s, limit=settings.max_pending_signals
        )

    # ------------------------------------------------------------------ inputs

    def handle(self, msg: Message, now: float) -> list[Effect]:
        """Dispatch one inbound message."""
        if isinstance(msg, LayerSignal):
            return self.on_layer(msg, now)
        if isinstance(msg, CacheInfo):
            return self.on_cache_info(msg, now)
        if isinstance(msg, Abort):
            return self.on_abort(msg, now)
        if isinstance(msg, (Admitted, Release, Diverged, Expired)):
            return self.on_verdict(msg, now)
        return [Problem(ErrorCode.WRONG_ROLE, f"a prefill rank does not accept {type(msg).__name__}")]

    def on_cache_info(
        self,
        info: CacheInfo,
        now: float,
        refusal: tuple[ErrorCode, str] | None = None,
        origin: bytes | None = None,
    ) -> list[Effect]:
        """A cache_info from the scheduler connection ``origin`` (the shell's name for it; the
        request's result goes there). ``refusal`` (code, detail): the shell cannot take
        requests now (not registered, shutting down); the cache_info is refused unless it
        is a duplicate or a straggler of an instance that already ended."""
        s, rid, key = self.s, info.request_id, info.key
        live = self._requests.get(key)
        if live is not None:
            detail = f"request {rid} instance {info.instance} is already in flight ({live.state.value})"
            return [Problem(ErrorCode.DUPLICATE_REQUEST, detail, rid)]
        ended = self._ended.get(key)
        if ended is not None:
            return self._straggler(info, ended, now, origin)
        if refusal is not None:
            return self.refuse(info, *refusal, now, origin=origin)
        reason = self._aborts.pop(key)
        if reason is not None:  # aborted before it got here: end as aborted at once, everywhere
            # Kept even when the table is full, so that it reports the verdict's status; such entries
            # are bounded by the memory of aborts (max_requests), so the table by twice its limit.
            req = self._enter(info, now, origin)
            self._discard_parked(info)
            return self._withdraw(req, Status.ABORTED, reason, now)

        need = blocks_needed(info.num_tokens, s.block_tokens)
        if len(info.src_blocks) != need:
            detail = (
                f"request {rid}: {info.num_tokens} tokens need {need} blocks of {s.block_tokens} tokens, "
                f"cache_info names {len(info.src_blocks)}"
            )
            return self.refuse(info, ErrorCode.BAD_LAYOUT, detail, now, origin=origin)
        top = max(info.src_blocks)
        if top >= s.num_blocks:
            detail = f"request {rid}: source block {top} is outside this rank's {s.num_blocks} blocks"
            return self.refuse(info, ErrorCode.OUT_OF_RANGE, detail, now, origin=origin)
        if len(self._requests) >= s.max_requests:
            detail = f"request {rid}: request table full ({s.max_requests} requests in flight)"
            return self.refuse(info, ErrorCode.TABLE_FULL, detail, now, origin=origin)
        holder = self._starts.get((info.slot, info.step))
        if holder is not None:
            detail = f"request {rid}: slot {info.slot} of step {info.step} already belongs to request {holder[0]}"
            return self.refuse(info, ErrorCode.SLOT_BUSY, detail, now, origin=origin)

        req = self._enter(info, now, origin)
        effects: list[Effect] = [ToBarrier(Admit(s.group, rid, info.instance, s.rank, terms_of(info)))]
        signal = self._pending.take_signal(info.slot, info.step)
        if signal is None:
            self._pending.park_info(info.slot, info.step, key)
            self._arm(req, now)
            return effects
        items = self._recover(req, signal, True, effects, now)
        return effects + self._post(items, now)

    def on_layer(self, sig: LayerSignal, now: float) -> list[Effect]:
        s = self.s
        if sig.layer >= s.num_layers:
            detail = f"layer {sig.layer} of step {sig.step}: the model has {s.num_layers} layers"
            return [Problem(ErrorCode.OUT_OF_RANGE, detail)]
        steps = self._steps
        if sig.layer > 0:
            record = steps.get(sig.step)
            if record is None:
                if steps.highest is None or sig.step > steps.highest:
                    detail = f"layer {sig.layer} of step {sig.step} arrived before that step's layer-0 signal"
                    return [Problem(ErrorCode.STALE_SIGNAL, detail)]
                return []  # a step nothing waits on any more
            record.ready.add(sig.layer)
            return self._post([(key, idx, sig.layer) for key, idx in record.members.items()], now)

        if steps.highest is not None and sig.step <= steps.highest:
            detail = f"layer-0 signal of step {sig.step} after step {steps.highest}: step ids must increase"
            return [Problem(ErrorCode.STALE_SIGNAL, detail)]
        if steps.highest is not None and sig.step - steps.highest > s.max_step_gap:
            detail = (
                f"layer-0 signal of step {sig.step} refused: {sig.step - steps.highest} steps past step "
                f"{steps.highest}, at most {s.max_step_gap} allowed"
            )
            return [Problem(ErrorCode.OUT_OF_RANGE, detail)]
        steps.highest = sig.step
        if not sig.slots:
            return []
        if len(steps) >= s.max_steps:
            detail = f"step {sig.step} dropped: step table full ({s.max_steps} steps in progress)"
            return [Problem(ErrorCode.TABLE_FULL, detail)]
        steps.open(sig.step)
        effects: list[Effect] = []
        items: list[tuple[Key, int, int]] = []
        for chunk in sig.slots:
            signal = PendingSignal(sig.step, chunk, now)
            owner = self._starts.get((chunk.slot, chunk.start_step))
            req = self._requests[owner] if owner is not None else None
            if req is None and (chunk.slot, chunk.start_step) in self._closed:
                continue  # a signal of a request that ended or was refused here: nothing to send
            if chunk.start_step == sig.step:  # a first chunk: pairs with its cache_info
                key = self._pending.take_info(chunk.slot, sig.step)
                if key is not None:
                    items += self._recover(self._requests[key], signal, False, effects, now)
                    continue
                if req is not None:
                    continue  # its request already stopped (aborted before its signal): nothing to send
            else:  # a later chunk: joins its job once that job exists
                if req is not None and req.state is State.ACTIVE:
                    items += self._attach(req, sig.step, chunk, effects, now)
                    continue
                if req is not None and req.state is not State.WAIT_SIGNAL:
                    continue  # the request is stopping or done: nothing more to send for it
            if self._pending.signal_count >= s.max_pending_signals:
                detail = f"slot {chunk.slot} of step {sig.step} dropped: {s.max_pending_signals} signals already wait"
                effects.append(Problem(ErrorCode.TABLE_FULL, detail))
            else:
                self._pending.park_signal(signal)
                steps.get(sig.step).parked += 1  # type: ignore[union-attr]
                self._signal_deadlines.set((chunk.slot, sig.step), now + s.pending_timeout_s)
        steps.close_if_unused(sig.step)
        return effects + self._post(items, now)

    def on_abort(self, msg: Abort, now: float) -> list[Effect]:
        key = msg.key
        reason = msg.reason or "aborted by the engine"
        req = self._requests.get(key)
        if req is not None:
            return self._stop(req, Status.ABORTED, reason, now)
        if key in self._ended:
            return []  # a late abort of an instance that already ended: nothing to do
        if self._aborts.full and key not in self._aborts:
            detail = (
                f"abort for request {msg.request_id} instance {msg.instance} not kept: "
                f"{self._aborts.limit} aborts of unseen instances are already remembered"
            )
            return [Problem(ErrorCode.TABLE_FULL, detail, msg.request_id)]
        self._aborts.put(key, reason, now)
        return []

    def write_done(
        self, write_id: int, now: float, error: str | None = None, transport: str | None = None
    ) -> list[Effect]:
        """The transport finished write ``write_id``; ``error`` says why it failed, if it did;
        ``transport`` names the one it went over (the request's result reports it)."""
        parts = self._writes.pop(write_id, None)
        if parts is None:
            return [Problem(ErrorCode.INTERNAL, f"completion for unknown write {write_id}", reply=False)]
        effects: list[Effect] = []
        touched: dict[Key, Request] = {}
        for part in parts:
            req = self._requests.get(part.key)
            if req is None:
                continue
            req.inflight -= 1
            if req.transport is None:
                req.transport = transport
            touched[part.key] = req
            if error is None:
                req.chunks[part.chunk].confirmed.add(part.layer)
                req.bytes_done += part.nbytes
            elif req.state is State.ACTIVE:
                reason = f"write of layer {part.layer} to {req.info.peer} failed: {error}"
                effects += self._stop(req, Status.FAILED, reason, now)
        for req in touched.values():
            if req.state is State.ACTIVE:
                self._arm(req, now)
                effects += self._maybe_arrive(req, now)
            elif req.state is State.DRAINING and req.inflight == 0:
                effects += self._drained(req, now)
        return effects

    def on_verdict(self, verdict: Admitted | Release | Diverged | Expired, now: float) -> list[Effect]:
        if verdict.group != self.s.group:
            detail = f"verdict for group {verdict.group!r} reached group {self.s.group!r}"
            return [Problem(ErrorCode.BAD_MESSAGE, detail, verdict.key, reply=False)]
        key = (verdict.key, verdict.instance)
        req = self._requests.get(key)
        if isinstance(verdict, Admitted):
            return self._admitted(req, now) if req is not None else []
        if req is None:
            return self._learn(key, verdict, now)
        outcome = self._outcome(req, verdict)
        if req.state is State.ACTIVE:
            self._detach(req)
        if req.inflight > 0:
            if req.state is State.ACTIVE:
                req.state = next_state(req.state, Action.DRAIN, self._who(req))
                self._arm(req, now)
            req.outcome = outcome
            return []
        return self._end(req, *outcome, now)

    def on_timer(self, now: float) -> list[Effect]:
        for memory in (self._aborts, self._ended, self._closed):
            memory.expire(now)
        effects: list[Effect] = []
        for slot, step in self._signal_deadlines.pop_due(now):
            effects += self._expire_signal(slot, step)
        for key in self._deadlines.pop_due(now):
            req = self._requests.get(key)
            if req is not None:
                effects += self._overdue(req, now)
        return effects

    def next_deadline(self) -> float | None:
        times = [
            self._deadlines.earliest(),
            self._signal_deadlines.earliest(),
            self._aborts.next_deadline(),
            self._ended.next_deadline(),
            self._closed.next_deadline(),
        ]
        return min((t for t in times if t is not None), default=None)

    def refuse(
        self, info: CacheInfo, code: ErrorCode, detail: str, now: float, *, origin: bytes | None = None
    ) -> list[Effect]:
        """Refuse a cache_info without keeping it: an error reply, the failed result to the engine
        and to the decode peer at once, and a withdrawal, so that the verdict every other rank
        reports is ``failed`` too. Only a short memory of the ending is kept."""
        s, rid = self.s, info.request_id
        detail = clip(detail)
        result = TransferResult(
            rid, Status.FAILED, detail, s.rank, transport=info.transport, instance=info.instance, code=code.value
        )
        withdraw = Withdraw(s.group, rid, info.instance, s.rank, Status.FAILED, detail)
        self._ended.put(info.key, Ending(Status.FAILED, detail, True, True, withdraw), now)
        self._aborts.pop(info.key)
        if code is not ErrorCode.SLOT_BUSY:  # a busy slot's signals belong to the request holding it
            self._close_start(info, now)
        return [Problem(code, detail, rid), ToEngine(result, origin), ToPeer(info.peer, result), ToBarrier(withdraw)]

    def close(self, reason: str, now: float) -> list[Effect]:
        """Forced shutdown: end every live request as failed with ``reason``, clear every table.

        A request this rank had not yet arrived or withdrawn for is withdrawn as
        failed, so the other ranks' verdict is ``failed`` as well. Writes still in
        flight are forgotten; call this only once the transports are stopped.
        """
        effects: list[Effect] = []
        self._writes.clear()
        s = self.s
        for req in list(self._requests.values()):
            info = req.info
            withdraw = None
            if req.state not in (State.ARRIVED, State.WITHDRAWN):
                withdraw = Withdraw(
                    s.group,
                    info.request_id,
                    info.instance,
                    s.rank,
                    Status.FAILED,
                    clip(reason),
                    req.admitted is not None,
                )
                effects.append(ToBarrier(withdraw))
            req.inflight = 0
            effects += self._end(req, Status.FAILED, reason, now, word=withdraw)
        return effects

    def reannounce(self) -> list[Effect]:
        """The barrier service restarted (its tables are empty): every word this rank said about a
        request still waiting on a verdict, again. Admissions not yet answered are admitted again;
        a request admitted before the restart has no word out until it arrives or withdraws; one
        that ended here on a withdrawal no verdict has answered yet is withdrawn again."""
        s = self.s
        effects: list[Effect] = []
        for req in self._requests.values():
            info = req.info
            if req.state in (State.WAIT_SIGNAL, State.ACTIVE) and req.admitted is None:
                effects.append(ToBarrier(Admit(s.group, info.request_id, info.instance, s.rank, terms_of(info))))
            elif req.state is State.ARRIVED:
                effects.append(ToBarrier(self._arrival(req)))
            elif req.state is State.WITHDRAWN and req.stop is not None:
                status, reason = req.stop
                admitted = req.admitted is not None
                effects.append(
                    ToBarrier(Withdraw(s.group, info.request_id, info.instance, s.rank, status, clip(reason), admitted))
                )
        effects += [ToBarrier(ended.word) for ended in self._ended.values() if ended.word is not None]
        return effects

    # ------------------------------------------------------------ introspection

    def sizes(self) -> dict[str, int]:
        """Entries in every table. ``aborts``, ``ended`` and ``closed_slots`` are bounded memories
        that empty themselves within ``pending_s + verdict_s``; the rest are empty when idle."""
        return {
            "requests": len(self._requests),
            "starts": len(self._starts),
            "parked_infos": self._pending.info_count,
            "parked_signals": self._pending.signal_count,
            "steps": len(self._steps),
            "writes": len(self._writes),
            "deadlines": len(self._deadlines) + len(self._signal_deadlines),
            "aborts": len(self._aborts),
            "ended": len(self._ended),
            "closed_slots": len(self._closed),
        }

    def new_worker(self) -> bool:
        """A model worker (re)registered: its step ids start a new sequence, so the next layer-0
        signal sets the window again (a step far ahead is refused only relative to one seen from
        the same worker). Only while no step is open; returns whether the window was reset."""
        if len(self._steps):
            return False
        self._steps.highest = None
        return True

    def origin_of(self, key: Key) -> bytes | None:
        """The connection request instance ``key``'s cache_info came from, while it is live here."""
        req = self._requests.get(key)
        return req.origin if req is not None else None

    def origins(self) -> dict[Key, bytes | None]:
        """Every live request instance and its origin: what a shell whose core broke still needs."""
        return {key: req.origin for key, req in self._requests.items()}

    def is_live(self, key: Key) -> bool:
        """Whether request instance ``key`` is in flight here."""
        return key in self._requests

    def holds(self, key: Key) -> list[str]:
        """Names of the tables that still hold request instance ``key`` as live."""
        found = []
        if key in self._requests:
            found.append("requests")
        if key in self._starts.values():
            found.append("starts")
        if self._pending.holds(key):
            found.append("parked_infos")
        if self._steps.holds(key):
            found.append("steps")
        if any(p.key == key for parts in self._writes.values() for p in parts):
            found.append("writes")
        if key in self._deadlines:
            found.append("deadlines")
        if key in self._aborts:
            found.append("aborts")
        return found

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        """One line per live request, for operators: state, age, what it waits for."""
        return [
            {
                "request_id": rid,
                "instance": instance,
                "state": req.state.value,
                "admitted": req.admitted is not None,
                "age_s": round(now - req.created, 3),
                "slot": req.info.slot,
                "step": req.info.step,
                "waiting_for": self._waiting_for(req),
                "inflight": req.inflight,
                "bytes": req.bytes_done,
            }
            for (rid, instance), req in self._requests.items()
        ]

    # ---------------------------------------------------------------- internals

    def _who(self, req: Request) -> str:
        return f"request {req.info.request_id} instance {req.info.instance} on {self.s.group} rank {self.s.rank}"

    def _enter(self, info: CacheInfo, now: float, origin: bytes | None) -> Request:
        req = Request(info=info, state=State.WAIT_SIGNAL, created=now, origin=origin)
        self._requests[info.key] = req
        self._starts.setdefault((info.slot, info.step), info.key)
        return req

    def _arm(self, req: Request, now: float) -> None:
        """Set the request's one deadline from its state."""
        s, state = self.s, req.state
        if state is State.WAIT_SIGNAL:
            when = req.created + s.pending_timeout_s
        elif state is State.ACTIVE and req.admitted is None:
            when = req.created + s.verdict_timeout_s
        elif state in (State.ACTIVE, State.DRAINING):
            when = now + s.progress_timeout_s
        else:
            when = now + s.verdict_timeout_s
        self._deadlines.set(req.info.key, when)

    def _straggler(self, info: CacheInfo, ended: Ending, now: float, origin: bytes | None) -> list[Effect]:
        """A cache_info of an instance that already ended here, or was learned to have ended."""
        rid = info.request_id
        if ended.told_engine:
            detail = f"request {rid} instance {info.instance} already ended ({ended.status.value}): cache_info dropped"
            return [Problem(ErrorCode.DUPLICATE_REQUEST, detail, rid)]
        ended.told_engine = True
        self._close_start(info, now)  # its signals, parked or to come, have nothing to join
        result = TransferResult(rid, ended.status, ended.reason, self.s.rank, 0, info.transport, instance=info.instance)
        effects: list[Effect] = [ToEngine(result, origin)]
        if not ended.told_peer:
            ended.told_peer = True
            effects.append(ToPeer(info.peer, result))
        return effects

    def _learn(self, key: Key, verdict: Release | Diverged | Expired, now: float) -> list[Effect]:
        """A final verdict for an instance this rank does not hold."""
        ended = self._ended.get(key)
        if ended is not None:
            ended.word = None  # the service has the word: nothing to say again after a restart
            return []  # it ended here already: a repeated or late verdict
        self._aborts.pop(key)
        if isinstance(verdict, Release):
            # every rank arrived, this one included: it is a new process of this rank, started after
            # its predecessor wrote the request and before it could say so. The bytes may be in
            # place, but only the writer could vouch for the registration they went into.
            status, reason = (
                Status.FAILED,
                (
                    f"prefill rank {self.s.rank} restarted after the request was released; "
                    "its notice was lost with the process that wrote it"
                ),
            )
        else:
            status, reason = verdict.status, clip(verdict.reason)
        told_peer = bool(verdict.peer)
        self._ended.put(key, Ending(status, reason, False, told_peer), now)
        if not told_peer:
            return []
        notice = TransferResult(key[0], status, reason, self.s.rank, instance=key[1])
        return [ToPeer(verdict.peer, notice)]

    def _discard_parked(self, info: CacheInfo) -> None:
        """Claim and drop every parked signal of a request that will send nothing."""
        signal = self._pending.take_signal(info.slot, info.step)
        if signal is not None:
            self._forget_signal(signal)
        while (later := self._pending.take_later_chunk(info.slot, info.step)) is not None:
            self._forget_signal(later)

    def _close_start(self, info: CacheInfo, now: float) -> None:
        """The request that began at ``(slot, step)`` sends nothing more from this rank: drop the
        signals of it that wait, and those that come later."""
        if (info.slot, info.step) in self._starts:
            return  # another live request holds the slot: its signals are its own
        self._closed.put((info.slot, info.step), True, now)
        self._discard_parked(info)

    def _forget_signal(self, signal: PendingSignal) -> None:
        """A parked signal was claimed by a job (attach it first: this may close its step)."""
        self._signal_deadlines.cancel((signal.chunk.slot, signal.step))
        self._steps.unpark(signal.step)

    def _recover(
        self, req: Request, signal: PendingSignal, parked: bool, effects: list[Effect], now: float
    ) -> list[tuple[Key, int, int]]:
        """Both halves are here: make the single-request job and attach every chunk we hold.

        ``parked`` says whether ``signal`` came out of the pending table (the
        cache_info came second) or straight off the wire (the signal came second).
        """
        req.state = next_state(req.state, Action.RECOVER, self._who(req))
        req.recovered = now
        info = req.info
        self._arm(req, now)
        items = self._attach(req, signal.step, signal.chunk, effects, now)
        if parked:
            self._forget_signal(signal)
        while req.state is State.ACTIVE and req.next_token < info.num_tokens:
            later = self._pending.take_later_chunk(info.slot, info.step)
            if later is None:
                break
            items += self._attach(req, later.step, later.chunk, effects, now)
            self._forget_signal(later)
        return items

    def _attach(
        self, req: Request, step: int, chunk: SlotChunk, effects: list[Effect], now: float
    ) -> list[tuple[Key, int, int]]:
        """Add one chunk to a job; return the (request, chunk, layer) writes now possible."""
        info, s = req.info, self.s
        key = info.key
        end_token = chunk.token_offset + chunk.token_count
        reason = None
        if end_token > info.num_tokens:
            reason = f"tokens {chunk.token_offset}..{end_token} are beyond the request's {info.num_tokens} tokens"
        elif req.chunks and chunk.token_offset != req.next_token:
            reason = f"the chunk starts at token {chunk.token_offset}, the previous one ended at {req.next_token}"
        elif not req.chunks and chunk.token_offset != 0:
            reason = f"the first chunk starts at token {chunk.token_offset}, not 0"
        if reason is not None:
            reason = f"step {step}, slot {chunk.slot}: {reason}"
            effects += [Problem(ErrorCode.BAD_LAYOUT, reason, info.request_id)]
            effects += self._stop(req, Status.FAILED, reason, now)
            return []
        end_block = blocks_complete(end_token, info.num_tokens, s.block_tokens)
        first = req.blocks_assigned
        runs = tuple(runs_of(info.src_blocks[first:end_block], info.dst_blocks[first:end_block]))
        req.chunks.append(Chunk(step, chunk.token_offset, chunk.token_count, first, end_block, runs))
        req.next_token, req.blocks_assigned = end_token, end_block
        record = self._steps.get(step)
        assert record is not None, "a chunk is attached while its step is open"
        index = len(req.chunks) - 1
        record.members[key] = index
        return [(key, index, layer) for layer in sorted(record.ready)]

    def _admitted(self, req: Request, now: float) -> list[Effect]:
        """Every rank holds the same cache_info: post every layer that became ready meanwhile."""
        if req.admitted is not None or req.state not in (State.WAIT_SIGNAL, State.ACTIVE):
            return []  # a repeat, or the request is stopping: nothing to write
        req.admitted = now
        if req.state is State.WAIT_SIGNAL:
            return []
        self._arm(req, now)
        items = []
        for index, chunk in enumerate(req.chunks):
            record = self._steps.get(chunk.step)
            if record is not None:
                items += [(req.info.key, index, layer) for layer in sorted(record.ready - chunk.posted)]
        return self._post(items, now)

    def _post(self, items: list[tuple[Key, int, int]], now: float) -> list[Effect]:
        """Turn (request, chunk, layer) items into writes: one per (peer, transport, layer)."""
        s = self.s
        groups: dict[tuple[str, str, int], tuple[list[Run], list[Part]]] = {}
        finished: dict[Key, Request] = {}
        for key, index, layer in items:
            req = self._requests[key]
            chunk = req.chunks[index]
            if layer in chunk.posted or req.state is not State.ACTIVE or req.admitted is None:
                continue
            chunk.posted.add(layer)
            if len(chunk.posted) == s.num_layers:
                self._steps.leave(chunk.step, key)
            if not chunk.runs:  # a chunk that completed no block has nothing to send
                chunk.confirmed.add(layer)
                finished[key] = req
                continue
            nbytes = sum(r.length for r in chunk.runs) * s.block_bytes * s.planes
            runs, parts = groups.setdefault((req.info.peer, req.info.transport, layer), ([], []))
            runs.extend(chunk.runs)
            parts.append(Part(key, index, layer, nbytes))
            req.inflight += 1
        effects: list[Effect] = []
        for (peer, transport, layer), (runs, parts) in groups.items():
            write_id = next(self._write_ids)
            self._writes[write_id] = tuple(parts)
            keys = tuple(dict.fromkeys(p.key for p in parts))
            nbytes = sum(p.nbytes for p in parts)
            effects.append(PostWrite(write_id, peer, transport, layer, merge_runs(runs), keys, nbytes))
        for req in finished.values():
            effects += self._maybe_arrive(req, now)
        return effects

    def _maybe_arrive(self, req: Request, now: float) -> list[Effect]:
        info, s = req.info, self.s
        if req.state is not State.ACTIVE or req.admitted is None or req.inflight or req.next_token < info.num_tokens:
            return []
        if any(len(c.confirmed) < s.num_layers for c in req.chunks):
            return []
        req.state = next_state(req.state, Action.ARRIVE, self._who(req))
        req.sent = now
        self._arm(req, now)
        return [ToBarrier(self._arrival(req))]

    def _arrival(self, req: Request) -> Arrive:
        info, s = req.info, self.s
        chunks = [(c.step, c.token_offset, c.token_count) for c in req.chunks]
        fp = fingerprint(info.request_id, info.num_tokens, info.src_blocks, info.dst_blocks, chunks, s.num_layers)
        digest = Digest(s.num_layers, req.blocks_assigned, req.bytes_done, fp)
        return Arrive(s.group, info.request_id, info.instance, s.rank, digest)

    def _detach(self, req: Request) -> None:
        """Stop a job from taking new layers: leave the steps of its chunks."""
        for chunk in req.chunks:
            self._steps.leave(chunk.step, req.info.key)

    def _stop(self, req: Request, status: Status, reason: str, now: float) -> list[Effect]:
        """This rank will not finish the request: drain, then withdraw."""
        state = req.state
        if state is State.WAIT_SIGNAL:
            self._pending.drop_info(req.info.slot, req.info.step, req.info.key)
            return self._withdraw(req, status, reason, now)
        if state is State.ACTIVE:
            self._detach(req)
            if req.inflight:
                req.state = next_state(state, Action.DRAIN, self._who(req))
                req.stop = (status, reason)
                self._arm(req, now)
                return []
            return self._withdraw(req, status, reason, now)
        return []  # already stopping, or arrived: the verdict decides

    def _withdraw(self, req: Request, status: Status, reason: str, now: float) -> list[Effect]:
        req.state = next_state(req.state, Action.WITHDRAW, self._who(req))
        req.stop = (status, reason)
        self._arm(req, now)
        s, info = self.s, req.info
        admitted = req.admitted is not None
        return [ToBarrier(Withdraw(s.group, info.request_id, info.instance, s.rank, status, clip(reason), admitted))]

    def _drained(self, req: Request, now: float) -> list[Effect]:
        if req.outcome is not None:
            return self._end(req, *req.outcome, now)
        assert req.stop is not None
        return self._withdraw(req, *req.stop, now)

    def _outcome(self, req: Request, verdict: Release | Diverged | Expired) -> tuple[Status, str]:
        """Every rank reports the status and reason the verdict carries."""
        if isinstance(verdict, Release) and req.state is not State.ARRIVED:
            return Status.FAILED, f"released by the barrier while this rank was {req.state.value} (barrier bug?)"
        return verdict.status, verdict.reason

    def _end(
        self, req: Request, status: Status, reason: str, now: float, *, word: Withdraw | None = None
    ) -> list[Effect]:
        """End ``req`` here; ``word``: the withdrawal it ends on, when no verdict came (see Ending)."""
        info, s = req.info, self.s
        key = info.key
        reason = clip(reason)
        req.state = next_state(req.state, Action.END, self._who(req))
        self._detach(req)
        del self._requests[key]
        if self._starts.get((info.slot, info.step)) == key:
            del self._starts[(info.slot, info.step)]
        self._pending.drop_info(info.slot, info.step, key)
        self._close_start(info, now)
        self._deadlines.cancel(key)
        self._ended.put(key, Ending(status, reason, True, True, word), now)
        recovered = req.recovered if req.recovered is not None else now
        sent = req.sent if req.sent is not None else now
        result = TransferResult(
            info.request_id,
            status,
            reason,
            s.rank,
            req.bytes_done,
            req.transport or info.transport,
            wait_ms=(recovered - req.created) * 1e3,
            send_ms=(sent - recovered) * 1e3,
            total_ms=(now - req.created) * 1e3,
            instance=info.instance,
            admit_ms=((req.admitted if req.admitted is not None else now) - req.created) * 1e3,
        )
        notice: KVReady | TransferResult = result
        if status is Status.OK:
            notice = KVReady(info.request_id, s.rank, req.bytes_done, info.instance)
        return [ToEngine(result, req.origin), ToPeer(info.peer, notice)]

    def _expire_signal(self, slot: int, step: int) -> list[Effect]:
        signal = self._pending.take_signal(slot, step)
        if signal is None:
            return []
        self._steps.unpark(step)
        detail = (
            f"layer-0 signal for slot {slot} of step {step} dropped: "
            f"no cache_info claimed it within {self.s.pending_timeout_s:g}s"
        )
        return [Problem(ErrorCode.STALE_SIGNAL, detail, reply=False)]

    def _overdue(self, req: Request, now: float) -> list[Effect]:
        s, state, info = self.s, req.state, req.info
        if state is State.WAIT_SIGNAL:
            reason = (
                f"no layer-0 signal for slot {info.slot} of step {info.step} "
                f"within {s.pending_timeout_s:g}s of its cache_info"
            )
            return self._stop(req, Status.FAILED, reason, now)
        if state is State.ACTIVE and req.admitted is None:
            # The barrier service never answered the admission: it is gone or cut off. Withdraw (so a
            # service that comes back fails the others too) and end here without waiting any longer.
            reason = f"no admission verdict from the barrier service within {s.verdict_timeout_s:g}s"
            withdraw = Withdraw(s.group, info.request_id, info.instance, s.rank, Status.FAILED, reason)
            self._detach(req)
            return [ToBarrier(withdraw), *self._end(req, Status.FAILED, reason, now, word=withdraw)]
        if state is State.ACTIVE:
            reason = f"no progress for {s.progress_timeout_s:g}s: waiting for {self._waiting_for(req)}"
            return self._stop(req, Status.FAILED, reason, now)
        if state is State.DRAINING:
            # The transport never reported: give its writes up so the request can end.
            self._writes = {
                wid: kept
                for wid, parts in self._writes.items()
                if (kept := tuple(p for p in parts if p.key != info.key))
            }
            detail = f"{req.inflight} writes of request {info.request_id} unconfirmed after {s.progress_timeout_s:g}s"
            req.inflight = 0
            return [Problem(ErrorCode.INTERNAL, detail, info.request_id, reply=False), *self._drained(req, now)]
        reason = f"no verdict from the barrier service within {s.verdict_timeout_s:g}s"
        return self._end(req, Status.FAILED, reason, now)

    def _waiting_for(self, req: Request) -> str:
        info = req.info
        if req.state is State.WAIT_SIGNAL:
            return f"layer-0 signal of step {info.step} for slot {info.slot}"
        if req.state in (State.ARRIVED, State.WITHDRAWN):
            return "the barrier verdict"
        if req.state is State.ACTIVE and req.admitted is None:
            return "admission by the barrier service (every rank's cache_info)"
        if req.state is State.ACTIVE and req.next_token < info.num_tokens:
            last = req.chunks[-1].step if req.chunks else info.step
            return f"the chunk at token {req.next_token} of {info.num_tokens} (slot {info.slot}, after step {last})"
        for chunk in req.chunks:
            if len(chunk.posted) < self.s.num_layers:
                missing = min(set(range(self.s.num_layers)) - chunk.posted)
                return f"layer {missing} of step {chunk.step}"
        return f"{req.inflight} writes to {info.peer} to complete"
