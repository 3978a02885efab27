"""What a prefill rank keeps per request instance, and how an instance ended.

A :class:`Request` lives in the rank's table from its cache_info until its
ending. Where it stands is two states (:mod:`kvxferd.core.states`): its
data (``data``: signal, writes, drain) and its agreement with the other ranks
(``agreement``: admission, arrival or withdrawal, verdict). Its
:class:`Chunk` list grows as the steps that compute it are signalled; each
write in flight names the (request, chunk, layer) parts it carries
(:class:`Part`). An :class:`Ending` is a status and a reason, the same on
every rank; once a request ended, only an :class:`Ended` record is kept for a
while, so a late message of the instance is recognised. :func:`terms_of` is
what ranks compare at admission: every cache_info field they must agree on
before a byte is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from kvxferd.core.effects import Run
from kvxferd.core.states import Agreement, Data, Timer
from kvxferd.protocol import CacheInfo, Key, Status, Terms, Withdraw, block_summary, names_summary


class Ending(NamedTuple):
    """How an instance ends: one status and one reason, reported alike by every rank. ``code``:
    set on an ending this rank decided alone (a refusal, a forced stop), which says so."""

    status: Status
    reason: str
    code: str = ""


@dataclass(slots=True)
class Chunk:
    step: int
    token_offset: int
    token_count: int
    first_block: int
    end_block: int
    runs: tuple[Run, ...]  # merged (blocks.merge_runs): sorted by source, neighbours joined
    blocks: int = 0  # blocks its runs cover (what one layer of it writes, per region)
    posted: set[int] = field(default_factory=set)
    confirmed: set[int] = field(default_factory=set)


@dataclass(slots=True)
class Request:
    info: CacheInfo
    created: float
    data: Data = Data.WAIT_SIGNAL
    agreement: Agreement = Agreement.UNADMITTED
    timer: Timer | None = None  # the deadline armed for the pair of states (states.WAITS)
    writing: bool = False  # the pair lets it write (states.writing), kept by every move
    origin: bytes | None = None  # the engine connection its cache_info came from: its result goes there
    transport: str | None = None  # the transport its first completed write went over
    generation: str | None = None  # the decode registration its writes went into (MIXED: several)
    admitted: float | None = None  # when the barrier admitted it (for the result's timings)
    recovered: float | None = None
    sent: float | None = None
    chunks: list[Chunk] = field(default_factory=list)
    next_token: int = 0  # where the next chunk must start
    blocks_assigned: int = 0
    inflight: int = 0  # write parts posted and not yet reported
    bytes_done: int = 0
    stop: Ending | None = None  # this rank's own decision to stop, said once it drained
    unfit: Ending | None = None  # a chunk that did not fit, before admission said the cache_infos agree
    outcome: Ending | None = None  # the group's verdict (or this rank's final word), once decided
    key: Key = field(init=False)  # (request id, instance), kept: every table is keyed by it

    def __post_init__(self) -> None:
        self.key = self.info.key


@dataclass(slots=True)
class Ended:
    """How an instance ended here (or was learned to have ended), and who has been told."""

    ending: Ending
    told_engine: bool
    #: the decode peer told how it ended ("": none yet): a verdict learned before the cache_info
    #: names the group's peer, which need not be the one this rank's cache_info names
    told_peer: str
    #: a withdrawal this rank ended on before any verdict came (a refusal, a deadline, a forced
    #: stop): said again if the barrier restarts, until a verdict for the instance arrives
    word: Withdraw | None = None


class Part(NamedTuple):
    """One (request, chunk, layer) a write carries (a tuple: hundreds are made a step)."""

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
        names_summary(info.dst_generations),
    )
