"""The pending table: the two halves of a job waiting for each other.

Theory of operation: a single-request job needs a request's cache_info (from
the scheduler) and the layer-0 signal of the step that computes its first
chunk (from the model worker). Each rank receives the two streams at its own
pace, so either half may come first. Whichever comes first waits here, keyed
by ``(slot, step)``; the second one takes it out, and the caller recovers
exactly one job for exactly one request. Because the key includes the step,
a signal left behind by a slot's previous occupant can never pair with the
slot's next request.

Signals for later chunks of a chunked request that arrive before the request
was recovered also wait here; recovery claims them by ``(slot, start_step)``,
the occupancy they name.
The table only stores; deadlines and bounds are enforced by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvxferd.protocol import SlotChunk


@dataclass(frozen=True, slots=True)
class PendingSignal:
    """One slot of a layer-0 signal that has no job yet."""

    step: int
    chunk: SlotChunk
    since: float


class PendingTable:
    def __init__(self) -> None:
        self._signals: dict[int, dict[int, PendingSignal]] = {}  # slot -> step -> signal
        self._infos: dict[tuple[int, int], tuple[str, int]] = {}  # (slot, step) -> request instance
        self._nsignals = 0

    # -- layer-0 signals waiting for a cache_info ---------------------------

    def park_signal(self, signal: PendingSignal) -> None:
        by_step = self._signals.setdefault(signal.chunk.slot, {})
        assert signal.step not in by_step, "one slot appears once per step"
        by_step[signal.step] = signal
        self._nsignals += 1

    def take_signal(self, slot: int, step: int) -> PendingSignal | None:
        by_step = self._signals.get(slot)
        if by_step is None or step not in by_step:
            return None
        return self._remove(slot, by_step, step)

    def take_later_chunk(self, slot: int, start_step: int) -> PendingSignal | None:
        """The earliest parked later chunk of the request that began in ``slot`` at ``start_step``."""
        by_step = self._signals.get(slot)
        if not by_step:
            return None
        later = [s for s, sig in by_step.items() if s > start_step and sig.chunk.start_step == start_step]
        return self._remove(slot, by_step, min(later)) if later else None

    def _remove(self, slot: int, by_step: dict[int, PendingSignal], step: int) -> PendingSignal:
        signal = by_step.pop(step)
        if not by_step:
            del self._signals[slot]
        self._nsignals -= 1
        return signal

    @property
    def signal_count(self) -> int:
        return self._nsignals

    def clear_signals(self) -> list[PendingSignal]:
        """Take every parked signal out (their worker is gone); returns them."""
        out = [sig for by_step in self._signals.values() for sig in by_step.values()]
        self._signals.clear()
        self._nsignals = 0
        return out

    # -- cache_infos waiting for their layer-0 signal -----------------------

    def park_info(self, slot: int, step: int, key: tuple[str, int]) -> None:
        assert (slot, step) not in self._infos, "the caller refuses a second request on one slot+step"
        self._infos[(slot, step)] = key

    def take_info(self, slot: int, step: int) -> tuple[str, int] | None:
        return self._infos.pop((slot, step), None)

    def drop_info(self, slot: int, step: int, key: tuple[str, int]) -> None:
        if self._infos.get((slot, step)) == key:
            del self._infos[(slot, step)]

    @property
    def info_count(self) -> int:
        return len(self._infos)

    def holds(self, key: tuple[str, int]) -> bool:
        return key in self._infos.values()
