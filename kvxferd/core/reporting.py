"""Reporting: how a prefill rank tells an ending, and what it says of requests in flight.

Theory of operation: a request instance ends once per rank, and is told twice:
to the prefill engine that sent its cache_info (a :class:`TransferResult`
with its timings) and to the decode rank it wrote into (a :class:`KVReady`
naming the bytes and the registration they went into, or the failed result).
An ``ok`` result waits for that decode rank's confirmation (:class:`ToPeer`'s
``then``): ok on prefill means ready at decode.
A refused cache_info is told the same two ways at once, with the refusal's
code. For operators, every live request can say in one line what it waits
for (:data:`kvxferd.core.lifecycle.WAITS`, filled in here).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from kvxferd.core.effects import RankEffect, ToEngine, ToPeer
from kvxferd.core.request import Ending, Request
from kvxferd.core.settings import RankSettings
from kvxferd.core.states import Timer, waits
from kvxferd.protocol import CacheInfo, ErrorCode, Key, KVReady, Status, TransferResult

if TYPE_CHECKING:
    from kvxferd.core.agreement import Words
    from kvxferd.core.intake import Intake
    from kvxferd.core.lifecycle import Lifecycle
    from kvxferd.core.writes import Writes


def ended(req: Request, ending: Ending, rank: int, now: float) -> list[RankEffect]:
    """The result for the engine and the notice for the decode peer of a request ending now."""
    info = req.info
    recovered = req.recovered if req.recovered is not None else now
    sent = req.sent if req.sent is not None else now
    admitted = req.admitted if req.admitted is not None else now
    result = TransferResult(
        info.request_id,
        ending.status,
        ending.reason,
        rank,
        req.bytes_done,
        req.transport or info.transport,
        wait_ms=(recovered - req.created) * 1e3,
        send_ms=(sent - recovered) * 1e3,
        total_ms=(now - req.created) * 1e3,
        instance=info.instance,
        code=ending.code,
        admit_ms=(admitted - req.created) * 1e3,
    )
    if ending.status is Status.OK:  # told to the engine once decode confirmed it is ready there
        notice = KVReady(info.request_id, rank, req.bytes_done, info.instance, req.generation or "")
        return [ToPeer(info.peer, notice, then=ToEngine(result, req.origin))]
    return [ToEngine(result, req.origin), ToPeer(info.peer, result)]


def refused(info: CacheInfo, code: ErrorCode, detail: str, rank: int, origin: bytes | None) -> list[RankEffect]:
    """A refused cache_info: the failed result, with the refusal's code, to the engine and the peer."""
    result = TransferResult(
        info.request_id, Status.FAILED, detail, rank, transport=info.transport, instance=info.instance, code=code.value
    )
    return [ToEngine(result, origin), ToPeer(info.peer, result)]


def overdue(req: Request, s: RankSettings) -> str:
    """Why a request whose deadline passed ends or stops: what it waited for, and how long."""
    info = req.info
    if req.timer is Timer.SIGNAL:
        return (
            f"no layer-0 signal for slot {info.slot} of step {info.step} "
            f"within {s.pending_timeout_s:g}s of its cache_info"
        )
    if req.timer is Timer.ADMISSION:
        return f"no admission verdict from the barrier service within {s.verdict_timeout_s:g}s"
    if req.timer is Timer.PROGRESS:
        return f"no progress for {s.progress_timeout_s:g}s: waiting for {waiting_for(req, s.num_layers)}"
    if req.timer is Timer.DRAIN:
        return f"unconfirmed after {s.progress_timeout_s:g}s"
    return f"no verdict from the barrier service within {s.verdict_timeout_s:g}s"


def waiting_for(req: Request, num_layers: int) -> str:
    """What the request waits for, in words."""
    wait = waits(req)
    if wait is None:
        return f"nothing: {req.data.value}, {req.agreement.value} (passing)"
    info = req.info
    writes = f"{req.inflight} writes to {info.peer} to complete"
    return wait.words.format(step=info.step, slot=info.slot, progress=_progress(req, num_layers, writes), writes=writes)


def _progress(req: Request, num_layers: int, writes: str) -> str:
    info = req.info
    if req.next_token < info.num_tokens:
        last = req.chunks[-1].step if req.chunks else info.step
        return f"the chunk at token {req.next_token} of {info.num_tokens} (slot {info.slot}, after step {last})"
    for chunk in req.chunks:
        if len(chunk.posted) < num_layers:
            missing = min(set(range(num_layers)) - chunk.posted)
            return f"layer {missing} of step {chunk.step}"
    return writes


def snapshot(requests: Iterable[Request], now: float, num_layers: int) -> list[dict[str, Any]]:
    """One line per live request, for operators: its states, age, what it waits for."""
    rows = []
    for req in requests:
        wait = waits(req)
        info = req.info
        rows.append(
            {
                "request_id": info.request_id,
                "instance": info.instance,
                "state": wait.name if wait is not None else req.data.value,
                "data": req.data.value,
                "agreement": req.agreement.value,
                "admitted": req.admitted is not None,
                "age_s": round(now - req.created, 3),
                "slot": info.slot,
                "step": info.step,
                "waiting_for": waiting_for(req, num_layers),
                "deadline": req.timer.value if req.timer is not None else None,
                "inflight": req.inflight,
                "bytes": req.bytes_done,
            }
        )
    return rows


def sizes(life: Lifecycle, intake: Intake, writes: Writes, words: Words) -> dict[str, int]:
    """Entries in every table of a rank. ``aborts``, ``ended`` and ``closed_slots`` are bounded
    memories that empty themselves within ``pending_s + verdict_s``; the rest are empty when idle."""
    parts = intake.sizes()
    signal_deadlines = parts.pop("signal_deadlines")
    return {
        "requests": len(life.requests),
        **parts,
        "writes": len(writes),
        "deadlines": life.armed + signal_deadlines,
        "aborts": len(words.aborts),
        "ended": len(words.ended),
        "learned": len(words.learned),
    }


def holds(key: Key, life: Lifecycle, intake: Intake, writes: Writes, words: Words) -> list[str]:
    """Names of the tables of a rank that still hold request instance ``key`` as live."""
    found = ["requests"] if key in life.requests else []
    found += intake.holds(key)
    found += ["writes"] * writes.holds(key) + ["deadlines"] * life.holds(key)
    return found + ["aborts"] * (key in words.aborts)
