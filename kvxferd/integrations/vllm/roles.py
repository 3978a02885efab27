"""The connector's four sides as plain objects: what each vLLM process holds, free of vLLM.

=====================  ============================  ==========================================
side                   lives in                      talks to
=====================  ============================  ==========================================
:class:`PrefillSide`   prefill vLLM's scheduler      every prefill rank (CacheInfo, Abort,
                                                     results); serves the rendezvous socket
:class:`PrefillRank`   each prefill vLLM worker      its prefill rank (cache, layer signals)
:class:`DecodeRank`    each decode vLLM worker       its decode rank (cache, notices); offers
                                                     blocks at the rendezvous socket
=====================  ============================  ==========================================

(The decode scheduler needs no socket: it only names the blocks vLLM reserved.)

The rendezvous socket is a ROUTER served by the prefill scheduler with the
deployment's engine keys (CURVE, see :mod:`kvxferd.security`): only holders of
the deployment secret may offer blocks, and every offer is checked against the
config (group, rank, block range) before it counts. Each side also keeps the
vLLM KV tensors reachable by the daemons: :func:`share_kv_tensors` moves them
into one shared-memory segment once, at registration, so no request copies.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import zmq

from kvxferd import security
from kvxferd.client import DecodeEngine, PrefillScheduler, PrefillWorker, credentials
from kvxferd.core.memory import Memory
from kvxferd.errors import ConfigError, DaemonError, LocalProtocolError
from kvxferd.integrations.vllm.plan import Decline, PlanEffect, PrefillPlan, Receiver, SendAbort, StepPlan, Submit
from kvxferd.protocol import (
    DEFAULT_MAX_FRAME,
    BlockOffer,
    CacheLayout,
    Error,
    OfferDeclined,
    Region,
    RegisterCache,
)
from kvxferd.protocol.fields import clip
from kvxferd.runtime import sockets
from kvxferd.shm import Segment, unique_name

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from kvxferd.config import Config, GroupConfig

log = logging.getLogger(__name__)

#: Rendezvous messages read per poll, at most (the rest wait for the next one).
MAX_OFFERS_PER_POLL = 4096
#: Transfers whose offering decode workers are remembered, to decline to (oldest forgotten first).
MAX_ASKERS = 65536


def rendezvous_endpoint(config: Config, endpoint: str | None) -> str:
    """The rendezvous socket's endpoint: as given (``{run_dir}`` expanded), by default in the run dir."""
    return config.expand(endpoint or "ipc://{run_dir}/vllm-rendezvous.sock")


def decide_within(config: Config) -> float:
    """How long after its cache_info every live rank has ended a request by its own deadlines
    (admission, writes, verdict, each its own bound), with as much again to spare."""
    t = config.timeouts
    return 2 * (t.pending_s + t.progress_s + 2 * t.verdict_s)


class PrefillSide:
    """The prefill scheduler's kvxferd client and rendezvous server (one per prefill instance)."""

    def __init__(
        self,
        config: Config,
        group: GroupConfig,
        decode_group: GroupConfig,
        *,
        rendezvous: str | None = None,
        offer_s: float = 30.0,
        transport: str = "auto",
    ) -> None:
        creds = credentials(config)
        self.sched = PrefillScheduler([config.endpoint(group, r) for r in range(group.world_size)], credentials=creds)
        self.plan = PrefillPlan(
            block_tokens=config.kv.block_tokens,
            decode_group=decode_group.name,
            decode_world=decode_group.world_size,
            max_slots=config.limits.max_requests,
            offer_s=offer_s,
            transport=transport,
            decide_s=decide_within(config),
        )
        self.num_blocks = config.kv.num_blocks
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._auth: Any = security.authenticator(self.ctx, creds)
        self.rdv = sockets.socket(self.ctx, zmq.ROUTER)
        creds.server(self.rdv, "rendezvous")
        self._claim: sockets.Claim | None = None
        try:
            self.endpoint, self._claim = sockets.bind(self.rdv, rendezvous_endpoint(config, rendezvous))
        except DaemonError:
            self.close()
            raise
        #: xfer -> {decode rank: its connection}, for declines
        self._askers: Memory[str, dict[int, bytes]] = Memory(limit=MAX_ASKERS)

    # -- vLLM's events, carried out --------------------------------------------------------

    def step(self, scheduled: Sequence[tuple[str, int, int]]) -> StepPlan | None:
        return self.plan.step(scheduled)

    def preempted(self, req_id: str) -> None:
        self._apply(self.plan.preempted(req_id))

    def finished(self, req_id: str, ok: bool, block_ids: list[int]) -> bool:
        delay, effects = self.plan.finished(req_id, ok, block_ids, time.monotonic())
        self._apply(effects)
        return delay

    def poll(self) -> list[str]:
        """Take in offers and kvxferd's results; return the requests vLLM may free now."""
        for got in sockets.receive(self.rdv, max_frame=DEFAULT_MAX_FRAME, router=True, limit=MAX_OFFERS_PER_POLL):
            if got.msg is None or got.identity is None:
                log.warning("rendezvous: a bad message: %s", got.error)
            elif not isinstance(got.msg, BlockOffer):
                log.warning("rendezvous: %s is not a block offer", type(got.msg).__name__)
            else:
                self._offer(got.identity, got.msg)
        for out in self.sched.collect(0.0):
            self.plan.decided(out.request_id, out.instance)
            self._askers.pop(out.request_id)
            if not out.ok:
                log.warning("transfer %s did not complete: %s", out.request_id, _why(out.results, out.gone))
        self._apply(self.plan.tick(time.monotonic()))
        return self.plan.take_freed()

    @property
    def busy(self) -> bool:
        return self.plan.busy

    def close(self) -> None:
        if self.ctx.closed:
            return
        self.rdv.close(linger=0)
        if self._claim is not None:
            self._claim.release()
        self._auth.stop()
        self.ctx.term()
        self.sched.close()

    # -- inside ---------------------------------------------------------------------------

    def _offer(self, identity: bytes, msg: BlockOffer) -> None:
        if max(msg.dst_blocks) >= self.num_blocks:
            reason = f"block {max(msg.dst_blocks)} is outside the {self.num_blocks} blocks of the config"
            self._send(identity, OfferDeclined(msg.request_id, reason))
            return
        askers = self._askers.get(msg.request_id)
        if askers is None:
            askers = {}
            self._askers.put(msg.request_id, askers)
        askers.setdefault(msg.rank, identity)
        self._apply(self.plan.offer(msg, time.monotonic()), identity)

    def _apply(self, effects: list[PlanEffect], asker: bytes | None = None) -> None:
        for eff in effects:
            if isinstance(eff, Submit):
                self.sched.submit(eff.info)
            elif isinstance(eff, SendAbort):
                self.sched.abort(eff.xfer, clip(eff.reason), instance=eff.instance)
            elif isinstance(eff, Decline):
                askers = self._askers.pop(eff.xfer) or {}
                for rank in eff.ranks:
                    who = askers.get(rank) or asker
                    if who is not None:
                        self._send(who, OfferDeclined(eff.xfer, eff.reason))

    def _send(self, identity: bytes, msg: OfferDeclined) -> None:
        try:
            sockets.send(self.rdv, msg, identity)
        except zmq.ZMQError as exc:  # its connection is gone: it learns from its own deadline
            log.warning("rendezvous: cannot decline %s: %s", msg.request_id, exc)


def _why(results: dict[int, Any], gone: dict[int, str]) -> str:
    parts = [f"rank {r}: {res.status.value}: {res.reason}" for r, res in sorted(results.items())]
    parts += [f"rank {r}: {why}" for r, why in sorted(gone.items())]
    return "; ".join(parts) or "no result"


class PrefillRank:
    """One prefill vLLM worker's link to its kvxferd rank."""

    def __init__(self, config: Config, group: GroupConfig, rank: int) -> None:
        self.worker = PrefillWorker(config.endpoint(group, rank), credentials=credentials(config))
        self.segment: Segment | None = None
        self.registration: RegisterCache | None = None
        self._lost = False

    def register(self, tensors: Sequence[torch.Tensor], prefix: str) -> RegisterCache:
        self.segment, reg = share_kv_tensors(tensors, prefix)
        self.worker.register(reg)
        self.registration = reg
        return reg

    def signal(self, plan: StepPlan, layer: int) -> None:
        self.worker.layer_ready(plan.step, layer, plan.chunks if layer == 0 else ())

    def errors(self) -> list[Error]:
        """Errors the daemon answered with; registers the cache again with a daemon that
        restarted (a new daemon knows no cache: the requests the old one held failed there)."""
        found = self.worker.errors()
        self._lost = _rejoin(self.worker, self.registration, self._lost)
        return found

    def close(self) -> None:
        self.worker.close()
        _drop(self.segment)


class DecodeRank:
    """One decode vLLM worker's link to its kvxferd rank and to the prefill side's rendezvous."""

    def __init__(
        self, config: Config, group: GroupConfig, rank: int, *, rendezvous: str | None = None, wait_s: float = 60.0
    ) -> None:
        creds = credentials(config)
        self.group, self.rank = group, rank
        self.engine = DecodeEngine([config.endpoint(group, rank)], credentials=creds)
        self.rdv = sockets.socket(self.engine.ctx, zmq.DEALER)
        creds.client(self.rdv, "rendezvous")
        self.rdv.connect(rendezvous_endpoint(config, rendezvous))
        self.receiver = Receiver(wait_s)
        self.segment: Segment | None = None
        self.registration: RegisterCache | None = None
        self._lost = False

    def register(self, tensors: Sequence[torch.Tensor], prefix: str) -> RegisterCache:
        self.segment, reg = share_kv_tensors(tensors, prefix)
        self.engine.register([reg])
        self.registration = reg
        return reg

    @property
    def gone(self) -> bool:
        """The decode daemon's connection is closed (it died or stopped)."""
        return bool(self.engine.gone) or self._lost

    def expect(self, req_id: str, xfer: str, num_tokens: int, dst_blocks: Sequence[int]) -> None:
        """Offer ``dst_blocks`` for ``xfer`` (call once vLLM no longer touches them: after its
        zeroing of new blocks, i.e. from the worker's step, not from the scheduler)."""
        self.receiver.expect(xfer, req_id, time.monotonic())
        if self.gone:
            self.receiver.failed(xfer, f"decode rank {self.rank}'s kvxferd daemon is gone")
            return
        try:
            # the blocks are reserved in the cache registered now: the offer names that registration
            generation = self.engine.generations[0]
            offer = BlockOffer(xfer, self.group.name, self.rank, num_tokens, tuple(dst_blocks), generation)
            sockets.send(self.rdv, offer)
        except (LocalProtocolError, zmq.ZMQError) as exc:
            self.receiver.failed(xfer, f"cannot offer its blocks to the prefill side: {exc}")

    def poll(self) -> tuple[set[str], dict[str, str]]:
        """(received, failed with why): the vLLM request ids whose transfer ended since the last poll."""
        for out in self.engine.collect(0.0):
            if out.ready:
                self.receiver.ready(out.request_id)
            elif out.reusable:
                self.receiver.failed(out.request_id, "; ".join(out.reasons.values()) or "failed")
        for got in sockets.receive(self.rdv, max_frame=DEFAULT_MAX_FRAME, router=False, limit=MAX_OFFERS_PER_POLL):
            if isinstance(got.msg, OfferDeclined):
                self.receiver.failed(got.msg.request_id, f"the prefill side declined: {got.msg.reason}")
            else:
                log.warning("rendezvous: not a decline: %s", got.error or type(got.msg).__name__)
        if self.engine.gone:
            self.receiver.fail_all(f"decode rank {self.rank}'s kvxferd daemon is gone (its connection closed)")
        self._lost = _rejoin(self.engine, self.registration, self._lost)
        self.receiver.tick(time.monotonic())
        return self.receiver.take()

    def close(self) -> None:
        self.rdv.close(linger=0)
        self.engine.close()
        _drop(self.segment)


def _rejoin(client: PrefillWorker | DecodeEngine, reg: RegisterCache | None, lost: bool) -> bool:
    """Register ``reg`` again once a daemon whose connection closed is back; whether it is
    still to be done (``lost``)."""
    if client.gone:
        return True
    if lost and reg is not None:
        try:
            if isinstance(client, DecodeEngine):
                client.register_rank(0, reg)
            else:
                client.register(reg)
        except DaemonError as exc:
            log.warning("kvxferd is back but refused the cache again: %s", exc)
            return True
        log.warning("kvxferd restarted: the KV cache is registered with it again")
    return False


def share_kv_tensors(tensors: Sequence[torch.Tensor], prefix: str) -> tuple[Segment, RegisterCache]:
    """Move vLLM's per-layer KV tensors (``[num_blocks, ...]``, packed K and V, all alike) into
    one new shared-memory segment, in place: each tensor object keeps its shape, dtype and
    identity, and its storage becomes the segment's (``Tensor.set_``), so every holder of the
    tensor (vLLM's attention layers) now reads and writes shared memory. Done once, before the
    first forward step; the caller owns the segment (close and unlink it at shutdown).

    Returns the segment and the registration describing it (layout ``planes`` = 1)."""
    import torch

    if not tensors:
        raise ConfigError("vLLM handed the connector no KV cache tensors")
    first = tensors[0]
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous() or t.shape != first.shape or t.dtype != first.dtype:
            raise ConfigError(
                "the kvxferd connector needs contiguous CPU KV tensors of one shape and dtype per layer "
                f"(got {tuple(t.shape)} {t.dtype} on {t.device}, first {tuple(first.shape)} {first.dtype})"
            )
    per_layer = first.numel() * first.element_size()
    num_blocks = first.shape[0]
    segment = Segment.create(unique_name(prefix), per_layer * len(tensors))
    try:
        flat = torch.frombuffer(segment.buffer, dtype=torch.uint8, count=segment.size)
        regions = []
        for layer, t in enumerate(tensors):
            offset = layer * per_layer
            view = flat[offset : offset + per_layer].view(t.dtype).view(t.shape)
            view.copy_(t)
            t.set_(view.untyped_storage(), view.storage_offset(), t.shape, t.stride())
            regions.append(Region(layer, 0, segment.name, offset))
        layout = CacheLayout(len(tensors), num_blocks, per_layer // num_blocks, planes=1)
        return segment, RegisterCache("host", layout, tuple(regions))
    except BaseException:
        _drop(segment)
        raise


def _drop(segment: Segment | None) -> None:
    if segment is not None:
        segment.unlink()
        segment.close()
