"""The pure cores: a prefill rank's requests, the barrier service's rounds, a decode rank's notices.

Nothing in this package imports zmq, threads, torch or a clock. Every method
takes messages and ``now`` and returns effects; ``next_deadline()`` tells the
shell when to call ``on_timer(now)``. The names below load their module when
first used, so a client that needs only :mod:`kvxferd.core.memory` does not
load the rank's core.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvxferd.core.barrier import BarrierState
    from kvxferd.core.effects import BarrierEffect, Problem, RankEffect, Run, ToBarrier, ToEngine, ToPeer, ToRank, Write
    from kvxferd.core.rank import RankCore
    from kvxferd.core.settings import RankSettings
    from kvxferd.core.states import AGREEMENT, DATA, WAITS, Agreement, AgreementEvent, Data, DataEvent, Timer

_WHERE = {
    "BarrierState": "barrier",
    "RankCore": "rank",
    "RankSettings": "settings",
    **dict.fromkeys(
        ("BarrierEffect", "Problem", "RankEffect", "Run", "ToBarrier", "ToEngine", "ToPeer", "ToRank", "Write"),
        "effects",
    ),
    **dict.fromkeys(
        ("AGREEMENT", "DATA", "WAITS", "Agreement", "AgreementEvent", "Data", "DataEvent", "Timer"), "states"
    ),
}

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


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'kvxferd.core' has no attribute {name!r}")
    return getattr(importlib.import_module(f"kvxferd.core.{module}"), name)
