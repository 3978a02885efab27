"""The pure core: pending table, single-request jobs, layer progress, completion, barrier.

Nothing in this package imports zmq, threads, torch or a clock. Every method
takes messages and ``now`` and returns effects; ``next_deadline()`` tells the
shell when to call ``on_timer(now)``.
"""

from kvxferd.core.barrier import BarrierState
from kvxferd.core.effects import Effect, PostWrite, Problem, Run, ToBarrier, ToEngine, ToPeer, ToRank
from kvxferd.core.lifecycle import TRANSITIONS, Action, State
from kvxferd.core.rank import RankCore, RankSettings

__all__ = [
    "TRANSITIONS",
    "Action",
    "BarrierState",
    "Effect",
    "PostWrite",
    "Problem",
    "RankCore",
    "RankSettings",
    "Run",
    "State",
    "ToBarrier",
    "ToEngine",
    "ToPeer",
    "ToRank",
]
