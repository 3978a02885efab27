"""The pure cores: a prefill rank's requests, the barrier service's rounds, a decode rank's notices.

Nothing in this package imports zmq, threads, torch or a clock. Every method
takes messages and ``now`` and returns effects; ``next_deadline()`` tells the
shell when to call ``on_timer(now)``.
"""

from kvxferd.core.barrier import BarrierState
from kvxferd.core.effects import BarrierEffect, Problem, RankEffect, Run, ToBarrier, ToEngine, ToPeer, ToRank, Write
from kvxferd.core.rank import RankCore
from kvxferd.core.settings import RankSettings
from kvxferd.core.states import AGREEMENT, DATA, WAITS, Agreement, AgreementEvent, Data, DataEvent, Timer

__all__ = [
    "AGREEMENT",
    "DATA",
    "WAITS",
    "Agreement",
    "AgreementEvent",
    "BarrierEffect",
    "BarrierState",
    "Data",
    "DataEvent",
    "Problem",
    "RankCore",
    "RankEffect",
    "RankSettings",
    "Run",
    "Timer",
    "ToBarrier",
    "ToEngine",
    "ToPeer",
    "ToRank",
    "Write",
]
