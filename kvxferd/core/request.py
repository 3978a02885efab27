"""What a prefill rank keeps per request instance, and what it admits at the barrier.

A :class:`Request` lives in the rank's table from its cache_info until its
ending; its :class:`Chunk` list grows as the steps that compute it are
signalled, and each write in flight names the (request, chunk, layer) parts it
carries (:class:`Part`). Once a request ended, only its :class:`Ending` is
remembered, for a while, so a late message of the instance is recognised.
:func:`terms_of` is what ranks compare at admission: every cache_info field
they must agree on before a byte is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvxferd.core.effects import Run
from kvxferd.core.lifecycle import State
from kvxferd.protocol import CacheInfo, Status, Terms, Withdraw, block_summary

Key = tuple[str, int]  # (request id, instance)


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
    origin: bytes | None = None  # the engine connection its cache_info came from: its result goes there
    transport: str | None = None  # the transport its first completed write went over
    admitted: float | None = None  # when the barrier admitted it; nothing is written before
    recovered: float | None = None
    sent: float | None = None
    chunks: list[Chunk] = field(default_factory=list)
    next_token: int = 0  # where the next chunk must start
    blocks_assigned: int = 0
    inflight: int = 0  # write parts posted and not yet reported
    bytes_done: int = 0
    stop: tuple[Status, str] | None = None  # this rank's own decision to stop
    outcome: tuple[Status, str] | None = None  # the group's verdict, if it came while draining


@dataclass(slots=True)
class Ending:
    """How an instance ended here (or was learned to have ended), and who has been told."""

    status: Status
    reason: str
    told_engine: bool
    told_peer: bool
    #: a withdrawal this rank ended on before any verdict came (a refusal, a deadline, a forced
    #: stop): said again if the barrier restarts, until a verdict for the instance arrives
    word: Withdraw | None = None


@dataclass(frozen=True, slots=True)
class Part:
    key: Key
    chunk: int
    layer: int
    nbytes: int


def terms_of(info: CacheInfo) -> Terms:
    """What this rank admits at the barrier for ``info``: every field ranks must agree on."""
    return Terms(
        info.num_tokens,
        info.slot,
        info.step,
        block_summary(info.src_blocks),
        block_summary(info.dst_blocks),
        info.peer,
        info.transport,
    )
