"""A request's state on a prefill rank: two small machines as tables, and what each pair waits for.

Theory of operation
-------------------
A request is in two states at once. Its **data** state says what happens to
its bytes::

    WAIT_SIGNAL --recover--> ACTIVE --finish--> QUIET
         |                     |  \\
         +------halt-----------+   drain --> DRAINING --drained--> QUIET
                               +--halt-----------------------------^

Its **agreement** state says what the rank told the barrier service::

    UNADMITTED --admit--> ADMITTED --arrive--> ARRIVED ----decide--> DECIDED
         |                   |                                ^
         +----withdraw-------+--withdraw--> WITHDRAWN --decide-+
    UNADMITTED / ADMITTED --decide--> DECIDED   (a verdict may come first)

WAIT_SIGNAL: the cache_info is here, the layer-0 signal of its step is not.
ACTIVE: a single-request job; layers are written once admitted, never before.
DRAINING: the rank stopped (or a verdict came) with writes in flight; the
decode side must not be told before nothing writes into its blocks.
QUIET: nothing in flight and nothing more will be written. UNADMITTED: the
rank admitted the cache_info at the barrier and waits for every rank to hold
the same. ARRIVED / WITHDRAWN: the rank said its last word (it wrote
everything / it stopped) and waits for the verdict. DECIDED: the verdict is
known (or the rank decided alone, when the service never answered). A request
ends (reported, removed from every table) in ``(QUIET, DECIDED)``.

:data:`DATA` and :data:`AGREEMENT` are the transition tables; moving along
them (:class:`kvxferd.core.lifecycle.Lifecycle`) by an event a state does not
list raises :class:`~kvxferd.errors.StateError` naming the request and its
state, and changes nothing. Events that come from outside (a repeated verdict)
are checked with :func:`allows` first and ignored when not allowed.

**One deadline per request**, taken from :data:`WAITS` for its pair of states
and armed when the request moves, and nowhere else: the pair says what the
request waits for, in words, and which :class:`Timer` bounds that wait. A
timer keeps running while the pair keeps the same one; ``PROGRESS`` (a layer
written, a write confirmed) and ``REANNOUNCE`` (a word said again to a
restarted barrier service, which gives the round a fresh timeout) start it
again. Pairs not in :data:`WAITS` are passing: the caller moves on from them
within the same call (``(QUIET, DECIDED)`` ends the request).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvxferd.core.request import Request


class _Member(enum.Enum):
    """Members hash by identity (each is a singleton): every move looks them up in the tables, and
    Enum's own hash is a Python-level call."""

    __hash__ = object.__hash__


class Data(_Member):
    WAIT_SIGNAL = "wait_signal"
    ACTIVE = "active"
    DRAINING = "draining"
    QUIET = "quiet"


class Agreement(_Member):
    UNADMITTED = "unadmitted"
    ADMITTED = "admitted"
    ARRIVED = "arrived"
    WITHDRAWN = "withdrawn"
    DECIDED = "decided"


class DataEvent(_Member):
    RECOVER = "recover"  # its layer-0 signal and its cache_info are both here: a job
    PROGRESS = "progress"  # a layer was written, a write confirmed, admission came: the job moves
    FINISH = "finish"  # every layer of every chunk is confirmed written
    DRAIN = "drain"  # stop, with writes in flight
    HALT = "halt"  # stop, with nothing in flight
    DRAINED = "drained"  # the last write in flight reported (or was given up)


class AgreementEvent(_Member):
    ADMIT = "admit"  # Admitted: every rank holds the same cache_info
    ARRIVE = "arrive"  # this rank wrote everything: Arrive
    WITHDRAW = "withdraw"  # this rank stopped: Withdraw
    DECIDE = "decide"  # a final verdict, or this rank's own last decision
    REANNOUNCE = "reannounce"  # the barrier service restarted: the word again


D, G = Data, Agreement
DE, GE = DataEvent, AgreementEvent

DATA: dict[Data, dict[DataEvent, Data]] = {
    D.WAIT_SIGNAL: {DE.RECOVER: D.ACTIVE, DE.HALT: D.QUIET},
    D.ACTIVE: {DE.PROGRESS: D.ACTIVE, DE.FINISH: D.QUIET, DE.DRAIN: D.DRAINING, DE.HALT: D.QUIET},
    D.DRAINING: {DE.DRAINED: D.QUIET},
    D.QUIET: {},
}

AGREEMENT: dict[Agreement, dict[AgreementEvent, Agreement]] = {
    G.UNADMITTED: {GE.ADMIT: G.ADMITTED, GE.WITHDRAW: G.WITHDRAWN, GE.DECIDE: G.DECIDED, GE.REANNOUNCE: G.UNADMITTED},
    G.ADMITTED: {GE.ARRIVE: G.ARRIVED, GE.WITHDRAW: G.WITHDRAWN, GE.DECIDE: G.DECIDED},
    G.ARRIVED: {GE.DECIDE: G.DECIDED, GE.REANNOUNCE: G.ARRIVED},
    G.WITHDRAWN: {GE.DECIDE: G.DECIDED, GE.REANNOUNCE: G.WITHDRAWN},
    G.DECIDED: {},
}


class Timer(_Member):
    """What bounds a wait, and from when it counts."""

    SIGNAL = "signal"  # pending_s from the cache_info
    ADMISSION = "admission"  # verdict_s from the cache_info
    PROGRESS = "progress"  # progress_s from the job's last progress
    DRAIN = "drain"  # progress_s from the start of the drain
    VERDICT = "verdict"  # verdict_s from the last word said


@dataclass(frozen=True, slots=True)
class Wait:
    timer: Timer
    name: str  # the pair in one word, for operators ("arrived", "draining", ...)
    words: str  # what the request waits for; the caller fills in {step}, {slot}, {progress}, {writes}


#: (data, agreement) -> what a request in that pair waits for, and the timer bounding it.
WAITS: dict[tuple[Data, Agreement], Wait] = {
    (D.WAIT_SIGNAL, G.UNADMITTED): Wait(Timer.SIGNAL, "wait_signal", "layer-0 signal of step {step} for slot {slot}"),
    (D.WAIT_SIGNAL, G.ADMITTED): Wait(Timer.SIGNAL, "wait_signal", "layer-0 signal of step {step} for slot {slot}"),
    (D.ACTIVE, G.UNADMITTED): Wait(
        Timer.ADMISSION, "active", "admission by the barrier service (every rank's cache_info)"
    ),
    (D.ACTIVE, G.ADMITTED): Wait(Timer.PROGRESS, "active", "{progress}"),
    (D.DRAINING, G.ADMITTED): Wait(Timer.DRAIN, "draining", "{writes}, then to withdraw"),
    (D.DRAINING, G.DECIDED): Wait(Timer.DRAIN, "draining", "{writes}, then to end (decided)"),
    (D.QUIET, G.ARRIVED): Wait(Timer.VERDICT, "arrived", "the barrier verdict"),
    (D.QUIET, G.WITHDRAWN): Wait(Timer.VERDICT, "withdrawn", "the barrier verdict"),
}

#: the pair in which a request ends (reported, removed from every table)
END = (D.QUIET, G.DECIDED)

#: events that start the current timer again although the pair keeps it: progress, and a word said
#: again to a restarted barrier service, whose new round has a fresh timeout of its own (a rank that
#: kept counting from its first word could give up before the service decides, and then differ)
RESTARTS: tuple[DataEvent | AgreementEvent, ...] = (DE.PROGRESS, GE.REANNOUNCE)


def waits(req: Request) -> Wait | None:
    """What the request waits for (None in a passing pair)."""
    return WAITS.get((req.data, req.agreement))


def allows(req: Request, event: DataEvent | AgreementEvent) -> bool:
    """Whether ``event`` is one the request's current state takes."""
    if isinstance(event, DataEvent):
        return event in DATA[req.data]
    return event in AGREEMENT[req.agreement]


def writing(req: Request) -> bool:
    """Whether the request may write now: a job whose cache_info every rank admitted."""
    return req.data is Data.ACTIVE and req.agreement is Agreement.ADMITTED
