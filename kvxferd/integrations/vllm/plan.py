"""What kvxferd's vLLM connector decides, kept apart from vLLM, sockets and clocks.

Theory of operation. A prompt moves from a prefill vLLM instance to a decode
one under a *transfer id* (``xfer``) that the proxy puts in both requests'
``kv_transfer_params``; vLLM's own request ids differ between the instances.

Prefill (:class:`PrefillPlan`, on the prefill instance's scheduler side):

- each step's scheduled chunks become a kvxferd step: the step gets the next
  step id, each transferring request keeps one *slot* from its first chunk
  until kvxferd decided its transfer, and its chunks are told to the worker,
  who signals them layer by layer (:class:`StepPlan`);
- when vLLM finishes the prompt, its source blocks are known; the decode
  ranks' :class:`~kvxferd.protocol.BlockOffer` bring the destination blocks,
  before or after. Once both are in, the CacheInfo goes out (:class:`Submit`)
  and vLLM keeps the source blocks until kvxferd decided (``take_freed``);
- every other ending is told to both sides: a prompt that ended otherwise,
  an offer that never came within ``offer_s`` or that does not fit, a slot
  that could not be had. The decode side hears :class:`Decline` (its blocks
  are free at once), kvxferd an :class:`SendAbort` for what it was signalled;
- a submitted prompt kvxferd has not decided within ``decide_s`` (by then
  every live rank ended it by its own deadlines: its results were lost, or its
  daemons are gone unseen) is aborted at kvxferd and its blocks are freed.

Decode (:class:`Receiver`, on each decode worker): the transfers it offered
blocks for, ended by kvxferd's notice, by a decline, or by its own deadline
(``wait_s``), whichever comes first; an ending is reported to vLLM once.

Time is an argument (``now``); nothing here blocks.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from kvxferd.core.memory import Memory
from kvxferd.protocol import BlockOffer, CacheInfo, SlotChunk

#: Transfers remembered as ended, so a late offer for one is declined (oldest forgotten first).
MAX_ENDED = 65536
#: Offers kept for transfers whose prompt this instance has not seen yet.
MAX_EARLY_OFFERS = 65536


def serving_problem(
    group: str, world_size: int, *, tensor_parallel: int, pipeline_parallel: int, kv_cache_groups: int
) -> str | None:
    """Why the connector cannot serve a vLLM instance of this shape for kvxferd group ``group``
    of ``world_size`` ranks, if it cannot: refused at start-up, naming the setting, never found
    later as wrong bytes. Each vLLM TP rank registers its cache with the kvxferd rank of its TP
    rank, so the two sizes must be equal; layers are numbered within one pipeline stage and one
    KV-cache group only."""
    if pipeline_parallel != 1:
        return (
            f"pipeline_parallel_size {pipeline_parallel}: the kvxferd connector serves one pipeline stage "
            "(its layer numbers are the stage's own); run with pipeline_parallel_size 1"
        )
    if kv_cache_groups != 1:
        return (
            f"{kv_cache_groups} KV-cache groups (sliding-window or hybrid attention layers): the kvxferd "
            "connector moves one group's blocks only"
        )
    if tensor_parallel != world_size:
        return (
            f"tensor_parallel_size {tensor_parallel} != world_size {world_size} of kvxferd group {group!r}: "
            "each vLLM TP rank registers with the kvxferd rank of the same number"
        )
    return None


@dataclass(frozen=True)
class StepPlan:
    """One kvxferd step: the worker signals every layer of ``step``; layer 0 carries ``chunks``."""

    step: int
    chunks: tuple[SlotChunk, ...]


@dataclass(frozen=True)
class Submit:
    """Send ``info`` to every prefill rank."""

    info: CacheInfo


@dataclass(frozen=True)
class SendAbort:
    """Abort an instance kvxferd was signalled for (its CacheInfo never goes, or is void)."""

    xfer: str
    instance: int
    reason: str


@dataclass(frozen=True)
class Decline:
    """Tell the decode ranks that offered blocks for ``xfer`` that nothing will be written."""

    xfer: str
    ranks: tuple[int, ...]
    reason: str


PlanEffect = Submit | SendAbort | Decline


@dataclass
class _Prompt:
    req_id: str
    xfer: str
    prompt_len: int
    instance: int = 0
    slot: int | None = None
    start_step: int = 0
    done_tokens: int = 0  # prompt tokens signalled so far, in order
    signalled: bool = False  # the current instance has chunks at kvxferd
    broken: str = ""  # why this prompt cannot be sent, once known
    src: tuple[int, ...] | None = None  # set when vLLM finished the prompt
    deadline: float | None = None  # while waiting for offers, then for kvxferd's decision
    submitted: bool = False


class PrefillPlan:
    """The prefill scheduler's side of every transfer (see the module's doc)."""

    def __init__(
        self,
        *,
        block_tokens: int,
        decode_group: str,
        decode_world: int,
        max_slots: int,
        offer_s: float,
        transport: str = "auto",
        decide_s: float = math.inf,
    ) -> None:
        self.block_tokens = block_tokens
        self.decode_group = decode_group
        self.decode_world = decode_world
        self.offer_s = offer_s
        self.decide_s = decide_s
        self.transport = transport
        self._prompts: dict[str, _Prompt] = {}  # by vLLM request id
        self._by_xfer: dict[str, str] = {}  # xfer -> vLLM request id
        self._offers: dict[str, dict[int, BlockOffer]] = {}
        #: offers with no prompt yet, by xfer: forgotten (and declined) after offer_s
        self._early: Memory[str, float] = Memory(limit=MAX_EARLY_OFFERS, ttl_s=offer_s, granularity_s=0.01)
        self._ended: Memory[str, str] = Memory(limit=MAX_ENDED)  # xfer -> why, for late offers
        self._sent: dict[tuple[str, int], str] = {}  # (xfer, instance) submitted -> vLLM request id
        self._slots = list(range(max_slots))
        self._step = 0
        self._freed: list[str] = []

    # -- vLLM's events --------------------------------------------------------------------

    def add(self, req_id: str, xfer: str, prompt_len: int) -> None:
        """A new request whose prompt goes to decode under ``xfer``."""
        if xfer in self._by_xfer or xfer in self._ended:
            # one transfer id, one prompt: a second one would take the first one's offers
            self._prompts[req_id] = _Prompt(req_id, xfer, prompt_len, broken=f"transfer id {xfer!r} is in use")
            return
        self._prompts[req_id] = _Prompt(req_id, xfer, prompt_len)
        self._by_xfer[xfer] = req_id
        self._early.pop(xfer)  # its offers wait for the prompt now, under the prompt's deadline

    def step(self, scheduled: Iterable[tuple[str, int, int]]) -> StepPlan | None:
        """This step's chunks of transferring prompts, from ``(req_id, computed, scheduled)``."""
        chunks: list[SlotChunk] = []
        step = self._step + 1
        for req_id, computed, count in scheduled:
            p = self._prompts.get(req_id)
            if p is None or p.broken or p.src is not None or computed >= p.prompt_len:
                continue
            count = min(count, p.prompt_len - computed)
            if computed != p.done_tokens:
                p.broken = f"its prompt was computed out of order (tokens from {computed}, {p.done_tokens} done)"
                continue
            if p.slot is None:
                if not self._slots:
                    p.broken = "no kvxferd slot was free"
                    continue
                p.slot = heapq.heappop(self._slots)
            if computed == 0:
                p.start_step = step
            chunks.append(SlotChunk(p.slot, computed, count, p.start_step))
            p.done_tokens = computed + count
            p.signalled = True
        if not chunks:
            return None
        self._step = step
        return StepPlan(step, tuple(chunks))

    def preempted(self, req_id: str) -> list[PlanEffect]:
        """vLLM preempted the prompt: its blocks are gone; the next chunks start a new instance."""
        p = self._prompts.get(req_id)
        if p is None or p.src is not None:
            return []
        effects: list[PlanEffect] = []
        if p.signalled:
            effects.append(SendAbort(p.xfer, p.instance, "vLLM preempted the prompt; it is computed again"))
        p.instance += 1
        p.done_tokens = 0
        p.signalled = False
        return effects

    def finished(self, req_id: str, ok: bool, block_ids: list[int], now: float) -> tuple[bool, list[PlanEffect]]:
        """vLLM finished the request (``ok``: its prompt ran to the end). Returns whether vLLM
        must keep its blocks until :meth:`take_freed` names it, and what to send."""
        p = self._prompts.get(req_id)
        if p is None:
            return False, []
        need = math.ceil(p.prompt_len / self.block_tokens)
        why = p.broken
        if not why and not ok:
            why = "the prompt ended before it was computed (aborted or failed in vLLM)"
        if not why and (p.done_tokens < p.prompt_len or len(block_ids) < need):
            why = f"the prompt ended with {p.done_tokens} of {p.prompt_len} tokens computed"
        if why:
            return False, self._end(p, why)
        p.src = tuple(block_ids[:need])
        p.deadline = now + self.offer_s
        return True, self._try_submit(p, now)

    def offer(self, offer: BlockOffer, now: float) -> list[PlanEffect]:
        """A decode rank's blocks for ``offer.request_id``."""
        xfer = offer.request_id
        if offer.group != self.decode_group or offer.rank >= self.decode_world:
            return [
                Decline(
                    xfer,
                    (offer.rank,),
                    f"this prefill instance writes to {self.decode_group!r} "
                    f"ranks 0..{self.decode_world - 1}, not {offer.group!r} rank {offer.rank}",
                )
            ]
        why = self._ended.get(xfer)
        if why is not None:
            return [Decline(xfer, (offer.rank,), why)]
        offers = self._offers.setdefault(xfer, {})
        if offer.rank in offers:
            return []  # the same rank again: the first offer stands
        offers[offer.rank] = offer
        req_id = self._by_xfer.get(xfer)
        if req_id is None:
            if xfer in self._early:
                return []
            pushed = self._early.put(xfer, now, now)
            if pushed is None:
                return []
            return self._decline_offers(pushed[0], "too many offers wait for prompts this instance has not seen")
        return self._try_submit(self._prompts[req_id], now)

    def decided(self, xfer: str, instance: int) -> None:
        """kvxferd decided a submitted instance: vLLM may free its source blocks."""
        req_id = self._sent.pop((xfer, instance), None)
        if req_id is None:
            return
        p = self._prompts.pop(req_id)
        self._by_xfer.pop(xfer, None)
        self._offers.pop(xfer, None)
        self._release(p)
        self._freed.append(req_id)

    def tick(self, now: float) -> list[PlanEffect]:
        """End what waited for offers past ``offer_s``, and what kvxferd did not decide in ``decide_s``."""
        effects: list[PlanEffect] = []
        for p in list(self._prompts.values()):
            if p.deadline is None or now < p.deadline:
                continue
            if p.submitted:
                why = f"kvxferd did not decide the transfer within {self.decide_s:g}s of its cache_info"
                self._sent.pop((p.xfer, p.instance), None)
                effects.append(SendAbort(p.xfer, p.instance, why))
                self._prompts.pop(p.req_id, None)
                self._by_xfer.pop(p.xfer, None)
                self._offers.pop(p.xfer, None)
                self._ended.put(p.xfer, why)
                self._release(p)
            else:
                effects += self._end(p, f"no decode offer for every rank came within {self.offer_s:g}s")
            self._freed.append(p.req_id)
        for xfer, _ in self._early.expire(now):
            effects += self._decline_offers(xfer, f"no prompt for this transfer came within {self.offer_s:g}s")
        return effects

    def next_deadline(self) -> float | None:
        times = [p.deadline for p in self._prompts.values() if p.deadline is not None and p.deadline < math.inf]
        early = self._early.next_deadline()
        if early is not None:
            times.append(early)
        return min(times, default=None)

    def take_freed(self) -> list[str]:
        """Requests whose source blocks vLLM may free now (each named once)."""
        freed, self._freed = self._freed, []
        return freed

    @property
    def busy(self) -> bool:
        """Work that needs vLLM's loop to keep stepping: prompts held for kvxferd, offers waiting."""
        return bool(self._sent or self._freed or self._early) or any(p.src is not None for p in self._prompts.values())

    def sizes(self) -> dict[str, int]:
        return {
            "prompts": len(self._prompts),
            "submitted": len(self._sent),
            "early_offers": len(self._early),
            "slots_free": len(self._slots),
        }

    # -- inside ---------------------------------------------------------------------------

    def _try_submit(self, p: _Prompt, now: float) -> list[PlanEffect]:
        offers = self._offers.get(p.xfer, {})
        if p.src is None or p.submitted or len(offers) < self.decode_world:
            return []
        self._early.pop(p.xfer)
        dsts = {o.dst_blocks for o in offers.values()}
        tokens = {o.num_tokens for o in offers.values()}
        if len(dsts) != 1 or tokens != {p.prompt_len} or len(next(iter(dsts))) != len(p.src):
            why = (
                f"the decode ranks' offers do not fit the prompt ({p.prompt_len} tokens in {len(p.src)} "
                f"blocks; offered {sorted(tokens)} tokens in {sorted(len(d) for d in dsts)} blocks)"
            )
            self._freed.append(p.req_id)
            return self._end(p, why)
        assert p.slot is not None
        # each decode rank reserved the blocks in its registration of the time: writes go only there
        gens = tuple(offers[r].generation for r in range(self.decode_world))
        info = CacheInfo(
            p.xfer,
            p.slot,
            p.start_step,
            p.prompt_len,
            p.src,
            next(iter(dsts)),
            self.decode_group,
            self.transport,
            p.instance,
            gens if all(gens) else (),
        )
        p.submitted = True
        p.deadline = now + self.decide_s
        self._sent[(p.xfer, p.instance)] = p.req_id
        return [Submit(info)]

    def _end(self, p: _Prompt, why: str) -> list[PlanEffect]:
        """The prompt will not be sent: abort what kvxferd holds of it, decline the offers."""
        effects: list[PlanEffect] = []
        if p.signalled:
            effects.append(SendAbort(p.xfer, p.instance, why))
        self._prompts.pop(p.req_id, None)
        if self._by_xfer.get(p.xfer) == p.req_id:
            del self._by_xfer[p.xfer]
            self._ended.put(p.xfer, why)
            effects += self._decline_offers(p.xfer, why)
        self._release(p)
        return effects

    def _decline_offers(self, xfer: str, why: str) -> list[PlanEffect]:
        offers = self._offers.pop(xfer, {})
        return [Decline(xfer, tuple(sorted(offers)), why)] if offers else []

    def _release(self, p: _Prompt) -> None:
        if p.slot is not None:
            heapq.heappush(self._slots, p.slot)
            p.slot = None


@dataclass
class Receiver:
    """One decode worker's transfers: each ends once, as received or failed (see the module's doc)."""

    wait_s: float
    _waiting: dict[str, tuple[str, float]] = field(default_factory=dict)  # xfer -> (vLLM id, deadline)
    _received: set[str] = field(default_factory=set)
    _failed: dict[str, str] = field(default_factory=dict)  # vLLM id -> why

    def expect(self, xfer: str, req_id: str, now: float) -> None:
        self._waiting[xfer] = (req_id, now + self.wait_s)

    def ready(self, xfer: str) -> None:
        entry = self._waiting.pop(xfer, None)
        if entry is not None:
            self._received.add(entry[0])

    def failed(self, xfer: str, why: str) -> None:
        entry = self._waiting.pop(xfer, None)
        if entry is not None:
            self._failed[entry[0]] = why

    def fail_all(self, why: str) -> None:
        for xfer in list(self._waiting):
            self.failed(xfer, why)

    def tick(self, now: float) -> None:
        for xfer, (_, deadline) in list(self._waiting.items()):
            if now >= deadline:
                self.failed(xfer, f"no word from kvxferd within {self.wait_s:g}s")

    def take(self) -> tuple[set[str], dict[str, str]]:
        """(received, failed with why) since the last call, each vLLM request id once."""
        received, failed = self._received, self._failed
        self._received, self._failed = set(), {}
        return received, failed

    def waiting(self) -> int:
        return len(self._waiting)

    def knows(self, xfer: str) -> bool:
        return xfer in self._waiting
