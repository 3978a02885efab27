"""The prefill rank's brain: from signals and cache_infos to writes, arrivals and results.

Theory of operation
-------------------
Inputs are protocol messages plus write completions, each with ``now``;
outputs are effects (:mod:`kvxferd.core.effects`). Nothing here reads a clock,
touches a socket or starts a thread.

1. A layer-0 signal names slots. A slot entry whose ``start_step`` is the
   signal's step is a request's first chunk: it pairs with a parked cache_info
   for ``(slot, step)`` or is parked itself; a cache_info pairs with a parked
   signal or is parked. Pairing recovers a single-request job
   (:mod:`kvxferd.core.pending`). Any other slot entry is a later chunk of the
   request that began at ``(slot, start_step)``: it joins that job, or is
   parked until the job is recovered.
2. A job's chunk sends the blocks it completed. When layer L of a step is
   ready, every job chunk of that step posts layer L at once: one write per
   (peer, transport, layer), runs merged across requests. Layers that became
   ready before recovery are posted at recovery.
3. When every layer of every chunk is confirmed written, the rank *arrives* at
   the barrier with the request id and a digest. It never waits there: the
   verdict comes back as a message. A rank that stops a request (abort,
   failure, timeout) first waits for its in-flight writes, then *withdraws*.
4. The verdict (release / diverged / expired) ends the request: one result to
   the engine, one notice to the decode peer, and no trace left in any table.
5. Every waiting request has a deadline; :meth:`RankCore.on_timer` settles the
   overdue ones. Tables are bounded; overflow is refused loudly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count
from typing import Any

from kvxferd.core.blocks import blocks_complete, blocks_needed, fingerprint, merge_runs, runs_of
from kvxferd.core.deadlines import Deadlines
from kvxferd.core.effects import Effect, PostWrite, Problem, Run, ToBarrier, ToEngine, ToPeer
from kvxferd.core.lifecycle import Action, State, next_state
from kvxferd.core.pending import PendingSignal, PendingTable
from kvxferd.core.progress import StepTable
from kvxferd.protocol import (
    Abort,
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


@dataclass(frozen=True, slots=True)
class RankSettings:
    """What the core needs to know about its rank; the runtime builds it from the config."""

    group: str
    rank: int
    world_size: int
    num_layers: int
    num_blocks: int  # blocks in this rank's (source) cache
    block_tokens: int  # tokens per block
    block_bytes: int  # bytes of one block of one of K or V, one layer, this rank
    max_requests: int = 4096
    max_pending_signals: int = 4096
    max_steps: int = 1024
    pending_timeout_s: float = 30.0  # a half job waiting for its other half
    progress_timeout_s: float = 30.0  # a job, or its drain, without progress
    verdict_timeout_s: float = 60.0  # an arrival or withdrawal without a verdict


@dataclass(slots=True)
class Chunk:
    step: int
    token_offset: int
    token_count: int
    first_block: int
    end_block: int
    runs: tuple[Run, ...]
    posted: set[int] = field(default_factory=set)
    confirmed: set[int] = field(default_factory=set)


@dataclass(slots=True)
class Request:
    info: CacheInfo
    state: State
    created: float
    recovered: float | None = None
    sent: float | None = None
    chunks: list[Chunk] = field(default_factory=list)
    next_token: int = 0  # where the next chunk must start
    blocks_assigned: int = 0
    inflight: int = 0  # write parts posted and not yet reported
    bytes_done: int = 0
    stop: tuple[Status, str] | None = None  # this rank's own decision to stop
    outcome: tuple[Status, str] | None = None  # the group's verdict, if it came while draining
    abort_reason: str | None = None


@dataclass(frozen=True, slots=True)
class _Part:
    request_id: str
    chunk: int
    layer: int
    nbytes: int


class RankCore:
    """Pure state of one prefill rank. See the module docstring."""

    def __init__(self, settings: RankSettings) -> None:
        self.s = settings
        self._requests: dict[str, Request] = {}
        self._starts: dict[tuple[int, int], str] = {}  # (slot, first step) -> live request id
        self._pending = PendingTable()
        self._steps = StepTable()
        self._writes: dict[int, tuple[_Part, ...]] = {}
        self._write_ids = count(1)
        # ("req", request id) or ("sig", slot, step)
        self._deadlines: Deadlines[tuple[str, str] | tuple[str, int, int]] = Deadlines()

    # ------------------------------------------------------------------ inputs

    def handle(self, msg: Message, now: float) -> list[Effect]:
        """Dispatch one inbound message."""
        if isinstance(msg, LayerSignal):
            return self.on_layer(msg, now)
        if isinstance(msg, CacheInfo):
            return self.on_cache_info(msg, now)
        if isinstance(msg, Abort):
            return self.on_abort(msg, now)
        if isinstance(msg, (Release, Diverged, Expired)):
            return self.on_verdict(msg, now)
        return [Problem(ErrorCode.WRONG_ROLE, f"a prefill rank does not accept {type(msg).__name__}")]

    def on_cache_info(self, info: CacheInfo, now: float) -> list[Effect]:
        s, rid = self.s, info.request_id
        if rid in self._requests:
            state = self._requests[rid].state.value
            return [Problem(ErrorCode.DUPLICATE_REQUEST, f"request {rid} is already in flight ({state})", rid)]
        need = blocks_needed(info.num_tokens, s.block_tokens)
        if len(info.src_blocks) != need:
            detail = (
                f"request {rid}: {info.num_tokens} tokens need {need} blocks of {s.block_tokens} tokens, "
                f"cache_info names {len(info.src_blocks)}"
            )
            return self.refuse(info, ErrorCode.BAD_LAYOUT, detail)
        top = max(info.src_blocks)
        if top >= s.num_blocks:
            detail = f"request {rid}: source block {top} is outside this rank's {s.num_blocks} blocks"
            return self.refuse(info, ErrorCode.OUT_OF_RANGE, detail)
        if len(self._requests) >= s.max_requests:
            detail = f"request {rid}: request table full ({s.max_requests} requests in flight)"
            return self.refuse(info, ErrorCode.TABLE_FULL, detail)
        holder = self._starts.get((info.slot, info.step))
        if holder is not None:
            detail = f"request {rid}: slot {info.slot} of step {info.step} already belongs to request {holder}"
            return self.refuse(info, ErrorCode.SLOT_BUSY, detail)

        req = Request(info=info, state=State.WAIT_SIGNAL, created=now)
        self._requests[rid] = req
        self._starts[(info.slot, info.step)] = rid
        signal = self._pending.take_signal(info.slot, info.step)
        if signal is None:
            self._pending.park_info(info.slot, info.step, rid)
            self._deadlines.set(("req", rid), now + s.pending_timeout_s)
            return []
        effects: list[Effect] = []
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
            return self._post([(rid, idx, sig.layer) for rid, idx in record.members.items()], now)

        if steps.highest is not None and sig.step <= steps.highest:
            detail = f"layer-0 signal of step {sig.step} after step {steps.highest}: step ids must increase"
            return [Problem(ErrorCode.STALE_SIGNAL, detail)]
        steps.highest = sig.step
        if not sig.slots:
            return []
        if len(steps) >= s.max_steps:
            detail = f"step {sig.step} dropped: step table full ({s.max_steps} steps in progress)"
            return [Problem(ErrorCode.TABLE_FULL, detail)]
        steps.open(sig.step)
        effects: list[Effect] = []
        items: list[tuple[str, int, int]] = []
        for chunk in sig.slots:
            signal = PendingSignal(sig.step, chunk, now)
            if chunk.start_step == sig.step:  # a first chunk: pairs with its cache_info
                rid = self._pending.take_info(chunk.slot, sig.step)
                if rid is not None:
                    items += self._recover(self._requests[rid], signal, False, effects, now)
                    continue
            else:  # a later chunk: joins its job once that job exists
                owner = self._starts.get((chunk.slot, chunk.start_step))
                req = self._requests[owner] if owner is not None else None
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
                self._deadlines.set(("sig", chunk.slot, sig.step), now + s.pending_timeout_s)
        steps.close_if_unused(sig.step)
        return effects + self._post(items, now)

    def on_abort(self, msg: Abort, now: float) -> list[Effect]:
        req = self._requests.get(msg.request_id)
        if req is None:
            detail = f"abort for request {msg.request_id}, which this rank does not hold (unknown or ended)"
            return [Problem(ErrorCode.UNKNOWN_REQUEST, detail, msg.request_id)]
        req.abort_reason = msg.reason or "aborted by the engine"
        return self._stop(req, Status.ABORTED, req.abort_reason, now)

    def write_done(self, write_id: int, now: float, error: str | None = None) -> list[Effect]:
        """The transport finished write ``write_id``; ``error`` says why it failed, if it did."""
        parts = self._writes.pop(write_id, None)
        if parts is None:
            return [Problem(ErrorCode.INTERNAL, f"completion for unknown write {write_id}", reply=False)]
        effects: list[Effect] = []
        touched: dict[str, Request] = {}
        for part in parts:
            req = self._requests.get(part.request_id)
            if req is None:
                continue
            req.inflight -= 1
            touched[part.request_id] = req
            if error is None:
                req.chunks[part.chunk].confirmed.add(part.layer)
                req.bytes_done += part.nbytes
            elif req.state is State.ACTIVE:
                reason = f"write of layer {part.layer} to {req.info.peer} failed: {error}"
                effects += self._stop(req, Status.FAILED, reason, now)
        for req in touched.values():
            if req.state is State.ACTIVE:
                self._deadlines.set(("req", req.info.request_id), now + self.s.progress_timeout_s)
                effects += self._maybe_arrive(req, now)
            elif req.state is State.DRAINING and req.inflight == 0:
                effects += self._drained(req, now)
        return effects

    def on_verdict(self, verdict: Release | Diverged | Expired, now: float) -> list[Effect]:
        if verdict.group != self.s.group:
            detail = f"verdict for group {verdict.group!r} reached group {self.s.group!r}"
            return [Problem(ErrorCode.BAD_MESSAGE, detail, verdict.key, reply=False)]
        req = self._requests.get(verdict.key)
        if req is None:
            return []  # the request already ended here (e.g. our own verdict deadline passed)
        outcome = self._outcome(req, verdict)
        if req.state is State.ACTIVE:
            self._detach(req)
        if req.inflight > 0:
            if req.state is State.ACTIVE:
                req.state = next_state(req.state, Action.DRAIN, self._who(req))
                self._deadlines.set(("req", req.info.request_id), now + self.s.progress_timeout_s)
            req.outcome = outcome
            return []
        return self._end(req, *outcome, now)

    def on_timer(self, now: float) -> list[Effect]:
        effects: list[Effect] = []
        for key in self._deadlines.pop_due(now):
            if len(key) == 3:
                effects += self._expire_signal(key[1], key[2])
            else:
                req = self._requests.get(key[1])
                if req is not None:
                    effects += self._overdue(req, now)
        return effects

    def next_deadline(self) -> float | None:
        return self._deadlines.earliest()

    def refuse(self, info: CacheInfo, code: ErrorCode, detail: str) -> list[Effect]:
        """Refuse a cache_info without keeping any state: error reply, failed result,
        and a withdrawal so ranks that did accept it get a verdict without waiting."""
        rid = info.request_id
        result = TransferResult(rid, Status.FAILED, detail, self.s.rank, transport=info.transport)
        withdraw = Withdraw(self.s.group, rid, self.s.rank, Status.FAILED, detail)
        return [Problem(code, detail, rid), ToEngine(result), ToBarrier(withdraw)]

    def close(self, reason: str, now: float) -> list[Effect]:
        """Forced shutdown: end every live request as failed with ``reason``, clear every table.

        Writes still in flight are forgotten; call this only once the transports are stopped.
        """
        effects: list[Effect] = []
        self._writes.clear()
        for req in list(self._requests.values()):
            req.inflight = 0
            effects += self._end(req, Status.FAILED, reason, now)
        return effects

    # ------------------------------------------------------------ introspection

    def sizes(self) -> dict[str, int]:
        """Entries in every table (all zero when idle and nothing is parked)."""
        return {
            "requests": len(self._requests),
            "starts": len(self._starts),
            "parked_infos": self._pending.info_count,
            "parked_signals": self._pending.signal_count,
            "steps": len(self._steps),
            "writes": len(self._writes),
            "deadlines": len(self._deadlines),
        }

    def holds(self, request_id: str) -> list[str]:
        """Names of the tables that still mention ``request_id``."""
        found = []
        if request_id in self._requests:
            found.append("requests")
        if request_id in self._starts.values():
            found.append("starts")
        if self._pending.holds(request_id):
            found.append("parked_infos")
        if self._steps.holds(request_id):
            found.append("steps")
        if any(p.request_id == request_id for parts in self._writes.values() for p in parts):
            found.append("writes")
        if ("req", request_id) in self._deadlines:
            found.append("deadlines")
        return found

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        """One line per live request, for operators: state, age, what it waits for."""
        return [
            {
                "request_id": rid,
                "state": req.state.value,
                "age_s": round(now - req.created, 3),
                "slot": req.info.slot,
                "step": req.info.step,
                "waiting_for": self._waiting_for(req),
                "inflight": req.inflight,
                "bytes": req.bytes_done,
            }
            for rid, req in self._requests.items()
        ]

    # ---------------------------------------------------------------- internals

    def _who(self, req: Request) -> str:
        return f"request {req.info.request_id} on {self.s.group} rank {self.s.rank}"

    def _forget_signal(self, signal: PendingSignal) -> None:
        """A parked signal was claimed by a job (attach it first: this may close its step)."""
        self._deadlines.cancel(("sig", signal.chunk.slot, signal.step))
        self._steps.unpark(signal.step)

    def _recover(
        self, req: Request, signal: PendingSignal, parked: bool, effects: list[Effect], now: float
    ) -> list[tuple[str, int, int]]:
        """Both halves are here: make the single-request job and attach every chunk we hold.

        ``parked`` says whether ``signal`` came out of the pending table (the
        cache_info came second) or straight off the wire (the signal came second).
        """
        req.state = next_state(req.state, Action.RECOVER, self._who(req))
        req.recovered = now
        info = req.info
        self._deadlines.set(("req", info.request_id), now + self.s.progress_timeout_s)
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
    ) -> list[tuple[str, int, int]]:
        """Add one chunk to a job; return the (request, chunk, layer) writes now possible."""
        info, s = req.info, self.s
        rid = info.request_id
        end_token = chunk.token_offset + chunk.token_count
        reason = None
        if end_token > info.num_tokens:
            reason = f"tokens {chunk.token_offset}..{end_token} are beyond the request's {info.num_tokens} tokens"
        elif req.chunks and chunk.token_offset != req.next_token:
            reason = f"the chunk starts at token {chunk.token_offset}, the previous one ended at {req.next_token}"
        if reason is not None:
            reason = f"step {step}, slot {chunk.slot}: {reason}"
            effects += [Problem(ErrorCode.BAD_LAYOUT, reason, rid)]
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
        record.members[rid] = index
        return [(rid, index, layer) for layer in sorted(record.ready)]

    def _post(self, items: list[tuple[str, int, int]], now: float) -> list[Effect]:
        """Turn (request, chunk, layer) items into writes: one per (peer, transport, layer)."""
        s = self.s
        groups: dict[tuple[str, str, int], tuple[list[Run], list[_Part]]] = {}
        finished: dict[str, Request] = {}
        for rid, index, layer in items:
            req = self._requests[rid]
            chunk = req.chunks[index]
            if layer in chunk.posted or req.state is not State.ACTIVE:
                continue
            chunk.posted.add(layer)
            if len(chunk.posted) == s.num_layers:
                self._steps.leave(chunk.step, rid)
            if not chunk.runs:  # a chunk that completed no block has nothing to send
                chunk.confirmed.add(layer)
                finished[rid] = req
                continue
            nbytes = sum(r.length for r in chunk.runs) * s.block_bytes * 2
            runs, parts = groups.setdefault((req.info.peer, req.info.transport, layer), ([], []))
            runs.extend(chunk.runs)
            parts.append(_Part(rid, index, layer, nbytes))
            req.inflight += 1
        effects: list[Effect] = []
        for (peer, transport, layer), (runs, parts) in groups.items():
            write_id = next(self._write_ids)
            self._writes[write_id] = tuple(parts)
            rids = tuple(dict.fromkeys(p.request_id for p in parts))
            nbytes = sum(p.nbytes for p in parts)
            effects.append(PostWrite(write_id, peer, transport, layer, merge_runs(runs), rids, nbytes))
        for req in finished.values():
            effects += self._maybe_arrive(req, now)
        return effects

    def _maybe_arrive(self, req: Request, now: float) -> list[Effect]:
        info, s = req.info, self.s
        if req.state is not State.ACTIVE or req.inflight or req.next_token < info.num_tokens:
            return []
        if any(len(c.confirmed) < s.num_layers for c in req.chunks):
            return []
        req.state = next_state(req.state, Action.ARRIVE, self._who(req))
        req.sent = now
        self._deadlines.set(("req", info.request_id), now + s.verdict_timeout_s)
        chunks = [(c.step, c.token_offset, c.token_count) for c in req.chunks]
        fp = fingerprint(info.request_id, info.num_tokens, info.src_blocks, info.dst_blocks, chunks, s.num_layers)
        digest = Digest(s.num_layers, req.blocks_assigned, req.bytes_done, fp)
        return [ToBarrier(Arrive(s.group, info.request_id, s.rank, digest))]

    def _detach(self, req: Request) -> None:
        """Stop a job from taking new layers: leave the steps of its chunks."""
        for chunk in req.chunks:
            self._steps.leave(chunk.step, req.info.request_id)

    def _stop(self, req: Request, status: Status, reason: str, now: float) -> list[Effect]:
        """This rank will not finish the request: drain, then withdraw."""
        state = req.state
        if state is State.WAIT_SIGNAL:
            self._pending.drop_info(req.info.slot, req.info.step, req.info.request_id)
            return self._withdraw(req, status, reason, now)
        if state is State.ACTIVE:
            self._detach(req)
            if req.inflight:
                req.state = next_state(state, Action.DRAIN, self._who(req))
                req.stop = (status, reason)
                self._deadlines.set(("req", req.info.request_id), now + self.s.progress_timeout_s)
                return []
            return self._withdraw(req, status, reason, now)
        return []  # already stopping, or arrived: the verdict decides (an abort is remembered)

    def _withdraw(self, req: Request, status: Status, reason: str, now: float) -> list[Effect]:
        req.state = next_state(req.state, Action.WITHDRAW, self._who(req))
        req.stop = (status, reason)
        s = self.s
        self._deadlines.set(("req", req.info.request_id), now + s.verdict_timeout_s)
        return [ToBarrier(Withdraw(s.group, req.info.request_id, s.rank, status, reason))]

    def _drained(self, req: Request, now: float) -> list[Effect]:
        if req.outcome is not None:
            return self._end(req, *req.outcome, now)
        assert req.stop is not None
        return self._withdraw(req, *req.stop, now)

    def _outcome(self, req: Request, verdict: Release | Diverged | Expired) -> tuple[Status, str]:
        """Every rank derives the same status from the same verdict."""
        if isinstance(verdict, Release):
            if req.state is State.ARRIVED:
                return Status.OK, ""
            return Status.FAILED, f"released by the barrier while this rank was {req.state.value} (barrier bug?)"
        if isinstance(verdict, Diverged):
            status = verdict.status
            if status is Status.ABORTED:
                why = next(v for v in verdict.views if v.status is Status.ABORTED)
                return status, f"aborted: {why.reason}"
            return status, f"ranks did not agree: {verdict.describe()}"
        missing = ", ".join(map(str, verdict.missing))
        reason = f"ranks [{missing}] of group {verdict.group} did not report within {verdict.waited_s:.3g}s"
        if req.abort_reason is not None:
            return Status.ABORTED, f"aborted: {req.abort_reason} ({reason})"
        return Status.FAILED, reason

    def _end(self, req: Request, status: Status, reason: str, now: float) -> list[Effect]:
        info, s = req.info, self.s
        rid = info.request_id
        req.state = next_state(req.state, Action.END, self._who(req))
        self._detach(req)
        del self._requests[rid]
        if self._starts.get((info.slot, info.step)) == rid:
            del self._starts[(info.slot, info.step)]
        self._pending.drop_info(info.slot, info.step, rid)
        self._deadlines.cancel(("req", rid))
        recovered = req.recovered if req.recovered is not None else now
        sent = req.sent if req.sent is not None else now
        result = TransferResult(
            rid,
            status,
            reason,
            s.rank,
            req.bytes_done,
            info.transport,
            wait_ms=(recovered - req.created) * 1e3,
            send_ms=(sent - recovered) * 1e3,
            total_ms=(now - req.created) * 1e3,
        )
        notice: KVReady | TransferResult = KVReady(rid, s.rank, req.bytes_done) if status is Status.OK else result
        return [ToEngine(result), ToPeer(info.peer, notice)]

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
        s, state = self.s, req.state
        if state is State.WAIT_SIGNAL:
            reason = (
                f"no layer-0 signal for slot {req.info.slot} of step {req.info.step} "
                f"within {s.pending_timeout_s:g}s of its cache_info"
            )
            return self._stop(req, Status.FAILED, reason, now)
        if state is State.ACTIVE:
            reason = f"no progress for {s.progress_timeout_s:g}s: waiting for {self._waiting_for(req)}"
            return self._stop(req, Status.FAILED, reason, now)
        if state is State.DRAINING:
            # The transport never reported: give its writes up so the request can end.
            self._writes = {
                wid: kept
                for wid, parts in self._writes.items()
                if (kept := tuple(p for p in parts if p.request_id != req.info.request_id))
            }
            detail = (
                f"{req.inflight} writes of request {req.info.request_id} unconfirmed after {s.progress_timeout_s:g}s"
            )
            req.inflight = 0
            return [Problem(ErrorCode.INTERNAL, detail, req.info.request_id, reply=False), *self._drained(req, now)]
        status = Status.ABORTED if req.abort_reason is not None else Status.FAILED
        reason = f"no verdict from the barrier service within {s.verdict_timeout_s:g}s"
        return self._end(req, status, reason, now)

    def _waiting_for(self, req: Request) -> str:
        info = req.info
        if req.state is State.WAIT_SIGNAL:
            return f"layer-0 signal of step {info.step} for slot {info.slot}"
        if req.state in (State.ARRIVED, State.WITHDRAWN):
            return "the barrier verdict"
        if req.state is State.ACTIVE and req.next_token < info.num_tokens:
            last = req.chunks[-1].step if req.chunks else info.step
            return f"the chunk at token {req.next_token} of {info.num_tokens} (slot {info.slot}, after step {last})"
        for chunk in req.chunks:
            if len(chunk.posted) < self.s.num_layers:
                missing = min(set(range(self.s.num_layers)) - chunk.posted)
                return f"layer {missing} of step {chunk.step}"
        return f"{req.inflight} writes to {info.peer} to complete"
