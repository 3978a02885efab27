"""Intake: pairing layer signals with cache_infos into single-request jobs.

Theory of operation
-------------------
A layer-0 signal names *slots*; a cache_info names a *request*. Each rank gets
both streams in the same order but at its own pace, so either may come first.

* A cache_info the rank accepts (:meth:`Intake.check` found nothing wrong)
  claims its first chunk's parked signal, or parks itself
  (:mod:`kvxferd.core.pending`), keyed by ``(slot, step)``.
* A layer-0 signal's slot entry whose ``start_step`` is the signal's step is a
  request's first chunk: it pairs with the parked cache_info of ``(slot,
  step)`` or is parked. Any other entry is a later chunk of the request that
  began at ``(slot, start_step)``: it joins that job if the job exists, or is
  parked until it does. What pairs is returned as a :class:`Match`; the caller
  recovers the job (and moves its state), then calls :meth:`Intake.recover`.
* Later-layer signals mark a layer of a step ready (:mod:`kvxferd.core.progress`);
  every chunk of that step that is a member of the step's record can write it.

Step ids must increase (a far-ahead one is refused, not adopted); signals of a
request that ended or was refused here (its ``(slot, first step)`` is
*closed*) are dropped; parked signals expire after ``pending_s``. Every table
is bounded and overflow is refused loudly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvxferd.core.blocks import blocks_complete, blocks_needed, merge_runs, runs_of
from kvxferd.core.deadlines import Deadlines
from kvxferd.core.effects import Problem
from kvxferd.core.memory import Memory
from kvxferd.core.pending import PendingSignal, PendingTable
from kvxferd.core.progress import StepTable
from kvxferd.core.request import Chunk, Request
from kvxferd.core.settings import RankSettings
from kvxferd.core.states import Data
from kvxferd.protocol import CacheInfo, ErrorCode, Key, LayerSignal, SlotChunk

#: (request, chunk index, layer): one layer of one chunk that can be written
Item = tuple[Key, int, int]


@dataclass(frozen=True, slots=True)
class Match:
    """A signal's slot entry that belongs to a live request: its first chunk (``first``: the job
    is recovered now) or a later chunk of an active job."""

    key: Key
    step: int
    chunk: SlotChunk
    first: bool


class Intake:
    def __init__(self, settings: RankSettings) -> None:
        self.s = settings
        self.pending = PendingTable()
        self.steps = StepTable()
        self.starts: dict[tuple[int, int], Key] = {}  # (slot, first step) -> live request instance
        self._deadlines: Deadlines[tuple[int, int]] = Deadlines()  # one per parked (slot, step)
        # (slot, first step) of requests that ended or were refused here: their late signals are dropped
        self.closed: Memory[tuple[int, int], bool] = Memory(
            limit=settings.max_pending_signals, ttl_s=settings.pending_timeout_s
        )

    # -- cache_infos --------------------------------------------------------------------

    def check(self, info: CacheInfo, live: int) -> tuple[ErrorCode, str] | None:
        """Why this rank must refuse ``info`` (``live`` requests are in flight), if it must."""
        s, rid = self.s, info.request_id
        need = blocks_needed(info.num_tokens, s.block_tokens)
        if len(info.src_blocks) != need:
            return ErrorCode.BAD_LAYOUT, (
                f"request {rid}: {info.num_tokens} tokens need {need} blocks of {s.block_tokens} tokens, "
                f"cache_info names {len(info.src_blocks)}"
            )
        top = max(info.src_blocks)
        if top >= s.num_blocks:
            return (
                ErrorCode.OUT_OF_RANGE,
                f"request {rid}: source block {top} is outside this rank's {s.num_blocks} blocks",
            )
        if live >= s.max_requests:
            return ErrorCode.TABLE_FULL, f"request {rid}: request table full ({s.max_requests} requests in flight)"
        holder = self.starts.get((info.slot, info.step))
        if holder is not None:
            return ErrorCode.SLOT_BUSY, (
                f"request {rid}: slot {info.slot} of step {info.step} already belongs to request {holder[0]}"
            )
        return None

    def enter(self, info: CacheInfo) -> None:
        """A request instance is live here from now on."""
        self.starts.setdefault((info.slot, info.step), info.key)

    def claim(self, info: CacheInfo) -> PendingSignal | None:
        """The parked layer-0 signal of ``info``'s first chunk, or None (``info`` is parked)."""
        signal = self.pending.take_signal(info.slot, info.step)
        if signal is None:
            self.pending.park_info(info.slot, info.step, info.key)
        return signal

    # -- layer signals ------------------------------------------------------------------

    def later(self, step: int, layers: Sequence[int]) -> tuple[list[Problem], list[Item]]:
        """Take the signals of ``layers`` (each above 0: no slot table) of step ``step``, in that
        order: as many :meth:`layer` calls would, the step looked up once."""
        problems: list[Problem] = []
        items: list[Item] = []
        record, n = self.steps.get(step), self.s.num_layers
        for layer in layers:
            if layer >= n:
                detail = f"layer {layer} of step {step}: the model has {n} layers"
                problems.append(Problem(ErrorCode.OUT_OF_RANGE, detail))
            elif record is not None:
                record.ready.add(layer)
                items += [(key, idx, layer) for key, idx in record.members.items()]
            elif self.steps.highest is None or step > self.steps.highest:
                detail = f"layer {layer} of step {step} arrived before that step's layer-0 signal"
                problems.append(Problem(ErrorCode.STALE_SIGNAL, detail))
            # (else a step nothing waits on any more)
        return problems, items

    def layer(
        self, sig: LayerSignal, now: float, requests: Mapping[Key, Request]
    ) -> tuple[list[Problem], list[Match], list[Item]]:
        """Take one layer signal: problems, the slot entries that belong to live requests, and
        the (request, chunk, layer) writes a later layer makes possible."""
        s, steps = self.s, self.steps
        if sig.layer > 0:
            problems, items = self.later(sig.step, (sig.layer,))
            return problems, [], items
        if sig.layer >= s.num_layers:
            detail = f"layer {sig.layer} of step {sig.step}: the model has {s.num_layers} layers"
            return [Problem(ErrorCode.OUT_OF_RANGE, detail)], [], []
        if steps.highest is not None and sig.step <= steps.highest:
            detail = f"layer-0 signal of step {sig.step} after step {steps.highest}: step ids must increase"
            return [Problem(ErrorCode.STALE_SIGNAL, detail)], [], []
        if steps.highest is not None and sig.step - steps.highest > s.max_step_gap:
            detail = (
                f"layer-0 signal of step {sig.step} refused: {sig.step - steps.highest} steps past step "
                f"{steps.highest}, at most {s.max_step_gap} allowed"
            )
            return [Problem(ErrorCode.OUT_OF_RANGE, detail)], [], []
        steps.highest = sig.step
        if not sig.slots:
            return [], [], []
        if len(steps) >= s.max_steps:
            detail = f"step {sig.step} dropped: step table full ({s.max_steps} steps in progress)"
            return [Problem(ErrorCode.TABLE_FULL, detail)], [], []
        steps.open(sig.step)
        dropped: list[int] = []
        matches: list[Match] = []
        for chunk in sig.slots:
            owner = self.starts.get((chunk.slot, chunk.start_step))
            req = requests[owner] if owner is not None else None
            if req is None and (chunk.slot, chunk.start_step) in self.closed:
                continue  # a signal of a request that ended or was refused here: nothing to send
            if chunk.start_step == sig.step:  # a first chunk: pairs with its cache_info
                key = self.pending.take_info(chunk.slot, sig.step)
                if key is not None:
                    matches.append(Match(key, sig.step, chunk, True))
                    continue
                if req is not None:
                    continue  # its request already stopped (aborted before its signal): nothing to send
            elif req is not None and req.data is Data.ACTIVE:  # a later chunk of a job
                matches.append(Match(req.key, sig.step, chunk, False))
                continue
            elif req is not None and req.data is not Data.WAIT_SIGNAL:
                continue  # the request is stopping or done: nothing more to send for it
            if self.pending.signal_count >= s.max_pending_signals:
                dropped.append(chunk.slot)
            else:
                self.pending.park_signal(PendingSignal(sig.step, chunk, now))
                steps.get(sig.step).parked += 1  # type: ignore[union-attr]
                self._deadlines.set((chunk.slot, sig.step), now + s.pending_timeout_s)
        return self._dropped(sig.step, dropped), matches, []

    def _dropped(self, step: int, slots: list[int]) -> list[Problem]:
        """One problem for every slot of one signal the pending table could not take: a frame is
        answered once, however many slots it names."""
        if not slots:
            return []
        full = f"{self.s.max_pending_signals} signals already wait"
        if len(slots) == 1:
            return [Problem(ErrorCode.TABLE_FULL, f"slot {slots[0]} of step {step} dropped: {full}")]
        named = ", ".join(map(str, slots[:8])) + (", ..." if len(slots) > 8 else "")
        return [Problem(ErrorCode.TABLE_FULL, f"{len(slots)} slots of step {step} dropped (slots {named}): {full}")]

    def done_with_step(self, step: int) -> None:
        """The caller handled a layer-0 signal's matches: close its step if nothing uses it."""
        self.steps.close_if_unused(step)

    # -- jobs ---------------------------------------------------------------------------

    def recover(self, req: Request, signal: PendingSignal, parked: bool) -> tuple[str | None, list[Item]]:
        """The job was recovered from ``signal`` (``parked``: it came out of the pending table):
        attach its first chunk and every later one that waits. Returns why a chunk is bad (the
        request must stop), and the writes now possible."""
        reason, items = self.attach(req, signal.step, signal.chunk)
        if parked:
            self.forget_signal(signal)
        info = req.info
        while reason is None and req.next_token < info.num_tokens:
            later = self.pending.take_later_chunk(info.slot, info.step)
            if later is None:
                break
            reason, more = self.attach(req, later.step, later.chunk)
            self.forget_signal(later)
            items += more
        return reason, items

    def attach(self, req: Request, step: int, chunk: SlotChunk) -> tuple[str | None, list[Item]]:
        """Add one chunk to a job: why it does not fit (None if it does), and the writes it allows."""
        info, s = req.info, self.s
        end_token = chunk.token_offset + chunk.token_count
        reason = None
        if end_token > info.num_tokens:
            reason = f"tokens {chunk.token_offset}..{end_token} are beyond the request's {info.num_tokens} tokens"
        elif req.chunks and chunk.token_offset != req.next_token:
            reason = f"the chunk starts at token {chunk.token_offset}, the previous one ended at {req.next_token}"
        elif not req.chunks and chunk.token_offset != 0:
            reason = f"the first chunk starts at token {chunk.token_offset}, not 0"
        if reason is not None:
            return f"step {step}, slot {chunk.slot}: {reason}", []
        end_block = blocks_complete(end_token, info.num_tokens, s.block_tokens)
        first = req.blocks_assigned
        # merged once here (sorted, joined), so a write of this chunk alone uses them as they are
        runs = merge_runs(runs_of(info.src_blocks[first:end_block], info.dst_blocks[first:end_block]))
        req.chunks.append(Chunk(step, chunk.token_offset, chunk.token_count, first, end_block, runs, end_block - first))
        req.next_token, req.blocks_assigned = end_token, end_block
        record = self.steps.get(step)
        assert record is not None, "a chunk is attached while its step is open"
        index = len(req.chunks) - 1
        record.members[req.key] = index
        return None, [(req.key, index, layer) for layer in sorted(record.ready)]

    def ready(self, req: Request) -> list[Item]:
        """Every layer of the job's chunks that is ready and not yet posted."""
        items = []
        for index, chunk in enumerate(req.chunks):
            record = self.steps.get(chunk.step)
            if record is not None:
                items += [(req.key, index, layer) for layer in sorted(record.ready - chunk.posted)]
        return items

    def detach(self, req: Request) -> None:
        """Stop a job from taking new layers: leave the steps of its chunks."""
        for chunk in req.chunks:
            self.steps.leave(chunk.step, req.key)

    def release(self, req: Request, now: float) -> None:
        """The request ended here: leave its steps, free its slot, drop its parked cache_info and
        its signals."""
        self.detach(req)
        info, key = req.info, req.key
        if self.starts.get((info.slot, info.step)) == key:
            del self.starts[(info.slot, info.step)]
        self.pending.drop_info(info.slot, info.step, key)
        self.close_start(info, now)

    def close_start(self, info: CacheInfo, now: float) -> None:
        """The request that began at ``(slot, step)`` sends nothing more from this rank: drop the
        signals of it that wait, and those that come later."""
        if (info.slot, info.step) in self.starts:
            return  # another live request holds the slot: its signals are its own
        self.closed.put((info.slot, info.step), True, now)
        self.discard_parked(info)

    def discard_parked(self, info: CacheInfo) -> None:
        """Claim and drop every parked signal of a request that will send nothing."""
        signal = self.pending.take_signal(info.slot, info.step)
        if signal is not None:
            self.forget_signal(signal)
        while (later := self.pending.take_later_chunk(info.slot, info.step)) is not None:
            self.forget_signal(later)

    def forget_signal(self, signal: PendingSignal) -> None:
        """A parked signal was claimed (attach it first: this may close its step)."""
        self._deadlines.cancel((signal.chunk.slot, signal.step))
        self.steps.unpark(signal.step)

    # -- time -----------------------------------------------------------------------------

    def on_timer(self, now: float) -> list[Problem]:
        self.closed.expire(now)
        problems = []
        for slot, step in self._deadlines.pop_due(now):
            signal = self.pending.take_signal(slot, step)
            if signal is None:
                continue
            self.steps.unpark(step)
            detail = (
                f"layer-0 signal for slot {slot} of step {step} dropped: "
                f"no cache_info claimed it within {self.s.pending_timeout_s:g}s"
            )
            problems.append(Problem(ErrorCode.STALE_SIGNAL, detail, reply=False))
        return problems

    def next_deadline(self) -> float | None:
        times = [t for t in (self._deadlines.earliest(), self.closed.next_deadline()) if t is not None]
        return min(times, default=None)

    def new_worker(self) -> int:
        """A model worker (re)registered (the shell ended every request first): its step ids start
        a new sequence, and what the connection before it signalled goes, open steps and parked
        signals alike; returns how many parked signals went."""
        assert not any(r.members for r in self.steps.records()), "no job outlives its worker"
        dropped = self.pending.clear_signals()
        for signal in dropped:
            self._deadlines.cancel((signal.chunk.slot, signal.step))
        self.steps.clear()
        return len(dropped)

    def sizes(self) -> dict[str, int]:
        return {
            "starts": len(self.starts),
            "parked_infos": self.pending.info_count,
            "parked_signals": self.pending.signal_count,
            "steps": len(self.steps),
            "signal_deadlines": len(self._deadlines),
            "closed_slots": len(self.closed),
        }

    def holds(self, key: Key) -> list[str]:
        found = []
        if key in self.starts.values():
            found.append("starts")
        if self.pending.holds(key):
            found.append("parked_infos")
        if self.steps.holds(key):
            found.append("steps")
        return found
