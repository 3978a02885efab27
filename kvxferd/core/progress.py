"""Layer progress per forward step, and which jobs wait on it.

Theory of operation: the layer-0 signal of a step opens a record for the
step; every later-layer signal of the step marks one more layer ready. A job's
chunk computed in that step is a *member* of the record until it has posted
all its layers; parked layer-0 signals of the step keep the record alive too,
so that a job recovered late finds every layer that became ready meanwhile.
A record with neither members nor parked signals is closed: nothing left
could use its later layers, so their signals are dropped quietly.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class StepRecord:
    step: int
    ready: set[int] = field(default_factory=set)
    members: dict[tuple[str, int], int] = field(default_factory=dict)  # request instance -> chunk index
    parked: int = 0  # parked layer-0 signals of this step

    @property
    def in_use(self) -> bool:
        return bool(self.members) or self.parked > 0


class StepTable:
    def __init__(self) -> None:
        self._steps: dict[int, StepRecord] = {}
        #: Highest step whose layer-0 signal was seen; steps are never reused.
        self.highest: int | None = None

    def open(self, step: int) -> StepRecord:
        record = StepRecord(step, ready={0})
        self._steps[step] = record
        return record

    def get(self, step: int) -> StepRecord | None:
        return self._steps.get(step)

    def close_if_unused(self, step: int) -> None:
        record = self._steps.get(step)
        if record is not None and not record.in_use:
            del self._steps[step]

    def leave(self, step: int, key: tuple[str, int]) -> None:
        record = self._steps.get(step)
        if record is not None and record.members.pop(key, None) is not None:
            self.close_if_unused(step)

    def unpark(self, step: int) -> None:
        record = self._steps[step]
        record.parked -= 1
        self.close_if_unused(step)

    def records(self) -> list[StepRecord]:
        return list(self._steps.values())

    def clear(self) -> None:
        """Forget every step and the sequence: the next layer-0 signal starts a new one."""
        self._steps.clear()
        self.highest = None

    def __len__(self) -> int:
        return len(self._steps)

    def holds(self, key: tuple[str, int]) -> bool:
        return any(key in r.members for r in self._steps.values())
