"""What the pure cores ask their shells to do.

Core methods take a message and ``now`` and return a list of effects; the
shell (``kvxferd.runtime``) carries them out in order. Effects are plain
frozen values, so tests can compare them. Each machine has one effect type:
:data:`RankEffect` (a prefill rank), :data:`BarrierEffect` (the barrier
service); the decode core, the notice ledger and the peer link declare theirs
beside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from kvxferd.protocol import Admit, Arrive, ErrorCode, Key, KVReady, Message, TransferResult, Withdraw


class Run(NamedTuple):
    """``length`` consecutive blocks from ``src`` (local) to ``dst`` (peer)."""

    src: int
    dst: int
    length: int


@dataclass(frozen=True, slots=True)
class Write:
    """Copy ``runs`` of each of ``layers`` (K and V) to ``peer`` over ``transport``: the layers
    ready together whose blocks are the same runs go as one write (one request's 32 layers
    admitted at once are one write, not 32).

    The shell reports the outcome with ``core.write_done(write_id, now, error, transport,
    generation)``. ``requests`` names every request instance the write serves; ``nbytes``
    counts K and V. ``generations``: the decode registration the destination blocks were
    reserved in, per decode rank (the cache_info's ``dst_generations``); the shell writes into
    each decode rank only in its own, and sets ``generation`` to it on the write it hands a
    link (see :mod:`kvxferd.runtime.peers`). Empty, or "": into whichever the rank holds.
    """

    write_id: int
    peer: str
    transport: str
    layers: tuple[int, ...]
    runs: tuple[Run, ...]
    requests: tuple[Key, ...]
    nbytes: int
    generations: tuple[str, ...] = ()
    generation: str = ""


@dataclass(frozen=True, slots=True)
class ToBarrier:
    """Send ``message`` (an admission, an arrival or a withdrawal) to the group's barrier service."""

    message: Admit | Arrive | Withdraw


@dataclass(frozen=True, slots=True)
class ToEngine:
    """Report how a request ended to the prefill engine that sent its cache_info: ``origin``,
    the connection the shell named with it, or (None) the sender of the message being handled."""

    result: TransferResult
    origin: bytes | None = None


@dataclass(frozen=True, slots=True)
class ToPeer:
    """Tell the decode daemon at ``peer`` how a request ended (KVReady, or the failure).

    ``then``: the ``ok`` result for the prefill engine, told only once that decode daemon
    confirmed it told its engine the KVReady (a request is ok on prefill only if it is ready at
    decode); if the decode engine was told a failure instead, or no confirmation comes in time,
    the result is told as that failure (see :mod:`kvxferd.core.ledger`)."""

    peer: str
    message: KVReady | TransferResult
    then: ToEngine | None = None


@dataclass(frozen=True, slots=True)
class ToRank:
    """Barrier service: send ``message`` to ``rank`` of ``group``."""

    group: str
    rank: int
    message: Message


@dataclass(frozen=True, slots=True)
class Problem:
    """Bad input or a notable drop. The shell logs it; with ``reply`` it also answers
    the sender of the message being handled with an ``Error``."""

    code: ErrorCode
    detail: str
    ref: str = ""
    reply: bool = True


RankEffect = Write | ToBarrier | ToEngine | ToPeer | Problem
BarrierEffect = ToRank | Problem
