"""The life of one request on one prefill rank, as a transition table.

::

    WAIT_SIGNAL --recover--> ACTIVE --arrive--> ARRIVED --end--> ENDED
         |                     |  \\                          ^
         |                     |   drain (writes in flight)   |
         |                     |      v                       |
         +------withdraw-------+-- DRAINING --withdraw--> WITHDRAWN --end--+

WAIT_SIGNAL: the cache_info is known, the layer-0 signal of its step is not.
ACTIVE: a single-request job: chunks attached, layers being written.
Admission is not a state of its own: it runs beside WAIT_SIGNAL and ACTIVE
(the rank admitted the cache_info at once and collects ready layers), and a
request writes nothing until the barrier admitted it (``Request.admitted``).
DRAINING: the rank decided to stop (abort, failure, or the barrier already
gave a verdict) and waits for the writes it has in flight to finish, because
the decode side must not be told before nothing writes into its blocks.
ARRIVED / WITHDRAWN: the rank told the barrier service and waits for its verdict.
ENDED: reported to the engine and removed from every table.

Any state but ENDED may end directly: a verdict (or its deadline) settles a
request whatever this rank was doing, once nothing is in flight.
"""

from __future__ import annotations

import enum

from kvxferd.errors import StateError


class State(enum.Enum):
    WAIT_SIGNAL = "wait_signal"
    ACTIVE = "active"
    DRAINING = "draining"
    ARRIVED = "arrived"
    WITHDRAWN = "withdrawn"
    ENDED = "ended"


class Action(enum.Enum):
    RECOVER = "recover"
    ARRIVE = "arrive"
    DRAIN = "drain"
    WITHDRAW = "withdraw"
    END = "end"


S, A = State, Action

TRANSITIONS: dict[State, dict[Action, State]] = {
    S.WAIT_SIGNAL: {A.RECOVER: S.ACTIVE, A.WITHDRAW: S.WITHDRAWN, A.END: S.ENDED},
    S.ACTIVE: {A.ARRIVE: S.ARRIVED, A.DRAIN: S.DRAINING, A.WITHDRAW: S.WITHDRAWN, A.END: S.ENDED},
    S.DRAINING: {A.WITHDRAW: S.WITHDRAWN, A.END: S.ENDED},
    S.ARRIVED: {A.END: S.ENDED},
    S.WITHDRAWN: {A.END: S.ENDED},
    S.ENDED: {},
}


def next_state(state: State, action: Action, who: str) -> State:
    """The state after ``action``; raises StateError (naming ``who``) if illegal."""
    try:
        return TRANSITIONS[state][action]
    except KeyError:
        raise StateError(f"{who}: cannot {action.value} in state {state.value}") from None
